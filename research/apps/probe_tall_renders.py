"""Whether saturation or a wider body turns the pose probe's reading of ToyWorld's tall pink
creature (green top hat, big eyes) on renders: 60 renders on the beach and 60 in the forest,
as rendered, with their colour saturated 1.5 and 2 times, and stretched 15% wider; the shape
each probe reads. With ``--drawn ITER_DIR`` (a loop iteration's folder), also that
iteration's beach images (image j draws scene j mod 5, the beach at 1) as drawn, with their
saturation lowered to 0.6 and 0.3, and blurred.

    python research/apps/probe_tall_renders.py [--drawn bench/default-l11/run/iter_002]
        [--pose-probe DIR]
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter
from pose_settings import iteration_images  # type: ignore[import-not-found]

import consistent_char.toy as toy
from consistent_char.toy.probe import IdentityProbe
from consistent_char.toy.world import render, sample_record


def wider(image: Image.Image, factor: float = 1.15) -> Image.Image:
    w, h = image.size
    stretched = image.resize((int(w * factor), h))
    left = (stretched.size[0] - w) // 2
    return stretched.crop((left, 0, left + w, h))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--drawn", type=Path, default=None)
    parser.add_argument("--pose-probe", default=None, help="another pose probe's folder")
    args = parser.parse_args()
    probes = {
        "pose probe": IdentityProbe.from_pretrained(args.pose_probe or toy.pose_probe_dir()),
        "attribute probe": IdentityProbe.from_pretrained(toy.probe_dir()),
    }
    rng = np.random.default_rng(0)
    look = {"shape": "tall", "color": "pink", "hat": "tophat", "hat_color": "green", "eyes": "big"}
    for scene in ("beach", "forest"):
        renders = [render(sample_record(rng, scene=scene, **look)) for _ in range(60)]
        variants: dict[str, list[Image.Image]] = {
            "as rendered": renders,
            "saturation 1.5": [ImageEnhance.Color(im).enhance(1.5) for im in renders],
            "saturation 2": [ImageEnhance.Color(im).enhance(2.0) for im in renders],
            "15% wider": [wider(im) for im in renders],
        }
        for name, images in variants.items():
            print(f"{scene}, {name}: {_shapes(probes, images)}")
    if args.drawn is not None:
        drawn = iteration_images(args.drawn)[1::5]
        variants = {
            "as drawn": drawn,
            "saturation 0.6": [ImageEnhance.Color(im).enhance(0.6) for im in drawn],
            "saturation 0.3": [ImageEnhance.Color(im).enhance(0.3) for im in drawn],
            "blurred": [im.filter(ImageFilter.GaussianBlur(0.7)) for im in drawn],
        }
        for name, images in variants.items():
            print(f"{args.drawn} beach, {name}: {_shapes(probes, images)}")


def _shapes(probes: dict[str, IdentityProbe], images: list[Image.Image]) -> dict[str, dict]:  # type: ignore[type-arg]
    """How many of `images` each probe reads as each shape."""
    return {k: dict(Counter(r["shape"] for r in p.predict(images))) for k, p in probes.items()}


if __name__ == "__main__":
    main()
