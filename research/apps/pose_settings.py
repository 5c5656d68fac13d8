"""Pose control of one identity (or the plain prompt) under drawing settings: LoRA scale,
ControlNet scale, guidance, scheduler, steps, and `ControlledGenerator`'s ``identity_until``,
``identity_in_controlnet`` and ``late_control_scale``. 20 poses × 4 seeds, read by the pose
probe.

    python research/apps/pose_settings.py IDENTITY CONTROLNET '[{"lora_scale": 0.8}]' \
        [--plain] [--seed 0] [--reference shape=round,color=blue,hat=crown,hat_color=red,eyes=big]

Each JSON object is one setting (`SDXLGenerator` settings, plus ``control_scale``,
``identity_until``, ``identity_in_controlnet`` and ``late_control_scale``); the reference is
what the probe should read for the identity (default: the round blue creature with a red
crown).
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import consistent_char.toy as toy
from consistent_char.config import TOY_MODEL
from consistent_char.control import ControlledGenerator, load_controlnet
from consistent_char.eval.pose_control import pose_jobs
from consistent_char.identity import Identity
from consistent_char.toy.evaluate import identity_kept
from consistent_char.toy.pose import POSE, POSE_TOLERANCE, pose_followed, pose_map, pose_of
from consistent_char.toy.probe import IdentityProbe
from consistent_char.usage import identity_generator

REFERENCE = "shape=round,color=blue,hat=crown,hat_color=red,eyes=big"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("identity")
    parser.add_argument("controlnet", help="a ControlNet folder, or 'toy'")
    parser.add_argument("settings", help="a JSON list of settings")
    parser.add_argument("--plain", action="store_true", help="draw the plain prompt instead")
    _bench_options(parser)
    args = parser.parse_args()
    bench = PoseBench(
        args.identity, args.reference, args.seed, args.poses, probe_dir=args.pose_probe
    )
    controlnet = load_controlnet(args.controlnet, device="cpu")
    drawn = None if args.plain else bench.identity
    shipped = IdentityProbe.from_pretrained(toy.pose_probe_dir()) if args.pose_probe else None
    for setting in json.loads(args.settings):
        control = {
            k: setting.pop(k)
            for k in (
                "control_scale",
                "identity_until",
                "identity_in_controlnet",
                "late_control_scale",
            )
            if k in setting
        }
        blocks = {
            k: setting.pop(k)
            for k in ("mid_scale", "low_res_scale", "high_res_scale")
            if k in setting
        }
        controlled = ControlledGenerator(
            bench.gen.pipeline,
            controlnet,
            **control,
            **{**bench.gen.settings.model_dump(), **setting},
        )
        prompts = [j.prompt("a creature", drawn) for j in bench.jobs]
        hook = controlnet.register_forward_hook(block_scales(controlled, **blocks))
        try:
            images = controlled.generate(prompts, bench.seeds, drawn, control_images=bench.maps)
        finally:
            hook.remove()
        label = f"{'plain' if args.plain else 'identity'} {setting} {control} {blocks}"
        print(bench.report(label, images, sheet=args.sheet), flush=True)
        if shipped is not None:  # the same images read by the shipped pose probe too
            print(bench.report(f"  shipped pose probe: {label}", images, probe=shipped), flush=True)


def block_scales(
    controlled: ControlledGenerator,
    mid_scale: float = 1.0,
    low_res_scale: float = 1.0,
    high_res_scale: float = 1.0,
) -> Any:
    """A forward hook on the ControlNet that scales its residuals by where they enter the UNet,
    in the steps before the identity's switch only (``identity_until``): the mid block's by
    `mid_scale`, the down residuals at the lowest resolution by `low_res_scale`, those at the
    highest by `high_res_scale`: does the look get diluted at one depth and the pose carried at
    another?"""

    def hook(module: Any, args: Any, output: Any) -> Any:
        if controlled._late or mid_scale == low_res_scale == high_res_scale == 1.0:
            return output
        down, mid = output[0], output[1]
        sizes = [d.shape[-1] for d in down]
        scale = {min(sizes): low_res_scale, max(sizes): high_res_scale}
        return ([d * scale.get(d.shape[-1], 1.0) for d in down], mid * mid_scale)

    return hook


def drawing_setup(
    settings_help: str, lora_scale: float = 1.5, until: float = 0.85
) -> tuple[argparse.Namespace, PoseBench, Any, list[str]]:
    """The command line the scripts that draw one identity share (IDENTITY, a JSON list,
    ``--controlnet``, ``--lora-scale``, ``--until``, ``--reference``, ``--seed``, ``--sheet``),
    parsed, and what it sets up: the bench, the ControlNet and the identity's prompts."""
    parser = argparse.ArgumentParser()
    parser.add_argument("identity")
    parser.add_argument("settings", help=settings_help)
    parser.add_argument("--controlnet", default="toy")
    parser.add_argument("--lora-scale", type=float, default=lora_scale)
    parser.add_argument("--until", type=float, default=until)
    _bench_options(parser)
    args = parser.parse_args()
    bench = PoseBench(
        args.identity, args.reference, args.seed, args.poses, probe_dir=args.pose_probe
    )
    controlnet = load_controlnet(args.controlnet, device="cpu")
    prompts = [j.prompt("a creature", bench.identity) for j in bench.jobs]
    return args, bench, controlnet, prompts


def _bench_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reference", default=REFERENCE)
    parser.add_argument("--seed", type=int, default=0, help="picks the poses and seeds")
    parser.add_argument("--sheet", help="write the last setting's images here, misses marked")
    parser.add_argument("--poses", type=int, default=20, help="poses (4 seeds each)")
    parser.add_argument(
        "--pose-probe",
        default=None,
        help="read with another pose probe's folder (pose_settings.py: and the shipped one)",
    )


class PoseBench:
    """The poses × 4 seeds of `pose_jobs(poses, 4, seed)` (the first 20 are `eval toy-apps`'),
    their pose maps, the pose probe and the identity's generator; `report` reads drawn images
    against them."""

    def __init__(
        self,
        identity_dir: str,
        reference: str,
        seed: int,
        poses: int = 20,
        calibration: bool = False,
        probe_dir: str | None = None,
    ) -> None:
        torch.set_num_threads(int(os.environ.get("THREADS", "2")))
        self.identity = Identity.load(identity_dir)
        self.reference = dict(kv.split("=") for kv in reference.split(","))
        self.probe = IdentityProbe.from_pretrained(probe_dir or toy.pose_probe_dir())
        self.jobs = pose_jobs(poses, 4, seed, calibration=calibration)
        self.asked = pose_of([j.pose for j in self.jobs])
        self.maps = [pose_map(j.pose) for j in self.jobs]
        self.seeds = [j.seed for j in self.jobs]
        self.gen = identity_generator(self.identity, model=TOY_MODEL, device="cpu")

    def report(
        self,
        label: str,
        images: list,  # type: ignore[type-arg]
        sheet: str | None = None,
        probe: IdentityProbe | None = None,
    ) -> str:
        """`images` read against the bench by `probe` (default: the bench's own)."""
        probe = probe or self.probe
        tolerance = np.array([POSE_TOLERANCE[k] for k in POSE])
        read = probe.predict_pose(images)
        attributes = probe.predict(images)
        shares = {
            k: round(float(np.mean([a[k] == v for a in attributes])), 2)
            for k, v in self.reference.items()
        }
        if sheet:
            _sheet(images, self.asked, read, attributes, self.reference).save(sheet)
        return (
            f"{label}: followed {pose_followed(read, self.asked).mean():.3f}, "
            f"kept {identity_kept(attributes, self.reference):.3f}, "
            f"fields {np.round(np.mean(np.abs(read - self.asked) <= tolerance, 0), 2)}, "
            f"bias/tolerance {np.round((read - self.asked).mean(0) / tolerance, 2)}, "
            f"attributes {shares}"
        )


def loop_run(path: str | Path) -> Path:
    """A loop's run folder: `path` itself, or the ``run`` folder `eval toy-apps` writes in it."""
    path = Path(path)
    return path / "run" if (path / "run" / "state.json").is_file() else path


def iteration_images(iteration: Path) -> list[Image.Image]:
    """A loop iteration folder's images in the order drawn (image j: prompt variation j mod
    their number)."""
    return [Image.open(f).convert("RGB") for f in sorted((iteration / "images").glob("*.png"))]


def look_lost(read: list[dict[str, str]], reference: dict[str, str]) -> list[bool]:
    """For each probe reading, whether any attribute differs from the reference's."""
    return [any(r[k] != v for k, v in reference.items()) for r in read]


def attribute_lines(read: list[dict[str, str]], reference: dict[str, str]) -> list[str]:
    """One line per attribute: the share read as the reference's, and what was read instead."""
    lines = []
    for k, v in reference.items():
        others = dict(Counter(r[k] for r in read if r[k] != v))
        lines.append(f"  {k} {np.mean([r[k] == v for r in read]):.3f} {others}")
    return lines


def _sheet(images, asked, read, attributes, reference):  # type: ignore[no-untyped-def]
    """All images in rows of 8 (one pose's 4 seeds side by side); a red bar under those
    whose pose is missed, a yellow bar under those whose look is."""
    from PIL import Image, ImageDraw

    size = images[0].width
    followed = pose_followed(read, asked)
    rows = (len(images) + 7) // 8
    sheet = Image.new("RGB", (8 * size, rows * (size + 4)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, image in enumerate(images):
        x, y = (i % 8) * size, (i // 8) * (size + 4)
        sheet.paste(image.convert("RGB"), (x, y))
        if not followed[i]:
            draw.rectangle([x, y + size, x + size // 2 - 1, y + size + 3], fill="red")
        if any(attributes[i][k] != v for k, v in reference.items()):
            draw.rectangle([x + size // 2, y + size, x + size - 1, y + size + 3], fill="yellow")
    return sheet


if __name__ == "__main__":
    main()
