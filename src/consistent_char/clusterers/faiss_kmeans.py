"""`FaissKMeansClusterer`: k-means with real k-means++ seeding, the iterations run by FAISS."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from consistent_char.clusterers.faiss_gpu import check_faiss_gpu
from consistent_char.config import ClustererConfig

logger = logging.getLogger(__name__)
#: The default settings, from the loop's ``clusterer`` section.
_DEFAULTS = ClustererConfig()

__all__ = ["FaissKMeansClusterer", "check_embeddings", "kmeans_plusplus"]


def check_embeddings(embeddings: np.ndarray, k: int | None = None) -> np.ndarray:
    """Validates a (N, D) float array of finite values (and 1 <= k <= N when `k` is given).

    Returns it as C-contiguous float32, the layout FAISS needs.

    Raises:
        TypeError: Not a numpy array of floating dtype, or `k` not an integer.
        ValueError: Wrong number of dimensions, an empty axis, non-finite values, k out of range.
    """
    if not isinstance(embeddings, np.ndarray):
        raise TypeError(f"embeddings must be a numpy array, got {type(embeddings).__name__}")
    if not np.issubdtype(embeddings.dtype, np.floating):
        raise TypeError(f"embeddings must have a floating dtype, got {embeddings.dtype}")
    if embeddings.ndim != 2 or embeddings.shape[0] < 1 or embeddings.shape[1] < 1:
        raise ValueError(
            f"embeddings must have shape (N, D) with N, D >= 1, got {embeddings.shape}"
        )
    if not np.isfinite(embeddings).all():
        bad = int((~np.isfinite(embeddings)).any(axis=1).sum())
        raise ValueError(
            f"embeddings must be finite; {bad} of {embeddings.shape[0]} rows hold NaN or inf"
        )
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int | np.integer):
            raise TypeError(f"k must be an integer, got {type(k).__name__}")
        if not 1 <= k <= embeddings.shape[0]:
            raise ValueError(
                f"k must be between 1 and the number of embeddings ({embeddings.shape[0]}), got {k}"
            )
    return np.ascontiguousarray(embeddings, dtype=np.float32)


# Below this many multiply-adds per Lloyd iteration (N * k * D), FAISS runs on one OpenMP
# thread: at the paper's size (128 x 6 x 1024) an iteration takes about a millisecond, and on a
# busy machine OpenMP's barrier waits between parallel regions cost far more than that.
_SINGLE_THREAD_WORK = 1 << 26


@contextlib.contextmanager
def _single_thread_if_small(work: int) -> Iterator[None]:
    import faiss

    if work >= _SINGLE_THREAD_WORK:
        yield
        return
    # omp_set_num_threads changes the calling thread's setting only; it is restored after.
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def kmeans_plusplus(
    embeddings: np.ndarray, k: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007): D² sampling of k distinct points.

    The first centre is uniform over the points; each next one is drawn with probability
    proportional to its squared distance to the nearest centre chosen so far. When every
    remaining point coincides with a centre (duplicates), the next one is uniform over the
    points not yet chosen, so the k centres are always k distinct rows.

    Args:
        embeddings: (N, D) float array.
        k: Number of centres, 1 <= k <= N.
        rng: The random generator, e.g. ``np.random.default_rng(seed)``.

    Returns:
        ``(centroids, indices)``: float32 (k, D) rows of `embeddings` and their int64 indices.

    Example:
        >>> x = np.array([[0.0, 0.0], [0.1, 0.0], [10.0, 10.0], [10.1, 10.0]])
        >>> _, idx = kmeans_plusplus(x, 2, np.random.default_rng(0))
        >>> sorted(int(i) // 2 for i in idx)  # one seed in each of the two far-apart pairs
        [0, 1]
    """
    x = check_embeddings(embeddings, k).astype(np.float64)
    n = x.shape[0]
    indices = np.empty(k, dtype=np.int64)
    indices[0] = rng.integers(n)
    closest = ((x - x[indices[0]]) ** 2).sum(axis=1)
    for j in range(1, k):
        closest[indices[:j]] = 0.0  # exact zeros: a chosen point is never drawn again
        total = closest.sum()
        if total > 0.0:
            indices[j] = rng.choice(n, p=closest / total)
        else:
            remaining = np.setdiff1d(np.arange(n), indices[:j])
            indices[j] = remaining[rng.integers(remaining.size)]
        closest = np.minimum(closest, ((x - x[indices[j]]) ** 2).sum(axis=1))
    return x[indices].astype(np.float32), indices


@dataclass(frozen=True)
class FaissKMeansClusterer:
    """k-means as in the paper: k-means++ seeding, then Lloyd iterations by `faiss.Kmeans`.

    Seeding is ours (numpy, from ``np.random.default_rng(seed)``), so the result depends only on
    the embeddings, `k` and `seed`. FAISS runs from those centroids on every point (no
    subsampling) and without its "too few points per centroid" warning, which N = 128, K = 6
    would otherwise trigger.

    Args:
        niter: Lloyd iterations.
        nredo: Seedings tried (each with its own k-means++ draw); the run with the lowest
            k-means objective (sum of squared distances) is kept.
        spherical: Normalise centroids to unit length after each iteration (for cosine
            clustering of L2-normalised embeddings).
        use_gpu: Run on the GPU(s) through a FAISS GPU build (the ``[gpu]`` extra); checked
            by `check_faiss_gpu` when the clusterer is built.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> x = np.concatenate([rng.normal(c, 0.1, (20, 8)) for c in (0.0, 5.0)]).astype(np.float32)
        >>> labels, centroids = FaissKMeansClusterer().cluster(x, k=2, seed=0)
        >>> labels.shape, centroids.shape, len(set(labels[:20])), len(set(labels[20:]))
        ((40,), (2, 8), 1, 1)
    """

    niter: int = _DEFAULTS.niter
    nredo: int = _DEFAULTS.nredo
    spherical: bool = False
    use_gpu: bool = False

    def __post_init__(self) -> None:
        # Checked by the config's own fields, so a keyword and a clusterer.* key say the same.
        ClustererConfig.from_keywords(
            {"niter": self.niter, "nredo": self.nredo, "use_gpu": self.use_gpu},
            "FaissKMeansClusterer",
        )
        # A FAISS without GPU support fails here; a CUDA mismatch with torch is only logged.
        for warning in check_faiss_gpu(use_gpu=self.use_gpu):
            logger.warning(warning)

    def cluster(self, embeddings: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Partitions `embeddings` into `k` clusters.

        Args:
            embeddings: (N, D) finite floats.
            k: Number of clusters, 1 <= k <= N.
            seed: Seed of the k-means++ draws; the same seed gives the same result.

        Returns:
            ``(labels, centroids)``: int64 (N,) labels in [0, k) and float32 (k, D) centroids.
        """
        import faiss

        x = check_embeddings(embeddings, k)
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        n, d = x.shape
        rng = np.random.default_rng(seed)
        best: tuple[float, np.ndarray] | None = None
        with _single_thread_if_small(n * k * d):
            for _ in range(self.nredo):
                init, _ = kmeans_plusplus(x, k, rng)
                km = faiss.Kmeans(
                    d,
                    k,
                    niter=self.niter,
                    nredo=1,
                    spherical=self.spherical,
                    gpu=self.use_gpu,
                    verbose=False,
                    seed=int(rng.integers(2**31 - 1)),
                    min_points_per_centroid=1,
                    max_points_per_centroid=n,
                )
                objective = float(km.train(x, init_centroids=init))
                if best is None or objective < best[0]:
                    best = (objective, np.array(km.centroids, dtype=np.float32))
        assert best is not None
        centroids = best[1]
        labels = self._assign(x, centroids)
        logger.debug(
            "k-means: N=%d D=%d k=%d seed=%d objective=%.6g sizes=%s",
            n, d, k, seed, best[0], np.bincount(labels, minlength=k).tolist(),
        )  # fmt: skip
        return labels, centroids

    def _assign(self, x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
        import faiss

        index = faiss.IndexFlatIP(x.shape[1]) if self.spherical else faiss.IndexFlatL2(x.shape[1])
        index.add(centroids)
        _, nearest = index.search(x, 1)
        return nearest.reshape(-1).astype(np.int64)
