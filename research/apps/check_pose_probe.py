"""The pose probe on fresh renders: does it read every attribute, and the pose within
`POSE_TOLERANCE`, of creatures in wide poses and in ToyWorld's own, drawn by the renderer and
passed through the toy VAE (as every generated image is)?

    python research/apps/check_pose_probe.py [PROBE_DIR] [--n 400]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from PIL import Image

import consistent_char.toy as toy
from consistent_char.toy.pose import POSE, pose_followed, pose_of, sample_posed_record
from consistent_char.toy.probe import IdentityProbe
from consistent_char.toy.world import IDENTITY_ATTRIBUTES, render, sample_record

sys.path.insert(0, ".")  # run from the repository root, as the recipes are
from recipes.toyworld.controlnet import vae_round_trips  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("probe", nargs="?", default=None)
    parser.add_argument("--n", type=int, default=400)
    args = parser.parse_args()
    torch.set_num_threads(1)
    probe = IdentityProbe.from_pretrained(args.probe or toy.pose_probe_dir())
    rng = np.random.default_rng(123)
    draws = {"posed": lambda: sample_posed_record(rng), "toyworld": lambda: sample_record(rng)}
    for name, draw in draws.items():
        records = [draw() for _ in range(args.n)]
        rendered = [render(r) for r in records]
        for how, images in (("rendered", rendered), ("VAE round trip", _round_trips(rendered))):
            _report(f"{name}, {how}", probe, images, records)


def _report(name: str, probe: IdentityProbe, images: list[Image.Image], records: list) -> None:
    read = probe.predict(images)
    identity = np.mean(
        [
            all(p[a] == getattr(r, a) for a in IDENTITY_ATTRIBUTES)
            for p, r in zip(read, records, strict=True)
        ]
    )
    poses, asked = probe.predict_pose(images), pose_of(records)
    errors = dict(zip(POSE, np.abs(poses - asked).mean(0).round(4), strict=True))
    print(
        f"{name}: identity {identity:.3f}, pose within tolerance "
        f"{pose_followed(poses, asked).mean():.3f}, mean errors {errors}"
    )


def _round_trips(images: list[Image.Image]) -> list[Image.Image]:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(toy.model_dir(), subfolder="vae")
    pixels = torch.from_numpy(np.stack([np.asarray(im) for im in images]))
    return [Image.fromarray(a) for a in vae_round_trips(vae, pixels).numpy()]


if __name__ == "__main__":
    main()
