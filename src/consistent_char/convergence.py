"""`PairwiseDistanceCriterion`: stop when the generated images agree (Section 3.3 of the paper).

The spread of a set of embeddings is their mean pairwise Euclidean distance; the run has
converged when it falls below a threshold, either absolute (``d_conv``) or a fraction of the
spread at iteration 0 (``d_conv_relative``).

Three optional guards (off by default, as the paper has none) keep a loop that trains on its
own images from mistaking a faded character for a consistent one; they use only the embeddings:

- the **anchor** (`anchor_distance`, ``convergence.max_anchor_ratio``): how far an iteration's
  images lie from the centroid of the cluster chosen at iteration 0, the character the loop set
  out to learn, in units of that cluster's cohesion (`anchored`);
- **patience** (`stalled`, ``convergence.patience``): stop when the spread stops falling;
- **the best iteration** (`best_iteration`, ``convergence.return_best``): return the identity
  whose images had the lowest spread among anchored iterations, not the last one.

One guard reads the images themselves: **over-saturation** (`mean_saturation`, `saturated`,
``convergence.max_saturation_rise``). Guidance pushes colours past what the model draws
unguided; a loop that trains on its guided images and samples them with guidance again pushes
them further each round, until the images wash out into a few saturated colours, which are
uniform enough to pass the spread test. An iteration whose mean colour saturation has risen more
than the allowed fraction above iteration 0's can neither converge nor be returned as the best.

With prompt variations, `PerVariationCriterion` (``convergence.per_variation``) measures the
spread of each variation's images apart and averages them: the paper's criterion applied to each
prompt, so the settings the variations ask for do not count as disagreement.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from consistent_char.interfaces import (
    MAX_ITERATIONS_REACHED,
    ConvergenceCriterion,
    IterationRecord,
)

logger = logging.getLogger(__name__)

__all__ = [
    "PairwiseDistanceCriterion",
    "PerVariationCriterion",
    "anchor_distance",
    "anchored",
    "best_iteration",
    "mean_pairwise_distance",
    "mean_saturation",
    "saturated",
    "final_stop_reason",
    "stalled",
    "stop_reason",
]

# Rows of the (rows, N, D) float64 difference block computed at once: bounds memory at ~32 MiB.
_BLOCK_ELEMENTS = 1 << 22


def mean_pairwise_distance(embeddings: np.ndarray) -> float:
    """Mean Euclidean distance over all N(N-1)/2 pairs of rows, accumulated in float64.

    Differences are formed explicitly (not through the ``|a|² + |b|² - 2ab`` expansion), so
    identical rows are exactly 0 apart.

    Example:
        >>> mean_pairwise_distance(np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]]))
        3.3333333333333335
    """
    if not isinstance(embeddings, np.ndarray):
        raise TypeError(f"embeddings must be a numpy array, got {type(embeddings).__name__}")
    if embeddings.ndim != 2 or embeddings.shape[1] < 1:
        raise ValueError(f"embeddings must have shape (N, D), got {embeddings.shape}")
    n = embeddings.shape[0]
    if n < 2:
        raise ValueError(f"the spread needs at least 2 embeddings, got {n}")
    x = embeddings.astype(np.float64)
    if not np.isfinite(x).all():
        raise ValueError("embeddings must be finite (found NaN or inf)")
    rows = max(1, _BLOCK_ELEMENTS // (n * x.shape[1]))
    total = 0.0
    for start in range(0, n - 1, rows):
        stop = min(start + rows, n - 1)
        # Row i is compared with rows j > i only: each pair once.
        diff = x[start:stop, None, :] - x[None, :, :]
        dist = np.sqrt((diff * diff).sum(axis=-1))
        upper = np.arange(n)[None, :] > np.arange(start, stop)[:, None]
        total += float(dist[upper].sum())
    return total / (n * (n - 1) / 2)


def _check_threshold(name: str, value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
        raise ValueError(f"{name} must be a number or None, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class PairwiseDistanceCriterion:
    """Converged when the mean pairwise Euclidean distance of the embeddings is below a threshold.

    Exactly one of the two thresholds is set:

    - ``d_conv``: an absolute distance (in the embedder's units);
    - ``d_conv_relative``: a fraction in [0, 1] of the spread at iteration 0. Iteration 0 is
      its own reference, so this mode never stops at iteration 0.

    A threshold of 0 never converges (the loop runs all its iterations).

    Args:
        d_conv: Absolute threshold, >= 0.
        d_conv_relative: Relative threshold, in [0, 1].

    Example:
        >>> criterion = PairwiseDistanceCriterion(d_conv_relative=0.6)
        >>> x0 = np.array([[0.0, 0.0], [4.0, 0.0]])  # spread 4: the reference
        >>> criterion.threshold([criterion.spread(x0)])
        2.4
        >>> criterion.spread(x0 / 2) < criterion.threshold([4.0, 2.0])
        True
    """

    d_conv: float | None = None
    d_conv_relative: float | None = None

    def __post_init__(self) -> None:
        if (self.d_conv is None) == (self.d_conv_relative is None):
            raise ValueError(
                "exactly one of d_conv (absolute distance) and d_conv_relative (fraction of "
                f"iteration 0's spread) must be set, got d_conv={self.d_conv!r} and "
                f"d_conv_relative={self.d_conv_relative!r}"
            )
        _check_threshold("d_conv", self.d_conv)
        _check_threshold("d_conv_relative", self.d_conv_relative)
        if self.d_conv_relative is not None and self.d_conv_relative > 1:
            raise ValueError(
                f"d_conv_relative must be in [0, 1] (a fraction of the first spread), got "
                f"{self.d_conv_relative!r}"
            )

    @property
    def relative(self) -> bool:
        """True when the threshold scales the first spread."""
        return self.d_conv_relative is not None

    def spread(self, embeddings: np.ndarray) -> float:
        """Mean pairwise Euclidean distance over all N(N-1)/2 pairs (float64 accumulation)."""
        return mean_pairwise_distance(embeddings)

    def threshold(self, spreads: Sequence[float]) -> float:
        """``d_conv``, or ``d_conv_relative * spreads[0]``.

        Args:
            spreads: Spreads of all iterations so far, the current one last (only the first is
                read, and only in the relative mode).

        Raises:
            ValueError: Relative mode with no spreads.
        """
        if self.d_conv is not None:
            return float(self.d_conv)
        if len(spreads) == 0:
            raise ValueError(
                "a relative threshold (d_conv_relative) needs the spread of iteration 0; "
                "got no spreads"
            )
        assert self.d_conv_relative is not None
        return float(self.d_conv_relative) * float(spreads[0])

    def converged(self, embeddings: np.ndarray, history: Sequence[IterationRecord]) -> bool:
        """True when ``spread(embeddings) < threshold(...)``.

        Args:
            embeddings: (N, D) embeddings of this iteration's images.
            history: Records of the earlier iterations (their ``spread`` fields); this
                iteration's spread is appended after them.
        """
        current = self.spread(embeddings)
        spreads = [float(record.spread) for record in history] + [current]
        threshold = self.threshold(spreads)
        done = current < threshold
        logger.debug("spread %.6g, threshold %.6g, converged %s", current, threshold, done)
        return done


@dataclass(frozen=True)
class PerVariationCriterion:
    """`inner`'s criterion on each prompt variation's images apart: the spread is the mean of
    the variations' own spreads, the threshold is `inner`'s.

    Args:
        inner: The criterion applied within each variation (e.g. `PairwiseDistanceCriterion`).
        variations: Image j's variation (any hashable label), one per image; each variation
            needs at least two images.

    Example:
        >>> inner = PairwiseDistanceCriterion(d_conv=1.0)
        >>> x = np.array([[0.0, 0.0], [0.0, 0.0], [5.0, 0.0], [5.0, 0.0]])
        >>> per_variation = PerVariationCriterion(inner, ("day", "day", "night", "night"))
        >>> inner.spread(x) > 2, per_variation.spread(x)
        (True, 0.0)
    """

    inner: ConvergenceCriterion
    variations: tuple[str, ...]

    def __post_init__(self) -> None:
        counts = dict(Counter(self.variations))
        if not counts or min(counts.values()) < 2:
            raise ValueError(
                f"each prompt variation needs at least 2 images for its spread, got {counts}"
            )

    def spread(self, embeddings: np.ndarray) -> float:
        """The mean over variations of `inner.spread` of that variation's rows."""
        if len(embeddings) != len(self.variations):
            raise ValueError(
                f"{len(embeddings)} embeddings for {len(self.variations)} image variations"
            )
        labels = np.asarray(self.variations)
        groups = dict.fromkeys(self.variations)  # in first-seen order, for a fixed sum order
        return float(np.mean([self.inner.spread(embeddings[labels == v]) for v in groups]))

    def threshold(self, spreads: Sequence[float]) -> float:
        """`inner`'s threshold for these spreads."""
        return float(self.inner.threshold(spreads))

    def converged(self, embeddings: np.ndarray, history: Sequence[IterationRecord]) -> bool:
        """True when the per-variation spread is below the threshold."""
        current = self.spread(embeddings)
        return current < self.threshold([float(r.spread) for r in history] + [current])


def mean_saturation(images: Sequence[Image.Image]) -> float:
    """Mean HSV saturation of the images' pixels, from 0 (grey) to 1 (pure colours).

    Example:
        >>> grey, red = Image.new("RGB", (4, 4), (90, 90, 90)), Image.new("RGB", (4, 4), "red")
        >>> mean_saturation([grey]), mean_saturation([red]), mean_saturation([grey, red])
        (0.0, 1.0, 0.5)
    """
    if len(images) == 0:
        raise ValueError("mean_saturation needs at least one image")
    means = [np.asarray(im.convert("HSV"), dtype=np.float64)[..., 1].mean() / 255 for im in images]
    return float(np.mean(means))


def saturated(record: IterationRecord, base: float | None, rise: float | None) -> bool:
    """True when the guard is on (`rise` not ``None``) and the iteration's images are more than
    ``1 + rise`` times as saturated as iteration 0's (`base`); never for iteration 0 itself, nor
    when either saturation is unknown (a run recorded before it was measured).

    Example:
        >>> r = IterationRecord(2, "p", [0], spread=1.0, threshold=1.0, converged=False)
        >>> r.saturation = 0.6
        >>> saturated(r, 0.5, 0.15), saturated(r, 0.5, 0.25), saturated(r, 0.5, None)
        (True, False, False)
    """
    if rise is None or base is None or record.saturation is None or record.iteration == 0:
        return False
    return record.saturation > (1.0 + rise) * base


def anchor_distance(embeddings: np.ndarray, centroid: np.ndarray) -> float:
    """Mean Euclidean distance of the rows of `embeddings` to `centroid`.

    Example:
        >>> anchor_distance(np.array([[0.0, 3.0], [4.0, 0.0]]), np.zeros(2))
        3.5
    """
    diff = np.asarray(embeddings, dtype=np.float64) - np.asarray(centroid, dtype=np.float64)
    return float(np.sqrt((diff * diff).sum(axis=1)).mean())


def anchored(record: IterationRecord, cohesion: float | None, ratio: float | None) -> bool:
    """True when `ratio` is ``None`` (no guard), or when the iteration's `anchor_distance` is at
    most ``ratio`` times iteration 0's chosen-cluster `cohesion`."""
    if ratio is None:
        return True
    if record.anchor_distance is None or cohesion is None or not math.isfinite(cohesion):
        return False
    return record.anchor_distance <= ratio * cohesion


def stalled(spreads: Sequence[float], patience: int | None) -> bool:
    """True when the last `patience` spreads are all at or above the lowest one before them.

    `spreads` are those of iterations 1, 2, ... (iteration 0, before any identity, is left out).

    Example:
        >>> stalled([5.0, 4.0, 4.5, 4.2], patience=2), stalled([5.0, 4.0, 3.9], patience=2)
        (True, False)
    """
    if patience is None or len(spreads) <= patience:
        return False
    best_before = min(spreads[:-patience])
    return min(spreads[-patience:]) >= best_before


def stop_reason(
    history: Sequence[IterationRecord], patience: int | None, max_saturation_rise: float | None
) -> str | None:
    """Why the loop stops after the last iteration of `history` without clustering it, or
    ``None`` when it goes on: ``"converged"``, ``"images over-saturated"`` or ``"no lower
    spread in P iterations"``, checked in that order. Iteration 0 never stops the loop.

    Example:
        >>> h = [IterationRecord(i, "p", [0], s, 1.0, False) for i, s in enumerate([9, 4, 5, 6])]
        >>> stop_reason(h, patience=2, max_saturation_rise=None)
        'no lower spread in 2 iterations'
        >>> stop_reason(h[:3], patience=2, max_saturation_rise=None) is None
        True
    """
    last = history[-1]
    if last.iteration == 0:
        return None
    if last.converged:
        return "converged"
    if saturated(last, history[0].saturation, max_saturation_rise):
        return "images over-saturated"
    if stalled([r.spread for r in history[1:]], patience):
        return f"no lower spread in {patience} iterations"
    return None


def final_stop_reason(
    history: Sequence[IterationRecord], patience: int | None, max_saturation_rise: float | None
) -> str:
    """Why a finished loop ended: `stop_reason` of its last iteration, or ``"max_iterations
    reached"`` when none of its rules stopped it (it clustered and refined its last iteration).

    Example:
        >>> h = [IterationRecord(i, "p", [0], s, 1.0, False) for i, s in enumerate([9, 4, 3])]
        >>> final_stop_reason(h, patience=2, max_saturation_rise=None)
        'max_iterations reached'
    """
    reason = stop_reason(history, patience, max_saturation_rise) if history else None
    return reason or MAX_ITERATIONS_REACHED


def best_iteration(
    history: Sequence[IterationRecord],
    cohesion: float | None,
    ratio: float | None,
    max_saturation_rise: float | None = None,
) -> int | None:
    """The iteration (>= 1) whose images had the lowest spread among those `anchored` admits
    and not `saturated`, or ``None`` if there is none. Its images were drawn by the identity
    learned at the iteration before it."""
    base = history[0].saturation if history else None
    candidates = [
        r
        for r in history
        if r.iteration >= 1
        and anchored(r, cohesion, ratio)
        and not saturated(r, base, max_saturation_rise)
    ]
    if not candidates:
        return None
    return min(candidates, key=lambda r: r.spread).iteration
