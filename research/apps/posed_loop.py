"""Experiment: the loop with its images drawn in many poses, through the pose ControlNet.

The loop's own images stand centred and upright (ToyWorld's poses), so every identity it learns
has only seen that pose. Here each image of every iteration is drawn through ToyWorld's pose
ControlNet with a pose map from `POSE_RANGES` (seeded per image), and the refiner trains
through the same ControlNet (`toy.pose.REFINE_THROUGH_CONTROLNET`). The identity has then seen the
character in many poses, each explained by the ControlNet.

    python research/apps/posed_loop.py --out RUN
    consistent-char eval toy-apps --identity RUN/identity --out DIR
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from consistent_char.config import TOY_MODEL, ExtractorConfig
from consistent_char.control import ControlledGenerator, load_controlnet
from consistent_char.extractor import IterativeIdentityExtractor
from consistent_char.toy.pose import REFINE_THROUGH_CONTROLNET, pose_map, sample_pose


class PosedGenerator:
    """Wraps the loop's generator: every image is drawn through the ControlNet, in a pose drawn
    from its seed (so a resumed run draws the same poses)."""

    def __init__(self, inner: Any, controlled: Any) -> None:
        self.inner, self.controlled = inner, controlled

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def generate(
        self, prompts: Sequence[str], seeds: Sequence[int], identity: Any = None, **kw: Any
    ) -> list[Image.Image]:
        maps = [pose_map(sample_pose(np.random.default_rng([int(s), 7]))) for s in seeds]
        return self.controlled.generate(list(prompts), list(seeds), identity, control_images=maps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    config = ExtractorConfig.build(
        {"model": TOY_MODEL, "device": "cpu", "refiner": REFINE_THROUGH_CONTROLNET}
    )
    extractor = IterativeIdentityExtractor.from_config(config)
    plain = extractor.generator
    controlnet = load_controlnet("toy", device=plain.pipeline.device)
    controlled = ControlledGenerator(plain.pipeline, controlnet, **plain.settings.model_dump())
    extractor.generator = PosedGenerator(plain, controlled)
    resume = (args.out / "state.json").is_file()
    result = extractor.extract("a creature", run_dir=args.out, resume=resume)
    print(f"identity after {result.iterations} iterations ({result.stop_reason})")


if __name__ == "__main__":
    main()
