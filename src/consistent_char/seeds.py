"""The loop's seeds: one per image and one per stage, all derived from the run's seed.

Each is drawn from `numpy.random.SeedSequence` over ``[seed, iteration, index]``, so image j of
iteration i is the same whatever N is, and a resumed run draws exactly what the cut one would.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

__all__ = ["StageName", "image_seed", "stage_seed"]

StageName = Literal["generate", "embed", "cluster", "refine"]


def image_seed(seed: int, iteration: int, index: int) -> int:
    """The seed of image `index` of `iteration`: distinct, reproducible, independent of N.

    Example:
        >>> image_seed(0, 1, 2) == image_seed(0, 1, 2) != image_seed(0, 1, 3)
        True
    """
    state = np.random.SeedSequence([seed, iteration, index]).generate_state(1, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


def stage_seed(seed: int, iteration: int, stage: StageName) -> int:
    """The seed of a stage's own randomness (k-means++ seeding, refiner noise) at `iteration`."""
    code = {"generate": 0, "embed": 1, "cluster": 2, "refine": 3}[stage]
    state = np.random.SeedSequence([seed, iteration, 1_000_000 + code]).generate_state(1)
    return int(state[0])
