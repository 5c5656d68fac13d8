"""A conformance suite for stages, ours or a user's: scikit-learn's `check_estimator`, for the five
stage protocols of `consistent_char.interfaces`.

Each check is a function of its own, ``check_<kind>_<what>(stage)``, with a docstring saying the
contract it checks; it raises `AssertionError` whose message starts with its name, e.g.
``[embedder_output_dtype] expected float32 embeddings, got float64``. Run one alone while
fixing a stage:

    >>> from consistent_char.embedders import PixelEmbedder
    >>> check_embedder_output_dtype(PixelEmbedder(size=4))

A check given the stage runs on default inputs; give it a trial (`EmbedderTrial`,
`ClustererTrial`, `CriterionTrial`, `GeneratorTrial`, `RefinerTrial`) for other inputs. The
per-kind runners (`check_embedder`, ..., `check_stage`) run all the checks of a kind on one trial,
so the stage calls the checks share are made once. The same checks come as a table for pytest:

    >>> import pytest
    >>> @pytest.mark.parametrize("name, check", conformance_cases(MyEmbedder()))  # doctest: +SKIP
    ... def test_my_embedder(name, check):
    ...     check()

What is checked:

- every stage: the protocol's methods exist; outputs have the promised types, dtypes and shapes;
  the same inputs (and seed) give the same result; inputs are not modified;
- `Embedder` (`embedder`): rows do not depend on the batch they were computed in, nor on its
  order;
- `Clusterer` (`clusterer`): labels in ``[0, k)``, k = 1 and k = N work, well separated blobs
  are recovered;
- `ConvergenceCriterion` (`criterion`): the spread is a non-negative number that is 0 for
  identical embeddings and grows with scale; ``converged`` agrees with ``spread`` and
  ``threshold``;
- `Generator` (`generator`): image j depends on ``seeds[j]`` alone; with an identity, the output
  changes and nothing is left behind (later calls without it draw what they drew before);
- `Refiner` (`refiner`): returns an `Identity` whose widths fit; the same seed gives the same
  identity; warm start keeps the token; for refiners exposing an SDXL ``pipeline``: the pipeline
  is bit-identical afterwards, and, when ``refine`` takes a ``callback`` (called as
  ``callback(step, total, ...)``), at the last training step every tensor the pipeline had
  before is unchanged: only the identity's tensors (new token rows, LoRA) train;
- `Identity` (`identity`): save/load round trip.

The model-backed checks compare hashes of every parameter and buffer, so they also work on
full-size pipelines, at the cost of reading every weight once.
"""

from consistent_char.testing.conformance._common import (
    ConformanceCase,
    sample_blobs,
    sample_images,
)
from consistent_char.testing.conformance.clusterer import *  # noqa: F403
from consistent_char.testing.conformance.clusterer import __all__ as _clusterer
from consistent_char.testing.conformance.criterion import *  # noqa: F403
from consistent_char.testing.conformance.criterion import __all__ as _criterion
from consistent_char.testing.conformance.embedder import *  # noqa: F403
from consistent_char.testing.conformance.embedder import __all__ as _embedder
from consistent_char.testing.conformance.generator import *  # noqa: F403
from consistent_char.testing.conformance.generator import __all__ as _generator
from consistent_char.testing.conformance.identity import *  # noqa: F403
from consistent_char.testing.conformance.identity import __all__ as _identity
from consistent_char.testing.conformance.refiner import *  # noqa: F403
from consistent_char.testing.conformance.refiner import __all__ as _refiner
from consistent_char.testing.conformance.runner import check_stage, conformance_cases

__all__ = [
    "ConformanceCase",
    "check_stage",
    "conformance_cases",
    "sample_blobs",
    "sample_images",
    *_clusterer,
    *_criterion,
    *_embedder,
    *_generator,
    *_identity,
    *_refiner,
]
