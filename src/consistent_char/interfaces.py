"""The five stages of Algorithm 1 as `typing.Protocol`s, and the data types they exchange.

Any object with the right methods plugs in: no base class to inherit. The conformance suite in
`consistent_char.testing` checks a stage against these contracts (shapes, types, determinism).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from consistent_char.identity import Identity

__all__ = [
    "Clusterer",
    "ConvergenceCriterion",
    "Embedder",
    "ExtractionResult",
    "Generator",
    "Identity",
    "IterationRecord",
    "Refiner",
]


@runtime_checkable
class Generator(Protocol):
    """Draws images from prompts: `S` in Algorithm 1."""

    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        identity: Identity | None = None,
    ) -> list[Image.Image]:
        """Returns one RGB image per prompt; image j is drawn from `seeds[j]` alone.

        With an `identity`, its tokens are known to the text encoders and its LoRA is active for
        this call only; the generator is left as it was afterwards.
        """
        ...


@runtime_checkable
class Embedder(Protocol):
    """Maps images to feature vectors: `E` in Algorithm 1 (DINOv2 in the paper)."""

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Returns a float32 array of shape (len(images), D)."""
        ...


@runtime_checkable
class Clusterer(Protocol):
    """Partitions embeddings into k groups (k-means++ in the paper)."""

    def cluster(self, embeddings: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Returns `(labels, centroids)`: int64 labels of shape (N,) in [0, k) and float32
        centroids of shape (k, D). The same inputs and seed give the same result."""
        ...


@runtime_checkable
class Refiner(Protocol):
    """Teaches the model the look of a set of images: `Θ ← refine(Θ, S[c*])`."""

    def refine(
        self,
        identity: Identity | None,
        images: Sequence[Image.Image],
        captions: Sequence[str],
        *,
        seed: int,
    ) -> Identity:
        """Returns a new identity trained on `images` (with `captions`, which contain the
        identity's token). With an `identity`, training continues from it (warm start); with
        `None`, it starts from fresh tokens and a zero LoRA. The model is left as it was."""
        ...


@runtime_checkable
class ConvergenceCriterion(Protocol):
    """Decides when the generated images agree enough to stop (Section 3.3 of the paper)."""

    def spread(self, embeddings: np.ndarray) -> float:
        """How far apart the images are, e.g. the mean pairwise Euclidean distance."""
        ...

    def threshold(self, spreads: Sequence[float]) -> float:
        """The spread below which the run has converged, given the spreads of all iterations
        so far (the current one last); a relative criterion scales the first of them."""
        ...

    def converged(self, embeddings: np.ndarray, history: Sequence[IterationRecord]) -> bool:
        """True when the spread of `embeddings` is below the threshold."""
        ...


# Why a loop ended when no rule of `consistent_char.convergence` stopped it.
MAX_ITERATIONS_REACHED = "max_iterations reached"

ChoiceReason = Literal["most_cohesive", "largest_fallback"]


@dataclass
class IterationRecord:
    """What one iteration of Algorithm 1 did; the run's history is a list of these."""

    iteration: int
    prompt: str
    seeds: list[int]
    spread: float
    threshold: float
    converged: bool
    cluster_sizes: list[int] = field(default_factory=list)
    # None: an empty cluster (or, with core_size, one too small to hold a core).
    cluster_cohesions: list[float | None] = field(default_factory=list)
    chosen_cluster: int | None = None
    chosen_cohesion: float | None = None
    chosen_reason: ChoiceReason | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    # Mean distance of this iteration's embeddings to the centroid of iteration 0's chosen
    # cluster (None at iteration 0, and for runs written before it was recorded).
    anchor_distance: float | None = None
    # Mean HSV saturation of this iteration's images, 0 to 1 (None when the over-saturation
    # guard is off, and for runs written before it was recorded).
    saturation: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IterationRecord:
        return cls(**data)


@dataclass
class ExtractionResult:
    """The outcome of `IterativeIdentityExtractor.extract`."""

    identity: Identity
    history: list[IterationRecord]
    converged: bool
    run_dir: str | None = None
    # Why the loop ended: "converged", "images over-saturated", "no lower spread in P
    # iterations" or "max_iterations reached".
    stop_reason: str = MAX_ITERATIONS_REACHED

    @property
    def iterations(self) -> int:
        """Number of iterations run (generation steps, including the converged one)."""
        return len(self.history)
