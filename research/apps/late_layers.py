"""Which of the identity's LoRA layers may stay on in the last steps of a pose-controlled
drawing? `ControlledGenerator(identity_until=F)` switches every LoRA layer off after the first
F of the steps; here the layers whose names contain one of KEEP stay on at `late_scale`.

    python research/apps/late_layers.py IDENTITY '[{"keep": ["attn2.to_k", "attn2.to_v"]}]' \
        [--seed 0] [--reference ...] [--lora-scale 1.2] [--until 0.8]

Each JSON object is one setting: ``keep`` (name fragments) and ``late_scale`` (default: the
LoRA scale). 20 poses × 4 seeds, read by the pose probe, as `pose_settings.py`.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import numpy as np
import torch

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


class LateLayers(ControlledGenerator):
    """`ControlledGenerator` whose step switch leaves the layers named in `keep` on."""

    keep: tuple[str, ...] = ()
    late_scale: float = 0.0

    def _identity_switch(self, adapter: str) -> Any:
        from peft.tuners.lora import LoraLayer

        named = [
            (f"{tag}.{name}", m)
            for tag, model in (
                ("unet", self.pipeline.unet),
                ("controlnet", self.pipeline.controlnet),
            )
            for name, m in model.named_modules()
            if isinstance(m, LoraLayer) and adapter in m.lora_A
        ]
        for _, layer in named:
            layer.set_scale(adapter, self.lora_scale)

        def switch(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if step + 1 == max(1, round(self.identity_until * pipe.num_timesteps)):
                for name, layer in named:
                    kept = any(k in name for k in self.keep)
                    layer.set_scale(adapter, self.late_scale if kept else 0.0)
            return kwargs

        return switch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("identity")
    parser.add_argument("settings", help="a JSON list of settings")
    parser.add_argument("--reference", default=REFERENCE)
    parser.add_argument("--seed", type=int, default=0, help="picks the poses and seeds")
    parser.add_argument("--lora-scale", type=float, default=1.2)
    parser.add_argument("--until", type=float, default=0.8)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    identity = Identity.load(args.identity)
    reference = dict(kv.split("=") for kv in args.reference.split(","))
    probe = IdentityProbe.from_pretrained(toy.pose_probe_dir())
    jobs = pose_jobs(20, 4, args.seed)
    asked = pose_of([j.pose for j in jobs])
    maps = [pose_map(j.pose) for j in jobs]
    seeds = [j.seed for j in jobs]
    tolerance = np.array([POSE_TOLERANCE[k] for k in POSE])
    gen = identity_generator(identity, model=TOY_MODEL, device="cpu")
    controlnet = load_controlnet("toy", device="cpu")
    prompts = [j.prompt("a creature", identity) for j in jobs]
    for setting in json.loads(args.settings):
        controlled = LateLayers(
            gen.pipeline,
            controlnet,
            identity_until=args.until,
            identity_in_controlnet=True,
            **{**gen.settings.model_dump(), "lora_scale": args.lora_scale},
        )
        controlled.keep = tuple(setting.get("keep", ()))
        controlled.late_scale = float(setting.get("late_scale", args.lora_scale))
        images = controlled.generate(prompts, seeds, identity, control_images=maps)
        read = probe.predict_pose(images)
        attributes = probe.predict(images)
        shares = {
            k: round(float(np.mean([a[k] == v for a in attributes])), 2)
            for k, v in reference.items()
        }
        print(
            f"LoRA {args.lora_scale} until {args.until}, late {setting}: "
            f"followed {pose_followed(read, asked).mean():.3f}, "
            f"kept {identity_kept(attributes, reference):.3f}, "
            f"fields {np.round(np.mean(np.abs(read - asked) <= tolerance, 0), 2)}, "
            f"attributes {shares}",
            flush=True,
        )


if __name__ == "__main__":
    main()
