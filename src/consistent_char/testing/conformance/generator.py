"""Conformance checks for a `Generator`: one RGB image per prompt, image j depending on
``seeds[j]`` alone, and an identity applied for one call only, leaving nothing behind.

Each ``check_generator_*`` function runs on its own, on the generator (with default prompts and
seeds) or on a `GeneratorTrial` that gives it other prompts, seeds, an identity or a tolerance:

    >>> check_generator_per_image_seed(my_generator)  # doctest: +SKIP
    >>> trial = GeneratorTrial(my_generator, identity=my_identity)  # doctest: +SKIP
    >>> check_generator_uses_identity(trial)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from PIL import Image

from consistent_char.identity import Identity
from consistent_char.interfaces import Generator
from consistent_char.testing.conformance._common import (
    ConformanceCase,
    Trial,
    bind,
    conformance_check,
    fail,
    max_pixel_diff,
    run_all,
)
from consistent_char.testing.conformance._pipeline import (
    Snapshot,
    sdxl_pipeline,
    snapshot,
    torch_equal,
)

logger = logging.getLogger(__name__)

__all__ = [
    "GENERATOR_CHECKS",
    "GENERATOR_IDENTITY_CHECKS",
    "GeneratorTrial",
    "check_generator",
    "check_generator_consistent_size",
    "check_generator_deterministic",
    "check_generator_leaves_nothing_behind",
    "check_generator_per_image_seed",
    "check_generator_protocol",
    "check_generator_returns_images",
    "check_generator_seeds_vary_images",
    "check_generator_uses_identity",
]


@dataclass
class _Drawn:
    """Images drawn with the identity, whether that changed the identity's rows, and the
    pipeline's snapshots around the call."""

    images: list[Image.Image]
    identity_changed: bool
    before: Snapshot | None
    after: Snapshot | None


class GeneratorTrial(Trial):
    """A generator and what its checks draw; the first draws, plain and with the identity, are
    shared.

    Args:
        generator: The generator.
        prompts: At least 2 prompts (a default set otherwise). With an identity, its token is
            prepended to them for the identity checks.
        seeds: One seed per prompt.
        identity: An identity that fits the generator, for the identity checks. For a
            generator exposing an SDXL ``pipeline``, a random one is made when none is given;
            otherwise the identity checks have nothing to draw with.
        pixel_atol: Largest pixel difference (0-255) accepted between two draws of one image.

    Raises:
        ValueError: Fewer than 2 prompts, or not one seed per prompt.
    """

    def __init__(
        self,
        generator: Any,
        prompts: Sequence[str] | None = None,
        seeds: Sequence[int] | None = None,
        *,
        identity: Identity | None = None,
        pixel_atol: int = 0,
    ) -> None:
        super().__init__(generator)
        self.prompts = (
            list(prompts)
            if prompts is not None
            else ["a photo of a cat", "a red robot", "a dog in the snow"]
        )
        self.seeds = list(seeds) if seeds is not None else [11, 22, 33][: len(self.prompts)]
        if len(self.prompts) < 2 or len(self.seeds) != len(self.prompts):
            raise ValueError("the generator checks need at least 2 prompts and one seed per prompt")
        self.pipe = sdxl_pipeline(generator)
        if identity is None and self.pipe is not None:
            from consistent_char.testing.tiny import tiny_identity

            identity = tiny_identity(self.pipe, "<conformance>", seed=0)
        self.identity = identity
        self.pixel_atol = pixel_atol

    @cached_property
    def output(self) -> Any:
        """What ``generate(prompts, seeds)`` returned, whatever it is."""
        return self.stage.generate(self.prompts, self.seeds)

    def valid(self) -> list[Image.Image]:
        """The output, for checks that need it to be one PIL image per prompt."""
        o = self.output
        if not (
            isinstance(o, list)
            and len(o) == len(self.prompts)
            and all(isinstance(i, Image.Image) for i in o)
        ):
            fail("needs a valid list of images; see generator_returns_images")
        return o

    def assert_same(self, a: Sequence[Image.Image], b: Sequence[Image.Image], what: str) -> None:
        """Fails with `what` unless the two draws agree within ``pixel_atol``."""
        diff = max_pixel_diff(a, b)
        if diff > self.pixel_atol:
            fail(f"{what}: pixels differ by up to {diff} (allowed {self.pixel_atol})")

    def needs_identity(self) -> Identity:
        """The identity, for the identity checks."""
        if self.identity is None:
            fail(
                f"{type(self.stage).__name__} exposes no SDXL pipeline: give an identity, "
                "GeneratorTrial(generator, identity=...)"
            )
        return self.identity

    @property
    def token_prompts(self) -> list[str]:
        """The prompts with the identity's token in front."""
        return [f"{self.needs_identity().token} {p}" for p in self.prompts]

    @cached_property
    def with_identity(self) -> _Drawn:
        """The prompts with the token drawn with the identity, and what that changed."""
        identity, pipe = self.needs_identity(), self.pipe
        before = snapshot(pipe) if pipe is not None else None
        rows = (identity.clip_l.clone(), identity.clip_g.clone())
        images = self.stage.generate(self.token_prompts, self.seeds, identity=identity)
        after = snapshot(pipe) if pipe is not None else None
        changed = not (
            torch_equal(rows[0], identity.clip_l) and torch_equal(rows[1], identity.clip_g)
        )
        return _Drawn(images, changed, before, after)


generator_check = conformance_check(GeneratorTrial.of)


@generator_check
def check_generator_protocol(t: GeneratorTrial) -> None:
    """The generator has a ``generate(prompts, seeds, identity=None)`` method."""
    if not isinstance(t.stage, Generator):
        fail(f"{type(t.stage).__name__} has no generate(prompts, seeds, identity=None) method")


@generator_check
def check_generator_returns_images(t: GeneratorTrial) -> None:
    """``generate`` returns a list of one RGB PIL image per prompt."""
    o, n = t.output, len(t.prompts)
    if not isinstance(o, list):
        fail(f"generate() must return a list, got {type(o).__name__}")
    if len(o) != n:
        fail(f"expected {n} images for {n} prompts, got {len(o)}")
    for j, im in enumerate(o):
        if not isinstance(im, Image.Image):
            fail(f"image {j} is a {type(im).__name__}, not a PIL image")
        if im.mode != "RGB":
            fail(f"image {j} has mode {im.mode!r}, expected 'RGB'")


@generator_check
def check_generator_consistent_size(t: GeneratorTrial) -> None:
    """The images of one call all have the same size."""
    sizes = {im.size for im in t.valid()}
    if len(sizes) != 1:
        fail(f"images of one call have different sizes: {sorted(sizes)}")


@generator_check
def check_generator_deterministic(t: GeneratorTrial) -> None:
    """The same prompts and seeds draw the same images."""
    again = t.stage.generate(t.prompts, t.seeds)
    t.assert_same(again, t.valid(), "the same prompts and seeds drawn twice")


@generator_check
def check_generator_per_image_seed(t: GeneratorTrial) -> None:
    """Image j depends on ``seeds[j]`` alone: drawn alone or in another order, it is the same
    (the loop draws its image set in batches of any size)."""
    alone = t.stage.generate(t.prompts[1:2], t.seeds[1:2])
    t.assert_same(alone, t.valid()[1:2], "image 1 drawn alone vs in the batch")
    reordered = t.stage.generate(t.prompts[::-1], t.seeds[::-1])
    t.assert_same(reordered[::-1], t.valid(), "the batch drawn in reverse order")


@generator_check
def check_generator_seeds_vary_images(t: GeneratorTrial) -> None:
    """Other seeds draw other images: the loop needs a varied set to cluster."""
    other = t.stage.generate(t.prompts, [s + 1000 for s in t.seeds])
    if max_pixel_diff(other, t.valid()) == 0:
        fail("different seeds gave identical images")


@generator_check
def check_generator_uses_identity(t: GeneratorTrial) -> None:
    """Drawing with the identity changes the images of prompts with its token."""
    plain = t.stage.generate(t.token_prompts, t.seeds)
    if max_pixel_diff(t.with_identity.images, plain) == 0:
        token = t.needs_identity().token
        fail(f"generating with identity {token!r} gave the same images as without it")


@generator_check
def check_generator_leaves_nothing_behind(t: GeneratorTrial) -> None:
    """An identity applies to its call only: its rows and the pipeline are unchanged after it,
    and later calls without it draw what they drew before."""
    drawn = t.with_identity
    if drawn.identity_changed:
        fail("generate() modified the identity's embeddings")
    if drawn.before is not None and drawn.after is not None:
        diff = drawn.before.diff(drawn.after)
        if diff:
            fail("the pipeline changed after generating with an identity: " + "; ".join(diff))
    again = t.stage.generate(t.prompts, t.seeds)
    t.assert_same(again, t.valid(), "a call without identity after one with it")


#: The `Generator` checks that need no identity, in the order `check_generator` runs them.
GENERATOR_CHECKS = (
    check_generator_protocol,
    check_generator_returns_images,
    check_generator_consistent_size,
    check_generator_deterministic,
    check_generator_per_image_seed,
    check_generator_seeds_vary_images,
)

#: The `Generator` checks that draw with an identity, run after `GENERATOR_CHECKS`.
GENERATOR_IDENTITY_CHECKS = (check_generator_uses_identity, check_generator_leaves_nothing_behind)


def generator_cases(
    gen: Any,
    prompts: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    identity: Identity | None = None,
    pixel_atol: int = 0,
) -> list[ConformanceCase]:
    """The `Generator` checks bound to one shared `GeneratorTrial`; the identity checks only
    when there is an identity to draw with."""
    trial = GeneratorTrial(gen, prompts, seeds, identity=identity, pixel_atol=pixel_atol)
    if trial.identity is None:
        logger.info(
            "%s exposes no SDXL pipeline and no identity was given: skipping the identity checks",
            type(gen).__name__,
        )
        return bind(GENERATOR_CHECKS, trial)
    return bind(GENERATOR_CHECKS + GENERATOR_IDENTITY_CHECKS, trial)


def check_generator(
    gen: Any,
    prompts: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    *,
    identity: Identity | None = None,
    pixel_atol: int = 0,
) -> list[str]:
    """Runs the `Generator` checks; returns the names of the checks that ran.

    Args:
        gen: The generator.
        prompts: At least 2 prompts (a default set otherwise). With an identity, its token is
            prepended to them for the identity checks.
        seeds: One seed per prompt.
        identity: An identity that fits the generator, for the identity checks. For a
            generator exposing an SDXL ``pipeline``, a random one is made when none is given;
            otherwise the identity checks are skipped.
        pixel_atol: Largest pixel difference (0-255) accepted between two draws of one image.

    Raises:
        AssertionError: ``[check_name] what went wrong``.

    Example:
        >>> from consistent_char.generators import SDXLGenerator
        >>> from consistent_char.testing.tiny import tiny_sdxl_pipeline
        >>> gen = SDXLGenerator.from_pipeline(tiny_sdxl_pipeline(), num_inference_steps=2)
        >>> "generator_leaves_nothing_behind" in check_generator(gen)  # doctest: +SKIP
        True
    """
    return run_all(generator_cases(gen, prompts, seeds, identity, pixel_atol))
