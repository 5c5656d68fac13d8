"""Experiment: does an identity learned from creatures in many poses keep its look under the
pose ControlNet better than the loop's own identity (learned from centred, upright creatures)?

Runs `extract "a creature" --model toy` with the refiner given, besides each training image,
`--copies` copies moved, scaled and leaned about the creature's feet (the pose map's ranges),
then compare with `consistent-char eval toy-apps --quick --identity RUN/identity`.

    python research/apps/pose_augmented_identity.py --out RUN [--copies 3] \
        [--roll] [--through-controlnet] [--seed L]

``--roll``: the copies are only moved sideways, wrapping around (ToyWorld's scenes are
horizontal bands, so nothing is filled in). ``--through-controlnet``: refine through the pose
ControlNet, each copy under the pose map the pose probe reads on it, so that the ControlNet,
not the LoRA, explains where the creature stands.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from consistent_char.config import ExtractorConfig
from consistent_char.extractor import IterativeIdentityExtractor
from consistent_char.toy.pose import POSE_RANGES, REFINE_THROUGH_CONTROLNET


def posed(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """`image` with its creature moved, scaled and leaned about its feet (at 0.5, 0.96)."""
    w, h = image.size
    fx, fy = 0.5 * w, 0.96 * h
    scale = rng.uniform(*POSE_RANGES["scale"])
    dx = (rng.uniform(*POSE_RANGES["x"]) - 0.5) * w
    angle = math.radians(rng.uniform(*POSE_RANGES["tilt"]))
    # Output pixel p comes from input fx + R(-angle) (p - feet') / scale, feet' = feet + (dx, 0).
    cos, sin = math.cos(angle), math.sin(angle)
    a, b = cos / scale, -sin / scale
    d, e = sin / scale, cos / scale
    ox, oy = fx + dx, fy
    c = fx - a * ox - b * oy
    f = fy - d * ox - e * oy
    fill = image.getpixel((0, 0))
    return image.transform(
        image.size,
        Image.Transform.AFFINE,
        (a, b, c, d, e, f),
        Image.Resampling.BICUBIC,
        fillcolor=fill,
    )


def rolled(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """`image` moved sideways to an x from the pose ranges, wrapping around."""
    shift = round((rng.uniform(*POSE_RANGES["x"]) - 0.5) * image.width)
    return Image.fromarray(np.roll(np.asarray(image), shift, axis=1))


class PoseAugmentingRefiner:
    """Wraps a refiner: each call trains on the images and `copies` posed copies of each."""

    def __init__(self, inner: Any, copies: int, roll: bool = False) -> None:
        self.inner, self.copies = inner, copies
        self.move = rolled if roll else posed

    def refine(
        self, identity: Any, images: Sequence[Image.Image], captions: Sequence[str], *, seed: int
    ) -> Any:
        rng = np.random.default_rng(seed)
        more = [self.move(im, rng) for im in images for _ in range(self.copies)]
        more_captions = [c for c in captions for _ in range(self.copies)]
        return self.inner.refine(identity, [*images, *more], [*captions, *more_captions], seed=seed)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--copies", type=int, default=3)
    parser.add_argument("--roll", action="store_true")
    parser.add_argument("--through-controlnet", action="store_true")
    parser.add_argument("--seed", type=int, default=0, help="the loop's seed")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config: dict[str, Any] = {"model": "toy", "seed": args.seed}
    if args.through_controlnet:
        config["refiner"] = dict(REFINE_THROUGH_CONTROLNET)
    extractor = IterativeIdentityExtractor.from_config(ExtractorConfig.build(config))
    extractor.refiner = PoseAugmentingRefiner(extractor.refiner, args.copies, args.roll)
    result = extractor.extract("a creature", run_dir=args.out)
    print(f"{result.iterations} iterations ({result.stop_reason})")


if __name__ == "__main__":
    main()
