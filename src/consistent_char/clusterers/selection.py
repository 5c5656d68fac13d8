"""Choosing the cluster to learn from (Section 3.2 of the paper): the most cohesive large one.

``cohesion`` of a cluster is the mean Euclidean distance of its members to its centroid (lower
is tighter). Clusters with fewer than ``d_min_c`` members are dropped; of the rest, the most
cohesive is chosen. If none is large enough, the largest cluster is taken and a warning logged.

Beyond the paper, ``core_size`` m ranks the clusters by their densest m members instead (the
member whose m - 1 nearest fellow members lie closest, with those members: `densest_core`), and
the refinement trains on that core alone. A cluster's mean distance to its centroid is low for
a small cluster of similar-looking but different characters as much as for one character drawn
several times; the densest few members of a cluster are far more often one character. With
``groups`` (the images' prompt variations) each core takes its members from every group in turn.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from consistent_char.clusterers.faiss_kmeans import check_embeddings
from consistent_char.interfaces import ChoiceReason

logger = logging.getLogger(__name__)

__all__ = ["ClusterChoice", "choose_cluster", "cohesion", "densest_core", "saved_members"]


@dataclass(frozen=True)
class ClusterChoice:
    """The chosen cluster ``c*`` and what it was chosen among.

    Attributes:
        index: Label of the chosen cluster.
        cohesion: Its mean distance to its centroid (with a core: the core's tightness).
        sizes: Members per cluster, indexed by label.
        cohesions: Cohesion per cluster, indexed by label (NaN for an empty cluster; with a
            core size, each cluster's core tightness, NaN for one too small to rank).
        reason: ``"most_cohesive"``, or ``"largest_fallback"`` when no cluster had ``d_min_c``
            members.
        core: With a core size: the indices (ascending) of the chosen cluster's densest
            members, the images to learn from; ``None``: the whole cluster.
    """

    index: int
    cohesion: float
    sizes: list[int]
    cohesions: list[float]
    reason: ChoiceReason
    core: list[int] | None = None

    def members(self, labels: np.ndarray) -> np.ndarray:
        """Indices (int64, ascending) of the points to learn from: the core if there is one,
        else the whole chosen cluster."""
        if self.core is not None:
            return np.asarray(self.core, dtype=np.int64)
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


def densest_core(
    embeddings: np.ndarray, members: np.ndarray, size: int, groups: np.ndarray | None = None
) -> tuple[float, np.ndarray]:
    """The densest `size` of `members`: the member whose ``size - 1`` nearest fellow members
    lie closest (ties: the lower index), with those members.

    With `groups`, the core spans the groups: around each candidate member, its fellows are
    taken nearest of each group first, then second nearest of each group, and so on. The loop
    passes each image's prompt variation: the nearest neighbours of an image are mostly drawn
    in its own setting, and a refinement on one setting's images learns the character for
    that setting only.

    Args:
        embeddings: (N, D) floats.
        members: Indices into `embeddings` (at least one).
        size: Points in the core (>= 1; at most ``len(members)`` are returned).
        groups: (N,) group labels of all the embeddings, or ``None``.

    Returns:
        ``(tightness, core)``: the mean distance from that member to the others in the core
        (0 for a core of one), and the core's indices, ascending.

    Example:
        >>> x = np.array([[0.0], [0.1], [0.2], [3.0], [9.0]])
        >>> tightness, core = densest_core(x, np.arange(5), 3)
        >>> round(tightness, 3), core.tolist()
        (0.1, [0, 1, 2])
        >>> densest_core(x, np.arange(5), 2, groups=np.array([0, 0, 0, 1, 1]))[1].tolist()
        [2, 3]
    """
    x = check_embeddings(embeddings).astype(np.float64)
    pool = np.asarray(members, dtype=np.int64)
    if pool.ndim != 1 or pool.size == 0:
        raise ValueError(f"members must be a non-empty 1-D array of indices, got {pool.shape}")
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
        raise ValueError(f"size must be an integer >= 1, got {size!r}")
    m = min(int(size), pool.size)
    d = np.linalg.norm(x[pool][:, None] - x[pool][None], axis=-1)
    if groups is None:
        # Row i sorted: 0 (itself) first, then its nearest fellow members.
        order = np.argsort(d, axis=1, kind="stable")
    else:
        labels = np.asarray(groups)
        if labels.shape != (x.shape[0],):
            raise ValueError(f"groups must have shape ({x.shape[0]},), got {labels.shape}")
        order = np.stack([_round_robin(row, labels[pool]) for row in d])
    core_rows = order[:, :m]
    near = np.take_along_axis(d, core_rows[:, 1:], axis=1)
    tightness = near.mean(axis=1) if m > 1 else np.zeros(pool.size)
    centre = int(np.argmin(tightness))
    return float(tightness[centre]), np.sort(pool[core_rows[centre]])


def _round_robin(distances: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Positions ordered by their rank within their group (by distance), then by distance:
    the nearest of every group first, then the second nearest of every group, ..."""
    by_distance = np.argsort(distances, kind="stable")
    rank = np.empty(distances.size, dtype=np.int64)
    seen: dict[Any, int] = {}
    for position in by_distance:
        key = groups[position].item()
        rank[position] = seen.get(key, 0)
        seen[key] = rank[position] + 1
    return np.lexsort((distances, rank))


def choose_cluster(
    embeddings: np.ndarray,
    labels: np.ndarray,
    centroids: np.ndarray,
    d_min_c: int,
    core_size: int | None = None,
    groups: np.ndarray | None = None,
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
        core_size: Rank the clusters by the tightness of their densest `core_size` members
            (`densest_core`; a cluster needs that many members too) and learn from that core
            only (``None``: the paper's choice, the whole most cohesive cluster).
        groups: (N,) group labels (the images' prompt variations): the cores span the groups
            (`densest_core`). Only with `core_size`.

    Example:
        >>> x = np.array([[0.0], [0.1], [0.2], [5.0], [5.01]])
        >>> labels = np.array([0, 0, 0, 1, 1])
        >>> centroids = np.array([[0.1], [5.005]])
        >>> choose_cluster(x, labels, centroids, d_min_c=3).index  # cluster 1 is tighter but small
        0
        >>> choose_cluster(x, labels, centroids, d_min_c=2).index
        1
        >>> choose_cluster(x, labels, centroids, d_min_c=2, core_size=2).core
        [3, 4]
    """
    _check_choice_settings(d_min_c, core_size, groups)
    cohesions = cohesion(embeddings, labels, centroids)
    k = cohesions.shape[0]
    labels = np.asarray(labels, dtype=np.int64)
    sizes = np.bincount(labels, minlength=k)
    smallest = max(int(d_min_c), int(core_size or 1), 1)
    cores: dict[int, np.ndarray] = {}
    if core_size is not None:
        cohesions, cores = _core_tightness(embeddings, labels, sizes, smallest, core_size, groups)
    index, reason = _pick(sizes, cohesions, smallest)
    if reason == "largest_fallback":
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
        core=None if core_size is None else cores[index].tolist(),
    )


def _check_choice_settings(d_min_c: Any, core_size: Any, groups: Any) -> None:
    if isinstance(d_min_c, bool) or not isinstance(d_min_c, int | np.integer) or d_min_c < 0:
        raise ValueError(f"d_min_c must be an integer >= 0, got {d_min_c!r}")
    if core_size is not None and (
        isinstance(core_size, bool) or not isinstance(core_size, int | np.integer) or core_size < 1
    ):
        raise ValueError(f"core_size must be None or an integer >= 1, got {core_size!r}")
    if groups is not None and core_size is None:
        raise ValueError("groups shape the core: give core_size too")


def _core_tightness(
    embeddings: np.ndarray,
    labels: np.ndarray,
    sizes: np.ndarray,
    smallest: int,
    core_size: int,
    groups: np.ndarray | None,
) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Each cluster's core tightness and core (`densest_core`); NaN for a cluster too small.

    When no cluster is large enough, the largest ones are still ranked, for the fallback.
    """
    tightness = np.full(sizes.shape[0], np.nan)
    cores: dict[int, np.ndarray] = {}
    for c in np.flatnonzero(sizes >= min(smallest, int(sizes.max()))):
        tightness[c], cores[int(c)] = densest_core(
            embeddings, np.flatnonzero(labels == c), core_size, groups
        )
    return tightness, cores


def _pick(sizes: np.ndarray, cohesions: np.ndarray, smallest: int) -> tuple[int, ChoiceReason]:
    """The most cohesive cluster of at least `smallest` members (ties: the larger, then the
    lower label); if there is none, the largest (ties: the more cohesive, then the lower)."""
    eligible = np.flatnonzero(sizes >= smallest)
    if eligible.size:
        # np.lexsort sorts by the last key first: cohesion, then size (descending), then label.
        order = np.lexsort((eligible, -sizes[eligible], cohesions[eligible]))
        return int(eligible[order[0]]), "most_cohesive"
    nonempty = np.flatnonzero(sizes > 0)
    order = np.lexsort((nonempty, cohesions[nonempty], -sizes[nonempty]))
    return int(nonempty[order[0]]), "largest_fallback"


def saved_members(clustering: Mapping[str, Any]) -> list[int]:
    """The images an iteration learned from, read from its saved clustering (a run folder's
    ``clusters.json``): the core if the choice had one, else the chosen cluster's members.

    Example:
        >>> saved_members({"labels": [0, 1, 1, 0], "chosen": 1})
        [1, 2]
        >>> saved_members({"labels": [0, 1, 1, 1], "chosen": 1, "core": [1, 3]})
        [1, 3]
    """
    core = clustering.get("core")
    if core is not None:
        return [int(j) for j in core]
    chosen = clustering["chosen"]
    return [j for j, label in enumerate(clustering["labels"]) if label == chosen]
