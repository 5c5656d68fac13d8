"""Choosing the cluster to learn from (Section 3.2 of the paper): the most cohesive large one.

``cohesion`` of a cluster is the mean Euclidean distance of its members to its centroid (lower
is tighter). Clusters with fewer than ``d_min_c`` members are dropped; of the rest, the most
cohesive is chosen. If none is large enough, the largest cluster is taken and a warning logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from consistent_char.clusterers.faiss_kmeans import check_embeddings
from consistent_char.interfaces import ChoiceReason

logger = logging.getLogger(__name__)

__all__ = ["ClusterChoice", "choose_cluster", "cohesion"]


@dataclass(frozen=True)
class ClusterChoice:
    """The chosen cluster ``c*`` and what it was chosen among.

    Attributes:
        index: Label of the chosen cluster.
        cohesion: Its mean distance to its centroid.
        sizes: Members per cluster, indexed by label.
        cohesions: Cohesion per cluster, indexed by label (NaN for an empty cluster).
        reason: ``"most_cohesive"``, or ``"largest_fallback"`` when no cluster had ``d_min_c``
            members.
    """

    index: int
    cohesion: float
    sizes: list[int]
    cohesions: list[float]
    reason: ChoiceReason

    def members(self, labels: np.ndarray) -> np.ndarray:
        """Indices (int64, ascending) of the points in the chosen cluster."""
        return np.flatnonzero(np.asarray(labels) == self.index).astype(np.int64)


def _check_partition(
    embeddings: np.ndarray, labels: np.ndarray, centroids: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = check_embeddings(embeddings)
    labels = np.asarray(labels)
    centroids = np.asarray(centroids)
    if centroids.ndim != 2 or centroids.shape[0] < 1 or centroids.shape[1] != x.shape[1]:
        raise ValueError(
            f"centroids must have shape (k, {x.shape[1]}) to match the embeddings, "
            f"got {centroids.shape}"
        )
    k = centroids.shape[0]
    if labels.shape != (x.shape[0],):
        raise ValueError(f"labels must have shape ({x.shape[0]},), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(
            f"labels must be in [0, {k}) for {k} centroids, got values in "
            f"[{labels.min()}, {labels.max()}]"
        )
    return x.astype(np.float64), labels.astype(np.int64), centroids.astype(np.float64)


def cohesion(embeddings: np.ndarray, labels: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Mean Euclidean distance of each cluster's members to its centroid.

    Args:
        embeddings: (N, D) floats.
        labels: (N,) integer labels in [0, k).
        centroids: (k, D) floats.

    Returns:
        float64 array of shape (k,); NaN for a cluster without members.

    Example:
        >>> x = np.array([[0.0, 0.0], [2.0, 0.0], [10.0, 0.0]])
        >>> cohesion(x, np.array([0, 0, 1]), np.array([[1.0, 0.0], [10.0, 0.0]])).tolist()
        [1.0, 0.0]
    """
    x, labels, centroids = _check_partition(embeddings, labels, centroids)
    k = centroids.shape[0]
    distances = np.linalg.norm(x - centroids[labels], axis=1)
    sizes = np.bincount(labels, minlength=k)
    sums = np.bincount(labels, weights=distances, minlength=k)
    out = np.full(k, np.nan)
    np.divide(sums, sizes, out=out, where=sizes > 0)
    return out


def choose_cluster(
    embeddings: np.ndarray, labels: np.ndarray, centroids: np.ndarray, d_min_c: int
) -> ClusterChoice:
    """Picks ``c*``: of the clusters with at least `d_min_c` members, the most cohesive.

    Ties in cohesion go to the larger cluster, then to the lower label. When no cluster has
    `d_min_c` members, the largest cluster is chosen (ties: the more cohesive, then the lower
    label), a warning is logged and ``reason`` is ``"largest_fallback"``.

    Args:
        embeddings: (N, D) floats.
        labels: (N,) integer labels in [0, k).
        centroids: (k, D) floats.
        d_min_c: Minimum cluster size (>= 0; empty clusters are never eligible).

    Returns:
        The `ClusterChoice`.

    Example:
        >>> x = np.array([[0.0], [0.1], [0.2], [5.0], [5.01]])
        >>> labels = np.array([0, 0, 0, 1, 1])
        >>> centroids = np.array([[0.1], [5.005]])
        >>> choose_cluster(x, labels, centroids, d_min_c=3).index  # cluster 1 is tighter but small
        0
        >>> choose_cluster(x, labels, centroids, d_min_c=2).index
        1
    """
    if isinstance(d_min_c, bool) or not isinstance(d_min_c, int | np.integer) or d_min_c < 0:
        raise ValueError(f"d_min_c must be an integer >= 0, got {d_min_c!r}")
    cohesions = cohesion(embeddings, labels, centroids)
    k = cohesions.shape[0]
    sizes = np.bincount(np.asarray(labels, dtype=np.int64), minlength=k)
    eligible = np.flatnonzero(sizes >= max(int(d_min_c), 1))
    reason: ChoiceReason
    if eligible.size:
        # np.lexsort sorts by the last key first: cohesion, then size (descending), then label.
        order = np.lexsort((eligible, -sizes[eligible], cohesions[eligible]))
        index = int(eligible[order[0]])
        reason = "most_cohesive"
    else:
        nonempty = np.flatnonzero(sizes > 0)
        order = np.lexsort((nonempty, cohesions[nonempty], -sizes[nonempty]))
        index = int(nonempty[order[0]])
        reason = "largest_fallback"
        logger.warning(
            "no cluster has d_min_c=%d members (sizes %s); taking the largest, cluster %d "
            "with %d members",
            d_min_c, sizes.tolist(), index, sizes[index],
        )  # fmt: skip
    return ClusterChoice(
        index=index,
        cohesion=float(cohesions[index]),
        sizes=[int(s) for s in sizes],
        cohesions=[float(c) for c in cohesions],
        reason=reason,
    )
