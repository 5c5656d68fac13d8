"""k-means++ seeding, FAISS k-means and the paper's cluster choice, on embeddings with known
clusters."""

from __future__ import annotations

import logging
import typing

import faiss
import numpy as np
import pytest

from consistent_char.clusterers import (
    ClusterChoice,
    FaissKMeansClusterer,
    choose_cluster,
    cohesion,
    densest_core,
    kmeans_plusplus,
)
from consistent_char.interfaces import ChoiceReason


def gaussian_blobs(
    sizes: list[int], spreads: list[float], dim: int = 16, distance: float = 50.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blobs on the axes, `distance` * sqrt(2) apart: (x float32, labels int64, true means)."""
    rng = np.random.default_rng(seed)
    centres = distance * np.eye(dim)[: len(sizes)]
    parts = [
        c + rng.normal(0, s, (n, dim)) for c, s, n in zip(centres, spreads, sizes, strict=True)
    ]
    x = np.concatenate(parts).astype(np.float32)
    labels = np.repeat(np.arange(len(sizes)), sizes).astype(np.int64)
    means = np.stack([p.mean(axis=0) for p in parts])
    return x, labels, means


# The paper's setting: N = 128 images, K = 6 clusters, d_min_c = 10.
SIZES = [30, 25, 20, 25, 20, 8]
SPREADS = [1.0, 0.6, 0.3, 0.8, 0.5, 0.05]  # blob 5 is the tightest but has 8 < 10 members


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when two labelings group the points identically (up to renaming the labels)."""
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


# ---------------------------------------------------------------------------- k-means++


def test_kmeanspp_seeds_one_point_per_well_separated_blob() -> None:
    # Blobs 141 apart with spreads <= 1 in 16-D: once a blob holds a centre, its points weigh
    # ~2 * 16 * spread² / 141² as much as those of a blob without one (under 0.2% of it).
    x, truth, _ = gaussian_blobs(SIZES, SPREADS, distance=100.0)
    hits = 0
    for seed in range(100):
        _, idx = kmeans_plusplus(x, 6, np.random.default_rng(seed))
        hits += len(set(truth[idx].tolist())) == 6
    assert hits >= 97
    # Uniform seeding, for contrast, covers all six blobs in few draws.
    uniform = sum(
        len(set(truth[np.random.default_rng(s).choice(len(x), 6, replace=False)].tolist())) == 6
        for s in range(100)
    )
    assert uniform <= 20


def test_kmeanspp_draws_proportionally_to_squared_distance() -> None:
    # Three points on a line at 0, 1 and 3. With the first centre at 0, the second is the
    # point at 1 with probability 1 / (1 + 9) and the point at 3 with probability 9 / 10.
    x = np.array([[0.0], [1.0], [3.0]])
    second = []
    for seed in range(3000):
        _, idx = kmeans_plusplus(x, 2, np.random.default_rng(seed))
        if idx[0] == 0:
            second.append(int(idx[1]))
    p_far = np.mean(np.array(second) == 2)
    assert len(second) > 800
    assert abs(p_far - 0.9) < 0.04


def test_kmeanspp_is_deterministic_and_returns_the_chosen_rows() -> None:
    x, _, _ = gaussian_blobs(SIZES, SPREADS)
    c1, i1 = kmeans_plusplus(x, 6, np.random.default_rng(7))
    c2, i2 = kmeans_plusplus(x, 6, np.random.default_rng(7))
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(c1, x[i1])
    assert c1.dtype == np.float32 and i1.dtype == np.int64


def test_kmeanspp_picks_distinct_points_even_with_duplicates() -> None:
    x = np.repeat(np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 0.0]]), 4, axis=0)
    for seed in range(20):
        _, idx = kmeans_plusplus(x, 5, np.random.default_rng(seed))
        assert len(set(idx.tolist())) == 5
        assert len({tuple(r) for r in x[idx].tolist()}) == 3  # every distinct point is used


# ------------------------------------------------------------------------------ k-means


def test_cluster_recovers_known_blobs_deterministically() -> None:
    x, truth, means = gaussian_blobs(SIZES, SPREADS)
    clusterer = FaissKMeansClusterer()
    labels, centroids = clusterer.cluster(x, 6, seed=0)
    assert labels.dtype == np.int64 and labels.shape == (128,)
    assert centroids.dtype == np.float32 and centroids.shape == (6, 16)
    assert same_partition(labels, truth)
    for blob in range(6):
        label = labels[truth == blob][0]
        np.testing.assert_allclose(centroids[label], means[blob], atol=1e-3)
    labels2, centroids2 = clusterer.cluster(x, 6, seed=0)
    np.testing.assert_array_equal(labels, labels2)
    np.testing.assert_array_equal(centroids, centroids2)


def test_faiss_is_given_our_seeds_and_every_point(monkeypatch: pytest.MonkeyPatch) -> None:
    x, _, _ = gaussian_blobs(SIZES, SPREADS)
    seen: list[np.ndarray] = []
    train = faiss.Kmeans.train

    def spy(self: faiss.Kmeans, data: np.ndarray, weights=None, init_centroids=None):  # type: ignore[no-untyped-def]
        seen.append(np.array(init_centroids))
        assert self.cp.min_points_per_centroid == 1
        assert self.cp.max_points_per_centroid * self.k >= len(data)  # no subsampling
        return train(self, data, weights=weights, init_centroids=init_centroids)

    monkeypatch.setattr(faiss.Kmeans, "train", spy)
    FaissKMeansClusterer(niter=5).cluster(x, 6, seed=3)
    expected, _ = kmeans_plusplus(x, 6, np.random.default_rng(3))
    assert len(seen) == 1
    np.testing.assert_array_equal(seen[0], expected)


def test_faiss_lloyd_step_starts_from_our_kmeanspp_seeds() -> None:
    # One Lloyd iteration from our seeds, by hand: assign each point to its nearest seed, move
    # each seed to its points' mean. FAISS ignoring the seeds (its own random init) fails this.
    x, _, _ = gaussian_blobs(SIZES, SPREADS)
    seeds, _ = kmeans_plusplus(x, 6, np.random.default_rng(3))
    nearest = ((x[:, None, :] - seeds[None, :, :]) ** 2).sum(-1).argmin(1)
    expected = np.stack([x[nearest == j].mean(0) for j in range(6)])
    _, centroids = FaissKMeansClusterer(niter=1).cluster(x, 6, seed=3)
    np.testing.assert_allclose(centroids, expected, rtol=1e-5, atol=1e-5)


def test_faiss_thread_setting_is_restored() -> None:
    x, _, _ = gaussian_blobs(SIZES, SPREADS)
    before = faiss.omp_get_max_threads()
    FaissKMeansClusterer().cluster(x, 6, seed=0)
    assert faiss.omp_get_max_threads() == before


def test_no_faiss_warning_for_128_points_and_6_clusters(capfd: pytest.CaptureFixture[str]) -> None:
    x, _, _ = gaussian_blobs(SIZES, SPREADS)
    FaissKMeansClusterer().cluster(x, 6, seed=0)
    captured = capfd.readouterr()
    assert "WARNING" not in captured.err + captured.out


def objective(x: np.ndarray, labels: np.ndarray, centroids: np.ndarray) -> float:
    return float(((x.astype(np.float64) - centroids[labels]) ** 2).sum())


def test_nredo_keeps_the_best_of_several_seedings() -> None:
    # Overlapping blobs: seedings differ in quality. The first of nredo draws is the nredo=1 run.
    x, _, _ = gaussian_blobs([20] * 6, [3.0] * 6, distance=6.0, seed=1)
    one = FaissKMeansClusterer(nredo=1).cluster(x, 6, seed=0)
    best = FaissKMeansClusterer(nredo=8).cluster(x, 6, seed=0)
    assert objective(x, *best) < objective(x, *one)


def test_k_extremes() -> None:
    x, _, _ = gaussian_blobs([5, 5], [0.1, 0.1])
    labels, centroids = FaissKMeansClusterer().cluster(x, 1, seed=0)
    assert (labels == 0).all()
    np.testing.assert_allclose(centroids[0], x.mean(axis=0), atol=1e-4)
    labels, _ = FaissKMeansClusterer().cluster(x, 10, seed=0)
    assert sorted(labels.tolist()) == list(range(10))


@pytest.mark.parametrize(
    ("embeddings", "k", "error", "match"),
    [
        (np.zeros((5, 3), np.float32), 0, ValueError, r"k must be between 1 and .* \(5\), got 0"),
        (np.zeros((5, 3), np.float32), 6, ValueError, r"k must be between 1 and .* \(5\), got 6"),
        (np.zeros(5, np.float32), 1, ValueError, r"shape \(N, D\)"),
        (np.zeros((5, 3), np.int64), 1, TypeError, "floating dtype, got int64"),
        (np.array([[0.0, np.nan], [1.0, 1.0]]), 1, ValueError, "1 of 2 rows hold NaN or inf"),
        ([[0.0, 1.0]], 1, TypeError, "numpy array, got list"),
        (np.zeros((5, 3), np.float32), 2.0, TypeError, "k must be an integer, got float"),
    ],
)
def test_cluster_input_errors(
    embeddings: typing.Any, k: typing.Any, error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        FaissKMeansClusterer().cluster(embeddings, k, seed=0)


def test_clusterer_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="niter = 0: Input should be greater than or equal to 1"):
        FaissKMeansClusterer(niter=0)
    with pytest.raises(ValueError, match="nredo = -1: Input should be greater than or equal to 1"):
        FaissKMeansClusterer(nredo=-1)
    with pytest.raises(ValueError, match="niter = true: expected a number"):
        FaissKMeansClusterer(niter=True)
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got -1"):
        FaissKMeansClusterer().cluster(np.zeros((3, 2), np.float32), 1, seed=-1)
    if faiss.get_num_gpus() == 0:
        with pytest.raises(ValueError, match="use_gpu=True needs faiss-gpu"):
            FaissKMeansClusterer(use_gpu=True)


# ---------------------------------------------------------------------- cohesion & choice


def test_cohesion_by_hand() -> None:
    x = np.array([[0.0, 0.0], [3.0, 4.0], [10.0, 0.0], [10.0, 2.0]])
    labels = np.array([0, 0, 1, 1])
    centroids = np.array([[0.0, 0.0], [10.0, 1.0], [99.0, 99.0]])
    # cluster 0: distances 0 and 5; cluster 1: 1 and 1; cluster 2: empty.
    result = cohesion(x, labels, centroids)
    assert result.dtype == np.float64
    np.testing.assert_array_equal(result[:2], [2.5, 1.0])
    assert np.isnan(result[2])


def test_choice_skips_a_tight_cluster_below_d_min_c() -> None:
    x, truth, means = gaussian_blobs(SIZES, SPREADS)
    choice = choose_cluster(x, truth, means, d_min_c=10)
    assert isinstance(choice, ClusterChoice)
    # Blob 5 (8 members) is the tightest; of the blobs with >= 10 members, blob 2 is.
    assert np.argmin(choice.cohesions) == 5
    assert choice.index == 2 and choice.reason == "most_cohesive"
    assert choice.sizes == SIZES
    assert choice.cohesion == pytest.approx(cohesion(x, truth, means)[2])
    np.testing.assert_array_equal(choice.members(truth), np.flatnonzero(truth == 2))
    # With a lower bar the tight small blob is eligible and wins.
    assert choose_cluster(x, truth, means, d_min_c=8).index == 5


def test_choice_on_faiss_clusters_finds_the_same_blob() -> None:
    x, truth, _ = gaussian_blobs(SIZES, SPREADS)
    labels, centroids = FaissKMeansClusterer().cluster(x, 6, seed=0)
    choice = choose_cluster(x, labels, centroids, d_min_c=10)
    np.testing.assert_array_equal(choice.members(labels), np.flatnonzero(truth == 2))


def test_all_clusters_too_small_falls_back_to_the_largest(caplog: pytest.LogCaptureFixture) -> None:
    x, truth, means = gaussian_blobs(SIZES, SPREADS)
    with caplog.at_level(logging.WARNING, logger="consistent_char.clusterers.selection"):
        choice = choose_cluster(x, truth, means, d_min_c=31)
    assert choice.index == 0 and choice.reason == "largest_fallback"  # 30 members
    assert "no cluster has d_min_c=31 members" in caplog.text


def test_choice_ties_and_empty_clusters() -> None:
    x = np.array([[0.0], [2.0], [10.0], [12.0], [20.0], [22.0], [30.0], [34.0]])
    centroids = np.array([[1.0], [11.0], [21.0], [32.0], [99.0]])
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    # Clusters 0-2 tie (cohesion 1): the lowest label wins among equals.
    choice = choose_cluster(x, labels, centroids, d_min_c=0)
    assert choice.index == 0 and np.isnan(choice.cohesions[4])  # empty: never chosen
    # Equal cohesion, larger size wins.
    x2 = np.array([[0.0], [2.0], [10.0], [12.0], [10.0], [12.0]])
    choice = choose_cluster(x2, np.array([0, 0, 1, 1, 1, 1]), np.array([[1.0], [11.0]]), 1)
    assert choice.index == 1
    # Fallback: equal sizes, the more cohesive wins.
    choice = choose_cluster(x, labels, centroids, d_min_c=5)
    assert choice.index == 0 and choice.reason == "largest_fallback"
    assert choose_cluster(x[6:], np.array([0, 0]), centroids[3:4], 5).cohesion == 2.0


def test_core_size_chooses_the_cluster_with_the_densest_core_and_learns_from_the_core() -> None:
    # Cluster 0: five near-duplicates and five points far out (one character drawn five times
    # among others); cluster 1: ten points evenly spread, none close to another (a mixture).
    # The mixture's mean distance to its centroid is the lower; its densest five are not.
    rng = np.random.default_rng(0)
    duplicates = rng.normal(0.0, 0.01, (5, 2))
    outliers = np.array([[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0], [0.0, -3.0], [2.5, 2.5]])
    angles = np.linspace(0, 2 * np.pi, 10, endpoint=False)
    ring = np.stack([np.cos(angles), np.sin(angles)], axis=1) * 1.5 + 20.0
    x = np.concatenate([duplicates, outliers, ring])
    labels = np.repeat([0, 1], 10)
    centroids = np.stack([x[:10].mean(axis=0), x[10:].mean(axis=0)])
    paper = choose_cluster(x, labels, centroids, d_min_c=5)
    assert paper.index == 1 and paper.core is None
    np.testing.assert_array_equal(paper.members(labels), np.arange(10, 20))
    core = choose_cluster(x, labels, centroids, d_min_c=5, core_size=5)
    assert core.index == 0 and core.core == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(core.members(labels), np.arange(5))
    assert core.cohesion == pytest.approx(densest_core(x, np.arange(10), 5)[0])
    assert core.cohesion < 0.1 < core.cohesions[1]
    # A cluster smaller than the core is never chosen while a large enough one exists.
    assert choose_cluster(x, labels, centroids, d_min_c=1, core_size=11).reason == (
        "largest_fallback"
    )


def test_a_core_spanning_groups_takes_the_nearest_member_of_each_group_in_turn() -> None:
    # One character in three settings (groups 0-2): each setting's images are near-duplicates
    # of each other, and the settings lie 1.0 apart. The densest five are all of one setting;
    # spanning the groups takes each setting's image nearest the centre, then the next ones.
    rng = np.random.default_rng(1)
    settings = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    x = np.concatenate([s + rng.normal(0.0, 0.01, (6, 2)) for s in settings])
    groups = np.repeat([0, 1, 2], 6)
    _, plain = densest_core(x, np.arange(18), 5)
    assert len(set(groups[plain].tolist())) == 1
    tightness, spanning = densest_core(x, np.arange(18), 5, groups)
    assert sorted(np.bincount(groups[spanning], minlength=3).tolist()) == [1, 2, 2]
    assert tightness > densest_core(x, np.arange(18), 5)[0]
    # Only members count: a group absent from the members is never taken.
    _, two = densest_core(x, np.arange(12), 5, groups)
    assert set(groups[two].tolist()) == {0, 1}
    labels = np.zeros(18, dtype=np.int64)
    choice = choose_cluster(x, labels, x.mean(axis=0, keepdims=True), 1, 5, groups)
    assert choice.core == spanning.tolist()


def test_densest_core_refuses_bad_input() -> None:
    x = np.zeros((4, 2))
    with pytest.raises(ValueError, match="members must be a non-empty"):
        densest_core(x, np.array([], dtype=np.int64), 2)
    with pytest.raises(ValueError, match="size must be an integer >= 1"):
        densest_core(x, np.arange(4), 0)
    with pytest.raises(ValueError, match="core_size must be None or an integer"):
        choose_cluster(x, np.zeros(4, dtype=np.int64), np.zeros((1, 2)), 1, core_size=True)
    with pytest.raises(ValueError, match="groups must have shape"):
        densest_core(x, np.arange(4), 2, groups=np.zeros(3))
    with pytest.raises(ValueError, match="give core_size too"):
        choose_cluster(x, np.zeros(4, dtype=np.int64), np.zeros((1, 2)), 1, groups=np.zeros(4))


def test_choice_reasons_are_the_interface_literals() -> None:
    assert set(typing.get_args(ChoiceReason)) == {"most_cohesive", "largest_fallback"}


@pytest.mark.parametrize(
    ("labels", "centroids", "d_min_c", "match"),
    [
        (np.array([0, 1, 2]), np.zeros((2, 1)), 1, r"labels must be in \[0, 2\)"),
        (np.array([0, 1]), np.zeros((2, 1)), 1, r"labels must have shape \(3,\)"),
        (np.array([0, 1, 1]), np.zeros((2, 4)), 1, r"centroids must have shape \(k, 1\)"),
        (np.array([0, 1, 1]), np.zeros((2, 1)), -1, "d_min_c must be an integer >= 0, got -1"),
    ],
)
def test_choice_input_errors(
    labels: np.ndarray, centroids: np.ndarray, d_min_c: int, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        choose_cluster(np.zeros((3, 1)), labels, centroids, d_min_c)
