"""Conformance checks for a `Clusterer`: int64 labels in ``[0, k)``, float32 centroids, the same
result for the same seed, and well separated blobs recovered.

Each ``check_clusterer_*`` function runs on its own, on the clusterer (with `sample_blobs` and
k = 3) or on a `ClustererTrial` that gives it other embeddings, k or seed:

    >>> from consistent_char.clusterers import FaissKMeansClusterer
    >>> check_clusterer_separated_blobs(FaissKMeansClusterer())  # raises AssertionError if not
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import numpy as np

from consistent_char.interfaces import Clusterer
from consistent_char.testing.conformance._common import (
    ConformanceCase,
    Trial,
    bind,
    conformance_check,
    fail,
    run_all,
    sample_blobs,
)

__all__ = [
    "CLUSTERER_CHECKS",
    "ClustererTrial",
    "check_clusterer",
    "check_clusterer_centroids",
    "check_clusterer_deterministic",
    "check_clusterer_does_not_modify_input",
    "check_clusterer_k_equals_1",
    "check_clusterer_k_equals_n",
    "check_clusterer_labels",
    "check_clusterer_output_types",
    "check_clusterer_protocol",
    "check_clusterer_separated_blobs",
]


class ClustererTrial(Trial):
    """A clusterer and what its checks cluster; the first clustering is shared.

    Args:
        clusterer: The clusterer.
        embeddings: (N, D) float32 input for the shape and determinism checks (default:
            `sample_blobs`); the k = 1, k = N and blob checks always use `sample_blobs`.
        k: Clusters for the shape and determinism checks (default 3, at most N).
        seed: Seed passed to ``cluster``.
    """

    def __init__(
        self,
        clusterer: Any,
        embeddings: np.ndarray | None = None,
        k: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(clusterer)
        self.x = sample_blobs()[0] if embeddings is None else np.asarray(embeddings)
        self.k = k if k is not None else min(3, self.x.shape[0])
        self.seed = seed
        self.blobs, self.blob_truth = sample_blobs()

    @cached_property
    def output(self) -> Any:
        """What ``cluster(embeddings, k, seed)`` returned, whatever it is."""
        return self.stage.cluster(self.x.copy(), self.k, self.seed)

    def valid(self) -> tuple[np.ndarray, np.ndarray]:
        """The output, for checks that need it to be ``(labels (N,), centroids)``."""
        o = self.output
        if not (isinstance(o, tuple | list) and len(o) == 2):
            fail("needs a (labels, centroids) output; see clusterer_output_types")
        labels, centroids = o
        if not (isinstance(labels, np.ndarray) and labels.shape == (len(self.x),)):
            fail("needs (N,) labels; see clusterer_labels")
        return labels, centroids


clusterer_check = conformance_check(ClustererTrial.of)


@clusterer_check
def check_clusterer_protocol(t: ClustererTrial) -> None:
    """The clusterer has a ``cluster(embeddings, k, seed)`` method."""
    if not isinstance(t.stage, Clusterer):
        fail(f"{type(t.stage).__name__} has no cluster(embeddings, k, seed) method")


@clusterer_check
def check_clusterer_output_types(t: ClustererTrial) -> None:
    """``cluster`` returns a pair of numpy arrays, ``(labels, centroids)``."""
    o = t.output
    if not (isinstance(o, tuple | list) and len(o) == 2):
        fail(f"cluster() must return (labels, centroids), got {type(o).__name__}")
    for what, a in zip(("labels", "centroids"), o, strict=True):
        if not isinstance(a, np.ndarray):
            fail(f"{what} must be a numpy array, got {type(a).__name__}")


@clusterer_check
def check_clusterer_labels(t: ClustererTrial) -> None:
    """Labels are int64, one per embedding, each in ``[0, k)``."""
    labels, _ = t.output
    n, k = len(t.x), t.k
    if labels.dtype != np.int64:
        fail(f"labels must be int64, got {labels.dtype}")
    if labels.shape != (n,):
        fail(f"labels must have shape ({n},), got {labels.shape}")
    if labels.min() < 0 or labels.max() >= k:
        fail(f"labels must be in [0, {k}), got values in [{labels.min()}, {labels.max()}]")


@clusterer_check
def check_clusterer_centroids(t: ClustererTrial) -> None:
    """Centroids are finite float32, one row of width D per cluster."""
    _, centroids = t.output
    k, d = t.k, t.x.shape[1]
    if centroids.dtype != np.float32:
        fail(f"centroids must be float32, got {centroids.dtype}")
    if centroids.shape != (k, d):
        fail(f"centroids must have shape ({k}, {d}), got {centroids.shape}")
    if not np.isfinite(centroids).all():
        fail("centroids contain NaN or inf")


@clusterer_check
def check_clusterer_deterministic(t: ClustererTrial) -> None:
    """The same embeddings and seed give the same labels and centroids, so runs reproduce."""
    labels, centroids = t.valid()
    labels2, centroids2 = t.stage.cluster(t.x.copy(), t.k, t.seed)
    if not np.array_equal(labels, labels2):
        fail(f"the same embeddings and seed={t.seed} gave different labels")
    if not np.array_equal(centroids, centroids2):
        fail(f"the same embeddings and seed={t.seed} gave different centroids")


@clusterer_check
def check_clusterer_does_not_modify_input(t: ClustererTrial) -> None:
    """``cluster`` leaves its input embeddings as they were."""
    copy = t.x.copy()
    t.stage.cluster(copy, t.k, t.seed)
    if not np.array_equal(copy, t.x):
        fail("cluster() modified its input embeddings")


@clusterer_check
def check_clusterer_k_equals_1(t: ClustererTrial) -> None:
    """With k = 1 every point is in cluster 0 and there is one centroid."""
    labels, centroids = t.stage.cluster(t.blobs.copy(), 1, t.seed)
    if not (np.asarray(labels) == 0).all():
        fail("with k=1 every label must be 0")
    if np.asarray(centroids).shape != (1, t.blobs.shape[1]):
        fail(f"with k=1 centroids must have shape (1, D), got {np.asarray(centroids).shape}")


@clusterer_check
def check_clusterer_k_equals_n(t: ClustererTrial) -> None:
    """With k = N distinct points, each point is its own cluster."""
    m = t.blobs.shape[0]
    labels, _ = t.stage.cluster(t.blobs.copy(), m, t.seed)
    if len(np.unique(labels)) != m:
        fail(
            f"with k=N={m} distinct points each must be its own cluster, got "
            f"{len(np.unique(labels))} clusters"
        )


@clusterer_check
def check_clusterer_separated_blobs(t: ClustererTrial) -> None:
    """Well separated blobs come back as one cluster each, with the blob mean as centroid."""
    blobs, truth = t.blobs, t.blob_truth
    n_blobs = int(truth.max()) + 1
    labels, centroids = t.stage.cluster(blobs.copy(), n_blobs, t.seed)
    labels = np.asarray(labels)
    for b in range(n_blobs):
        found = np.unique(labels[truth == b])
        if found.size != 1:
            fail(
                f"blob {b} of {n_blobs} well separated blobs was split into labels {found.tolist()}"
            )
    if len({int(labels[truth == b][0]) for b in range(n_blobs)}) != n_blobs:
        fail(f"{n_blobs} well separated blobs were merged: labels {labels.tolist()}")
    for b in range(n_blobs):
        label = int(labels[truth == b][0])
        mean = blobs[truth == b].mean(axis=0)
        if not np.allclose(np.asarray(centroids)[label], mean, atol=1e-3):
            fail(f"the centroid of cluster {label} is not the mean of its members")


#: The `Clusterer` checks, in the order `check_clusterer` runs them.
CLUSTERER_CHECKS = (
    check_clusterer_protocol,
    check_clusterer_output_types,
    check_clusterer_labels,
    check_clusterer_centroids,
    check_clusterer_deterministic,
    check_clusterer_does_not_modify_input,
    check_clusterer_k_equals_1,
    check_clusterer_k_equals_n,
    check_clusterer_separated_blobs,
)


def clusterer_cases(
    cl: Any, embeddings: np.ndarray | None = None, k: int | None = None, seed: int = 0
) -> list[ConformanceCase]:
    """The `Clusterer` checks bound to one shared `ClustererTrial`."""
    return bind(CLUSTERER_CHECKS, ClustererTrial(cl, embeddings, k, seed))


def check_clusterer(
    cl: Any, embeddings: np.ndarray | None = None, *, k: int | None = None, seed: int = 0
) -> list[str]:
    """Runs the `Clusterer` checks; returns the names of the checks that ran.

    Args:
        cl: The clusterer.
        embeddings: (N, D) float32 input for the shape and determinism checks (default:
            `sample_blobs`); the k = 1, k = N and blob checks always use `sample_blobs`.
        k: Clusters for the shape and determinism checks (default 3, at most N).
        seed: Seed passed to ``cluster``.

    Raises:
        AssertionError: ``[check_name] what went wrong``.

    Example:
        >>> from consistent_char.clusterers import FaissKMeansClusterer
        >>> "clusterer_deterministic" in check_clusterer(FaissKMeansClusterer())
        True
    """
    return run_all(clusterer_cases(cl, embeddings, k, seed))
