"""PairwiseDistanceCriterion: spread and threshold against hand computations."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

import consistent_char.convergence as convergence
from consistent_char.convergence import (
    PairwiseDistanceCriterion,
    PerVariationCriterion,
    mean_pairwise_distance,
)
from consistent_char.interfaces import IterationRecord


def record(i: int, spread: float) -> IterationRecord:
    return IterationRecord(
        iteration=i, prompt="p", seeds=[i], spread=spread, threshold=0.0, converged=False
    )


def brute_force(x: np.ndarray) -> float:
    pairs = list(itertools.combinations(x.astype(np.float64).tolist(), 2))
    return math.fsum(math.dist(a, b) for a, b in pairs) / len(pairs)


def test_spread_by_hand() -> None:
    # Pairs: (0,0)-(3,4) = 5, (0,0)-(6,8) = 10, (3,4)-(6,8) = 5: mean 20 / 3.
    x = np.array([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]], dtype=np.float32)
    assert PairwiseDistanceCriterion(d_conv=1.0).spread(x) == pytest.approx(20 / 3, rel=1e-15)
    assert isinstance(PairwiseDistanceCriterion(d_conv=1.0).spread(x), float)


def test_spread_of_identical_embeddings_is_exactly_zero() -> None:
    x = np.repeat(np.array([[1e4, -3.5, 0.1]], dtype=np.float32), 5, axis=0)
    assert mean_pairwise_distance(x) == 0.0


def test_spread_accumulates_in_float64() -> None:
    # Large offsets and small differences: float32 arithmetic would lose the differences.
    rng = np.random.default_rng(0)
    x = (1e4 + rng.normal(0, 1e-2, (40, 64))).astype(np.float32)
    assert mean_pairwise_distance(x) == pytest.approx(brute_force(x), rel=1e-12)


def test_spread_in_blocks_equals_brute_force(monkeypatch: pytest.MonkeyPatch) -> None:
    x = np.random.default_rng(1).normal(size=(7, 3))
    whole = mean_pairwise_distance(x)
    monkeypatch.setattr(convergence, "_BLOCK_ELEMENTS", 6)  # two rows of 7 x 3 per block
    blocked = mean_pairwise_distance(x)
    assert blocked == pytest.approx(whole, rel=1e-14)
    assert blocked == pytest.approx(brute_force(x), rel=1e-14)


def test_spread_input_errors() -> None:
    with pytest.raises(ValueError, match="at least 2 embeddings, got 1"):
        mean_pairwise_distance(np.zeros((1, 4)))
    with pytest.raises(ValueError, match=r"shape \(N, D\)"):
        mean_pairwise_distance(np.zeros(4))
    with pytest.raises(ValueError, match="finite"):
        mean_pairwise_distance(np.array([[0.0], [np.inf]]))


def test_absolute_threshold() -> None:
    criterion = PairwiseDistanceCriterion(d_conv=5.0)
    assert criterion.threshold([]) == 5.0
    assert criterion.threshold([100.0, 3.0]) == 5.0
    below = np.array([[0.0, 0.0], [3.0, 4.0 - 1e-6]])
    exactly = np.array([[0.0, 0.0], [3.0, 4.0]])
    assert criterion.converged(below, [])
    assert not criterion.converged(exactly, [])  # strictly below d_conv


def test_relative_threshold_scales_the_first_spread() -> None:
    criterion = PairwiseDistanceCriterion(d_conv_relative=0.6)
    assert criterion.relative
    assert criterion.threshold([10.0, 8.0, 7.0]) == pytest.approx(6.0)
    with pytest.raises(ValueError, match="needs the spread of iteration 0"):
        criterion.threshold([])
    spread_5 = np.array([[0.0, 0.0], [3.0, 4.0]])
    spread_7 = np.array([[0.0], [7.0]])
    # Iteration 0 is its own reference: never converged there, even at d_conv_relative = 1.
    assert not criterion.converged(spread_5, [])
    assert not PairwiseDistanceCriterion(d_conv_relative=1.0).converged(spread_5, [])
    history = [record(0, 10.0)]
    assert criterion.converged(spread_5, history)  # 5 < 0.6 * 10
    assert not criterion.converged(spread_7, history)  # 7 >= 6
    assert criterion.converged(spread_5, [record(0, 10.0), record(1, 1.0)])


def test_zero_threshold_never_converges() -> None:
    x = np.zeros((3, 2))
    assert not PairwiseDistanceCriterion(d_conv=0.0).converged(x, [])
    assert not PairwiseDistanceCriterion(d_conv_relative=0.0).converged(x, [record(0, 1.0)])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one of d_conv .* and d_conv_relative .* got d_conv=None"),
        ({"d_conv": 1.0, "d_conv_relative": 0.5}, "exactly one of d_conv"),
        ({"d_conv": -1.0}, r"d_conv must be a finite number >= 0, got -1.0"),
        ({"d_conv": float("nan")}, "d_conv must be a finite number >= 0, got nan"),
        ({"d_conv_relative": -0.1}, r"d_conv_relative must be a finite number >= 0, got -0.1"),
        ({"d_conv_relative": 1.5}, r"d_conv_relative must be in \[0, 1\] .* got 1.5"),
        ({"d_conv": True}, "d_conv must be a number or None, got True"),
        ({"d_conv": "0.5"}, "d_conv must be a number or None, got '0.5'"),
    ],
)
def test_invalid_settings_name_field_value_and_allowed(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PairwiseDistanceCriterion(**kwargs)


def test_per_variation_spread_is_the_mean_of_each_variations_own_spread() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(9, 4))
    labels = ("a", "b", "c") * 3
    inner = PairwiseDistanceCriterion(d_conv_relative=0.5)
    criterion = PerVariationCriterion(inner, labels)
    by_hand = np.mean([mean_pairwise_distance(x[k::3]) for k in range(3)])
    assert criterion.spread(x) == pytest.approx(by_hand, rel=1e-12)
    # Moving one variation's images together by an offset changes nothing within it.
    shifted = x + np.array([[100.0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]] * 3)
    assert criterion.spread(shifted) == pytest.approx(criterion.spread(x), rel=1e-9)
    assert inner.spread(shifted) > 10 * inner.spread(x)
    # Its threshold is the inner one's, on the spreads it is given.
    assert criterion.threshold([4.0, 1.0]) == 2.0
    assert criterion.converged(x, [record(0, 3 * criterion.spread(x))])
    assert not criterion.converged(x, [record(0, 1.5 * criterion.spread(x))])


def test_per_variation_input_errors() -> None:
    inner = PairwiseDistanceCriterion(d_conv=1.0)
    with pytest.raises(ValueError, match="at least 2 images"):
        PerVariationCriterion(inner, ("a", "a", "b"))
    with pytest.raises(ValueError, match="3 embeddings for 4 image variations"):
        PerVariationCriterion(inner, ("a", "a", "b", "b")).spread(np.zeros((3, 2)))


@pytest.mark.parametrize(
    ("spreads", "converged", "saturation", "says"),
    [
        ([10.0, 4.0, 2.0], True, [0.5, 0.5, 0.5], "converged"),
        ([10.0, 4.0, 5.0, 4.5], False, [0.5] * 4, "no lower spread in 2 iterations"),
        ([10.0, 4.0, 3.0], False, [0.5, 0.5, 0.7], "images over-saturated"),
        # Saturation and patience at once: saturation is named, as the loop checks it first.
        ([10.0, 4.0, 5.0, 4.5], False, [0.5, 0.5, 0.5, 0.7], "images over-saturated"),
        ([10.0, 4.0, 3.0, 2.5], False, [0.5] * 4, None),
        ([10.0], False, [0.9], None),
    ],
)
def test_stop_reason_names_the_rule_that_ends_the_loop(spreads, converged, saturation, says):
    history = [
        IterationRecord(i, "p", [0], spread, 1.0, converged and i == len(spreads) - 1)
        for i, spread in enumerate(spreads)
    ]
    for record, value in zip(history, saturation, strict=True):
        record.saturation = value
    assert convergence.stop_reason(history, patience=2, max_saturation_rise=0.2) == says
