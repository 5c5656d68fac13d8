"""Conformance checks for a `ConvergenceCriterion`: the spread is a non-negative number that is 0
for identical embeddings and grows with scale, and ``converged`` agrees with ``spread`` and
``threshold``.

Each ``check_criterion_*`` function runs on its own, on the criterion (with `sample_blobs`) or on
a `CriterionTrial` that gives it other embeddings:

    >>> from consistent_char.convergence import PairwiseDistanceCriterion
    >>> check_criterion_spread_zero_for_identical(PairwiseDistanceCriterion(d_conv=1.0))
"""

from __future__ import annotations

import numbers
from functools import cached_property
from typing import Any

import numpy as np

from consistent_char.interfaces import ConvergenceCriterion, IterationRecord
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
    "CRITERION_CHECKS",
    "CriterionTrial",
    "check_convergence_criterion",
    "check_criterion_converged_matches_threshold",
    "check_criterion_converged_type",
    "check_criterion_protocol",
    "check_criterion_spread_deterministic",
    "check_criterion_spread_grows_with_scale",
    "check_criterion_spread_type",
    "check_criterion_spread_zero_for_identical",
    "check_criterion_threshold_type",
]


class CriterionTrial(Trial):
    """A convergence criterion and the embeddings its checks measure; the first spread is shared.

    Args:
        criterion: The criterion.
        embeddings: (N, D) embeddings with N >= 2 that are not all identical (default:
            `sample_blobs`).
    """

    def __init__(self, criterion: Any, embeddings: np.ndarray | None = None) -> None:
        super().__init__(criterion)
        self.x = np.asarray(embeddings) if embeddings is not None else sample_blobs(4, 3, 8)[0]

    @cached_property
    def spread(self) -> Any:
        """What ``spread(embeddings)`` returned, whatever it is."""
        return self.stage.spread(self.x.copy())


def _real(value: Any, what: str) -> float:
    """`value` as a float, failing unless it is a finite, non-negative real number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        fail(f"{what} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not np.isfinite(v) or v < 0:
        fail(f"{what} must be finite and >= 0, got {v}")
    return v


def _record(i: int, spread: float) -> IterationRecord:
    return IterationRecord(
        iteration=i, prompt="", seeds=[], spread=float(spread), threshold=0.0, converged=False
    )


criterion_check = conformance_check(CriterionTrial.of)


@criterion_check
def check_criterion_protocol(t: CriterionTrial) -> None:
    """The criterion has ``spread``, ``threshold`` and ``converged`` methods."""
    if not isinstance(t.stage, ConvergenceCriterion):
        fail(f"{type(t.stage).__name__} needs spread(), threshold() and converged() methods")


@criterion_check
def check_criterion_spread_type(t: CriterionTrial) -> None:
    """``spread`` returns a finite, non-negative real number."""
    _real(t.spread, "spread()")


@criterion_check
def check_criterion_spread_deterministic(t: CriterionTrial) -> None:
    """The same embeddings give the same spread."""
    if t.stage.spread(t.x.copy()) != t.spread:
        fail("the same embeddings gave different spreads")


@criterion_check
def check_criterion_spread_zero_for_identical(t: CriterionTrial) -> None:
    """Identical embeddings (a perfectly consistent set) have spread 0."""
    same = np.repeat(t.x[:1], len(t.x), axis=0)
    s = _real(t.stage.spread(same), "spread() of identical embeddings")
    if s > 1e-6:
        fail(f"identical embeddings must have spread 0, got {s}")


@criterion_check
def check_criterion_spread_grows_with_scale(t: CriterionTrial) -> None:
    """Spreading the embeddings out (x2) increases the spread."""
    s1 = _real(t.spread, "spread()")
    s2 = _real(t.stage.spread(t.x * 2), "spread() of 2x embeddings")
    if not s2 > s1:
        fail(f"spreading the embeddings out (x2) must increase the spread, got {s1} -> {s2}")


@criterion_check
def check_criterion_threshold_type(t: CriterionTrial) -> None:
    """``threshold`` of a spread history is a finite, non-negative real number."""
    s = _real(t.spread, "spread()")
    _real(t.stage.threshold([s]), "threshold([s0])")
    _real(t.stage.threshold([s, s / 2]), "threshold([s0, s1])")


@criterion_check
def check_criterion_converged_type(t: CriterionTrial) -> None:
    """``converged`` returns a bool."""
    v = t.stage.converged(t.x.copy(), [])
    if not isinstance(v, bool | np.bool_):
        fail(f"converged() must return a bool, got {type(v).__name__}")


@criterion_check
def check_criterion_converged_matches_threshold(t: CriterionTrial) -> None:
    """``converged`` says True exactly when the spread is below the threshold of the history
    (the loop stops on ``converged`` and reports spread and threshold: they must agree)."""
    c, s = t.stage, _real(t.spread, "spread()")
    for scale, history in (
        (1.0, []),
        (1.0, [_record(0, s)]),
        (0.1, [_record(0, s)]),
        (0.01, [_record(0, s), _record(1, s / 2)]),
    ):
        e = t.x * scale
        current = float(c.spread(e))
        threshold = float(c.threshold([r.spread for r in history] + [current]))
        got = bool(c.converged(e, history))
        if got != (current < threshold):
            fail(
                f"converged() = {got} but spread {current:.6g} vs threshold {threshold:.6g} says "
                f"{current < threshold} (history of {len(history)} iteration(s))"
            )


#: The `ConvergenceCriterion` checks, in the order `check_convergence_criterion` runs them.
CRITERION_CHECKS = (
    check_criterion_protocol,
    check_criterion_spread_type,
    check_criterion_spread_deterministic,
    check_criterion_spread_zero_for_identical,
    check_criterion_spread_grows_with_scale,
    check_criterion_threshold_type,
    check_criterion_converged_type,
    check_criterion_converged_matches_threshold,
)


def criterion_cases(c: Any, embeddings: np.ndarray | None = None) -> list[ConformanceCase]:
    """The `ConvergenceCriterion` checks bound to one shared `CriterionTrial`."""
    return bind(CRITERION_CHECKS, CriterionTrial(c, embeddings))


def check_convergence_criterion(c: Any, embeddings: np.ndarray | None = None) -> list[str]:
    """Runs the `ConvergenceCriterion` checks; returns the names of the checks that ran.

    Args:
        c: The criterion.
        embeddings: (N, D) embeddings with N >= 2 that are not all identical (default:
            `sample_blobs`).

    Raises:
        AssertionError: ``[check_name] what went wrong``.

    Example:
        >>> from consistent_char.convergence import PairwiseDistanceCriterion
        >>> len(check_convergence_criterion(PairwiseDistanceCriterion(d_conv=1.0)))
        8
    """
    return run_all(criterion_cases(c, embeddings))
