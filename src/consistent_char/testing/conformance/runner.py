"""Every check that applies to a stage, found from the protocols it implements."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from consistent_char.identity import Identity
from consistent_char.interfaces import (
    Clusterer,
    ConvergenceCriterion,
    Embedder,
    Generator,
    Refiner,
)
from consistent_char.testing.conformance._common import ConformanceCase, run_all
from consistent_char.testing.conformance.clusterer import clusterer_cases
from consistent_char.testing.conformance.criterion import criterion_cases
from consistent_char.testing.conformance.embedder import embedder_cases
from consistent_char.testing.conformance.generator import generator_cases
from consistent_char.testing.conformance.identity import identity_cases
from consistent_char.testing.conformance.refiner import refiner_cases

__all__ = ["check_stage", "conformance_cases"]

# (kind, protocol, cases builder, the inputs it takes), in the order their checks run.
_KINDS: tuple[tuple[str, type, Callable[..., list[ConformanceCase]], frozenset[str]], ...] = (
    ("Identity", Identity, identity_cases, frozenset()),
    (
        "Generator",
        Generator,
        generator_cases,
        frozenset({"prompts", "seeds", "identity", "pixel_atol"}),
    ),
    ("Embedder", Embedder, embedder_cases, frozenset({"images", "rtol", "atol"})),
    ("Clusterer", Clusterer, clusterer_cases, frozenset({"embeddings", "k", "seed"})),
    (
        "Refiner",
        Refiner,
        refiner_cases,
        frozenset({"images", "captions", "identity", "seed", "atol"}),
    ),
    ("ConvergenceCriterion", ConvergenceCriterion, criterion_cases, frozenset({"embeddings"})),
)


def conformance_cases(stage: Any, **inputs: Any) -> list[ConformanceCase]:
    """The checks for `stage` as ``(name, check)`` pairs, for ``pytest.mark.parametrize``.

    The stage's kind is found from the protocols it implements (several kinds give all their
    checks). The checks of one table share their stage calls, so each is computed once.

    Args:
        stage: A `Generator`, `Embedder`, `Clusterer`, `Refiner` or `ConvergenceCriterion`
            (or an `Identity`, for the round-trip check).
        **inputs: Keyword arguments of the matching ``check_*`` function, e.g. ``images=``
            for an embedder or ``images=, captions=`` for a refiner.

    Raises:
        TypeError: `stage` implements none of the protocols, or `inputs` has unknown keys.

    Example:
        >>> from consistent_char.convergence import PairwiseDistanceCriterion
        >>> [name for name, _ in conformance_cases(PairwiseDistanceCriterion(d_conv=1.0))][:2]
        ['criterion_protocol', 'criterion_spread_type']
    """
    kinds = [kind for kind in _KINDS if isinstance(stage, kind[1])]
    if not kinds:
        names = ", ".join(name for name, *_ in _KINDS if name != "Identity")
        raise TypeError(
            f"{type(stage).__name__} implements none of the stage protocols ({names}): "
            "nothing to check"
        )
    known = frozenset().union(*(keys for *_, keys in kinds))
    unknown = sorted(set(inputs) - known)
    if unknown:
        raise TypeError(
            f"unknown input(s) {unknown} for a {'/'.join(name for name, *_ in kinds)}; "
            f"known: {sorted(known)}"
        )
    cases: list[ConformanceCase] = []
    for _, _, build, keys in kinds:
        cases += build(stage, **{k: v for k, v in inputs.items() if k in keys})
    return cases


def check_stage(stage: Any, **inputs: Any) -> list[str]:
    """Runs every check that applies to `stage` (see `conformance_cases`); returns their names.

    Raises:
        AssertionError: ``[check_name] what went wrong``.
        TypeError: `stage` implements none of the stage protocols.

    Example:
        >>> from consistent_char.clusterers import FaissKMeansClusterer
        >>> check_stage(FaissKMeansClusterer())[0]
        'clusterer_protocol'
    """
    return run_all(conformance_cases(stage, **inputs))
