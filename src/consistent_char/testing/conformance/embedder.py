"""Conformance checks for an `Embedder`: float32 ``(N, D)`` rows that do not depend on the batch
they were computed in.

Each ``check_embedder_*`` function runs on its own, on the embedder (with `sample_images`) or on
an `EmbedderTrial` that gives it other images or tolerances:

    >>> from consistent_char.embedders import PixelEmbedder
    >>> check_embedder_batch_independent(PixelEmbedder(size=4))  # raises AssertionError if not
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import Any

import numpy as np
from PIL import Image

from consistent_char.interfaces import Embedder
from consistent_char.testing.conformance._common import (
    ConformanceCase,
    Trial,
    bind,
    conformance_check,
    fail,
    image_signature,
    run_all,
    sample_images,
)

__all__ = [
    "EMBEDDER_CHECKS",
    "EmbedderTrial",
    "check_embedder",
    "check_embedder_batch_independent",
    "check_embedder_deterministic",
    "check_embedder_distinguishes_images",
    "check_embedder_does_not_modify_inputs",
    "check_embedder_finite",
    "check_embedder_order_preserved",
    "check_embedder_output_dtype",
    "check_embedder_output_shape",
    "check_embedder_output_type",
    "check_embedder_protocol",
]


class EmbedderTrial(Trial):
    """An embedder and the images its checks embed; the first embedding is shared.

    Args:
        embedder: The embedder.
        images: At least 3 distinct images (default: `sample_images`).
        rtol: Relative tolerance when comparing embeddings of the same image.
        atol: Absolute tolerance when comparing embeddings of the same image. The defaults
            suit CPU float32. On a GPU, another batch size can select other kernels: DINOv2
            ViT-L in float32 on an H100 moved a CLS value by 7e-4 between batch sizes, so
            pass e.g. ``rtol=1e-2, atol=1e-2`` there.

    Raises:
        ValueError: Fewer than 3 images.
    """

    def __init__(
        self,
        embedder: Any,
        images: Sequence[Image.Image] | None = None,
        *,
        rtol: float = 1e-4,
        atol: float = 1e-5,
    ) -> None:
        super().__init__(embedder)
        self.images = list(images) if images is not None else sample_images(6)
        if len(self.images) < 3:
            raise ValueError(f"the embedder checks need at least 3 images, got {len(self.images)}")
        self.rtol, self.atol = rtol, atol
        self.signature = image_signature(self.images)

    @cached_property
    def output(self) -> Any:
        """What ``embed(images)`` returned, whatever it is."""
        return self.stage.embed(self.images)

    def valid(self) -> np.ndarray:
        """The output, for checks that need it to be an (N, D) array."""
        e = self.output
        if not (isinstance(e, np.ndarray) and e.ndim == 2 and e.shape[0] == len(self.images)):
            fail("needs a valid (N, D) output; see embedder_output_type/embedder_output_shape")
        return e

    def assert_close(self, a: np.ndarray, b: np.ndarray, what: str) -> None:
        """Fails with `what` unless `a` and `b` agree within the trial's tolerances."""
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            fail(f"{what}: shapes {a.shape} and {b.shape} differ")
        if not np.allclose(a, b, rtol=self.rtol, atol=self.atol):
            fail(
                f"{what}: max abs difference {float(np.abs(a - b).max()):.3g} "
                f"(rtol={self.rtol}, atol={self.atol})"
            )


embedder_check = conformance_check(EmbedderTrial.of)


@embedder_check
def check_embedder_protocol(t: EmbedderTrial) -> None:
    """The embedder has an ``embed(images)`` method."""
    if not isinstance(t.stage, Embedder):
        fail(f"{type(t.stage).__name__} has no embed(images) method")


@embedder_check
def check_embedder_output_type(t: EmbedderTrial) -> None:
    """``embed`` returns a numpy array."""
    if not isinstance(t.output, np.ndarray):
        fail(f"embed() must return a numpy array, got {type(t.output).__name__}")


@embedder_check
def check_embedder_output_dtype(t: EmbedderTrial) -> None:
    """The embeddings are float32, the dtype the clusterers and criteria expect."""
    dtype = getattr(t.output, "dtype", None)
    if dtype != np.float32:
        fail(f"expected float32 embeddings, got {dtype}")


@embedder_check
def check_embedder_output_shape(t: EmbedderTrial) -> None:
    """One row of width D >= 1 per image."""
    n, shape = len(t.images), getattr(t.output, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] != n or shape[1] < 1:
        fail(f"expected shape ({n}, D) with D >= 1 for {n} images, got {shape}")


@embedder_check
def check_embedder_finite(t: EmbedderTrial) -> None:
    """No NaN or inf, which would poison the distances of clustering and convergence."""
    if not np.isfinite(t.valid()).all():
        fail("embeddings contain NaN or inf")


@embedder_check
def check_embedder_deterministic(t: EmbedderTrial) -> None:
    """The same images give the same embeddings, so a resumed run reproduces its clusters."""
    t.assert_close(t.stage.embed(t.images), t.valid(), "the same images embedded twice differ")


@embedder_check
def check_embedder_batch_independent(t: EmbedderTrial) -> None:
    """A row depends on its image alone, not on the other images of the batch."""
    e = t.valid()
    t.assert_close(t.stage.embed(t.images[:1]), e[:1], "image 0 alone vs in the full batch")
    t.assert_close(t.stage.embed(t.images[1:3]), e[1:3], "images 1-2 alone vs in the full batch")


@embedder_check
def check_embedder_order_preserved(t: EmbedderTrial) -> None:
    """Row j is the embedding of image j."""
    t.assert_close(
        t.stage.embed(t.images[::-1]), t.valid()[::-1], "reversed images vs reversed embeddings"
    )


@embedder_check
def check_embedder_distinguishes_images(t: EmbedderTrial) -> None:
    """Distinct images do not all get the same embedding (a constant would cluster nothing)."""
    e = t.valid()
    if np.allclose(e, e[:1], rtol=0, atol=0):
        fail(f"all {len(t.images)} distinct images got the same embedding")


@embedder_check
def check_embedder_does_not_modify_inputs(t: EmbedderTrial) -> None:
    """``embed`` leaves its input images as they were: the loop keeps using them."""
    _ = t.output  # embeds the images, if no other check has yet
    if image_signature(t.images) != t.signature:
        fail("embed() modified its input images")


#: The `Embedder` checks, in the order `check_embedder` runs them.
EMBEDDER_CHECKS = (
    check_embedder_protocol,
    check_embedder_output_type,
    check_embedder_output_dtype,
    check_embedder_output_shape,
    check_embedder_finite,
    check_embedder_deterministic,
    check_embedder_batch_independent,
    check_embedder_order_preserved,
    check_embedder_distinguishes_images,
    check_embedder_does_not_modify_inputs,
)


def embedder_cases(
    emb: Any, images: Sequence[Image.Image] | None = None, rtol: float = 1e-4, atol: float = 1e-5
) -> list[ConformanceCase]:
    """The `Embedder` checks bound to one shared `EmbedderTrial`."""
    return bind(EMBEDDER_CHECKS, EmbedderTrial(emb, images, rtol=rtol, atol=atol))


def check_embedder(
    emb: Any, images: Sequence[Image.Image] | None = None, *, rtol: float = 1e-4, atol: float = 1e-5
) -> list[str]:
    """Runs the `Embedder` checks; returns the names of the checks that ran.

    Args:
        emb: The embedder.
        images: At least 3 distinct images (default: `sample_images`).
        rtol: Relative tolerance when comparing embeddings of the same image.
        atol: Absolute tolerance when comparing embeddings of the same image (see
            `EmbedderTrial` for GPU values).

    Raises:
        AssertionError: ``[check_name] what went wrong``.

    Example:
        >>> from consistent_char.embedders import PixelEmbedder
        >>> "embedder_output_dtype" in check_embedder(PixelEmbedder(size=4))
        True
    """
    return run_all(embedder_cases(emb, images, rtol, atol))
