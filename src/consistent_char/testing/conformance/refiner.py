"""Conformance checks for a `Refiner`: it returns an `Identity` whose widths fit, the same seed
gives the same identity, a warm start keeps the token, and, for refiners exposing an SDXL
``pipeline``, the pipeline is bit-identical afterwards and only the identity's tensors (new
token rows, LoRA) train.

A refiner needs training images and captions, so its checks run on a `RefinerTrial`:

    >>> captions = ["a photo of <cc>"] * len(images)  # doctest: +SKIP
    >>> trial = RefinerTrial(my_refiner, images, captions)  # doctest: +SKIP
    >>> check_refiner_warm_start(trial)  # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from functools import cached_property
from typing import Any

from PIL import Image

from consistent_char.identity import Identity
from consistent_char.interfaces import Refiner
from consistent_char.testing.conformance._common import (
    ConformanceCase,
    Trial,
    bind,
    conformance_check,
    fail,
    image_signature,
    run_all,
)
from consistent_char.testing.conformance._pipeline import (
    Snapshot,
    sdxl_pipeline,
    snapshot,
    training_violations,
)
from consistent_char.testing.conformance.identity import assert_round_trips

logger = logging.getLogger(__name__)

__all__ = [
    "REFINER_CHECKS",
    "REFINER_PIPELINE_CHECKS",
    "RefinerTrial",
    "check_refiner",
    "check_refiner_deterministic",
    "check_refiner_does_not_modify_inputs",
    "check_refiner_identity_save_load_round_trip",
    "check_refiner_identity_widths",
    "check_refiner_leaves_pipeline_unchanged",
    "check_refiner_only_identity_parameters_train",
    "check_refiner_protocol",
    "check_refiner_returns_identity",
    "check_refiner_warm_start",
]


class RefinerTrial(Trial):
    """A refiner and what its checks train on; the first refine is shared.

    With an SDXL pipeline and a ``refine(..., callback=...)`` (called as
    ``callback(step, total, ...)``), the first refine also compares, at its last training step,
    the pipeline mid-training with its state before.

    Args:
        refiner: The refiner.
        images: Training images.
        captions: One caption per image, with the identity's token.
        identity: The identity to continue from (`None`: start fresh).
        seed: Seed passed to ``refine``.
        atol: Largest difference accepted between two refines with the same seed (0: exact).

    Raises:
        TypeError: No images or no captions given.
        ValueError: Not one caption per image.
    """

    def __init__(
        self,
        refiner: Any,
        images: Sequence[Image.Image] | None = None,
        captions: Sequence[str] | None = None,
        *,
        identity: Identity | None = None,
        seed: int = 0,
        atol: float = 0.0,
    ) -> None:
        super().__init__(refiner)
        for name, value in (("images", images), ("captions", captions)):
            if value is None:
                raise TypeError(f"the refiner checks need {name}=...")
        self.images, self.captions = list(images or ()), list(captions or ())
        if not self.images or len(self.images) != len(self.captions):
            raise ValueError(
                f"the refiner checks need images and one caption per image, got "
                f"{len(self.images)} images and {len(self.captions)} captions"
            )
        self.identity, self.seed, self.atol = identity, seed, atol
        self.pipe = sdxl_pipeline(refiner)
        self.observes_training = self.pipe is not None and _takes_callback(refiner.refine)
        self.signature = image_signature(self.images)
        #: What changed mid-training that should not have (`None`: not observed).
        self.training: list[str] | None = None

    def refine(self, identity: Identity | None, *, seed: int, **kwargs: Any) -> Any:
        """``refine`` on the trial's images and captions."""
        return self.stage.refine(identity, self.images, self.captions, seed=seed, **kwargs)

    @cached_property
    def first(self) -> tuple[Snapshot | None, Snapshot | None, Any]:
        """The pipeline's snapshots around the first refine, and what it returned."""
        pipe = self.pipe
        before = snapshot(pipe) if pipe is not None else None
        kwargs: dict[str, Any] = {}
        if self.observes_training and before is not None:
            reference = before

            def callback(*args: Any) -> None:
                if len(args) >= 2 and args[0] != args[1]:
                    return  # callback(step, total, ...): only the last step is checked
                self.training = training_violations(pipe, reference)

            kwargs["callback"] = callback
        result = self.refine(self.identity, seed=self.seed, **kwargs)
        after = snapshot(pipe) if pipe is not None else None
        return before, after, result

    def result(self) -> Identity:
        """The first refine's identity, for checks that need one."""
        r = self.first[2]
        if not isinstance(r, Identity):
            fail("needs an Identity from refine(); see refiner_returns_identity")
        return r


def _takes_callback(fn: Callable[..., Any]) -> bool:
    try:
        return "callback" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _identity_difference(a: Identity, b: Identity, atol: float) -> str | None:
    """What differs between two identities beyond `atol` (`None`: nothing)."""
    import torch

    if a.token != b.token:
        return f"tokens differ: {a.token!r} vs {b.token!r}"

    def close(x: Any, y: Any) -> bool:
        x, y = x.detach().float().cpu(), y.detach().float().cpu()
        return bool(
            x.shape == y.shape
            and (torch.equal(x, y) or (atol > 0 and torch.allclose(x, y, rtol=0, atol=atol)))
        )

    for name in ("clip_l", "clip_g"):
        if not close(getattr(a, name), getattr(b, name)):
            return f"{name} differs"
    if (a.lora is None) != (b.lora is None):
        return "one has a LoRA, the other not"
    if a.lora is not None and b.lora is not None:
        if set(a.lora) != set(b.lora):
            return "LoRA keys differ"
        for key in a.lora:
            if not close(a.lora[key], b.lora[key]):
                return f"LoRA weight {key} differs"
    return None


refiner_check = conformance_check(RefinerTrial.of)


@refiner_check
def check_refiner_protocol(t: RefinerTrial) -> None:
    """The refiner has a ``refine(identity, images, captions, *, seed)`` method."""
    if not isinstance(t.stage, Refiner):
        fail(f"{type(t.stage).__name__} has no refine(identity, images, captions, *, seed) method")


@refiner_check
def check_refiner_returns_identity(t: RefinerTrial) -> None:
    """``refine`` returns an `Identity`."""
    r = t.first[2]
    if not isinstance(r, Identity):
        fail(f"refine() must return an Identity, got {type(r).__name__}")


@refiner_check
def check_refiner_identity_widths(t: RefinerTrial) -> None:
    """The identity's rows fit the pipeline, and keep the widths of the identity it continued."""
    r = t.result()
    if t.pipe is not None:
        r.check_fits(t.pipe)
    if t.identity is not None:
        for name in ("clip_l", "clip_g"):
            got, want = tuple(getattr(r, name).shape), tuple(getattr(t.identity, name).shape)
            if got != want:
                fail(f"{name} has shape {got} but the identity it continued from has {want}")


@refiner_check
def check_refiner_deterministic(t: RefinerTrial) -> None:
    """The same identity, images, captions and seed refine to the same identity (within
    ``atol``), so a resumed run reproduces its iterations."""
    again = t.refine(t.identity, seed=t.seed)
    problem = _identity_difference(t.result(), again, t.atol)
    if problem:
        fail(f"two refines with seed={t.seed} differ: {problem}")


@refiner_check
def check_refiner_warm_start(t: RefinerTrial) -> None:
    """Refining from an identity continues it: same token, same widths."""
    start = t.identity if t.identity is not None else t.result()
    warm = t.refine(start, seed=t.seed + 1)
    if not isinstance(warm, Identity):
        fail(f"refine() from an identity must return an Identity, got {type(warm).__name__}")
    if warm.token != start.token:
        fail(f"continuing from {start.token!r} returned token {warm.token!r}")
    for name in ("clip_l", "clip_g"):
        if tuple(getattr(warm, name).shape) != tuple(getattr(start, name).shape):
            fail(f"continuing changed the shape of {name}")


@refiner_check
def check_refiner_does_not_modify_inputs(t: RefinerTrial) -> None:
    """``refine`` leaves its training images as they were."""
    _ = t.first  # refines once, if no other check has yet
    if image_signature(t.images) != t.signature:
        fail("refine() modified its input images")


@refiner_check
def check_refiner_identity_save_load_round_trip(t: RefinerTrial) -> None:
    """The refined identity survives ``save`` and ``Identity.load`` unchanged."""
    assert_round_trips(t.result())


@refiner_check
def check_refiner_leaves_pipeline_unchanged(t: RefinerTrial) -> None:
    """After ``refine``, the pipeline it shares with the generator is bit-identical: weights,
    trainable flags, train/eval modes, adapters and tokenizer sizes."""
    before, after, _ = t.first
    if before is None or after is None:
        fail(f"{type(t.stage).__name__} exposes no SDXL pipeline to compare")
    diff = before.diff(after)
    if diff:
        fail("the pipeline changed during refine(): " + "; ".join(diff))


@refiner_check
def check_refiner_only_identity_parameters_train(t: RefinerTrial) -> None:
    """At the last training step, every tensor the pipeline had before is unchanged: only the
    identity's tensors (new token rows, LoRA) train."""
    if not t.observes_training:
        fail(
            f"{type(t.stage).__name__} exposes no SDXL pipeline or its refine() takes no "
            "callback, so training cannot be observed"
        )
    _ = t.first
    problems = t.training
    if problems is None:
        fail("refine() never called its callback, so training could not be observed")
    if problems:
        fail(
            "during training, tensors other than the identity's changed: "
            + "; ".join(problems[:5])
            + (f"; ... {len(problems) - 5} more" if len(problems) > 5 else "")
        )


#: The `Refiner` checks for every refiner, in the order `check_refiner` runs them.
REFINER_CHECKS = (
    check_refiner_protocol,
    check_refiner_returns_identity,
    check_refiner_identity_widths,
    check_refiner_deterministic,
    check_refiner_warm_start,
    check_refiner_does_not_modify_inputs,
    check_refiner_identity_save_load_round_trip,
)

#: The `Refiner` checks for refiners exposing an SDXL ``pipeline``, run after `REFINER_CHECKS`;
#: the second needs ``refine`` to take a ``callback``.
REFINER_PIPELINE_CHECKS = (
    check_refiner_leaves_pipeline_unchanged,
    check_refiner_only_identity_parameters_train,
)


def refiner_cases(
    refiner: Any,
    images: Sequence[Image.Image] | None = None,
    captions: Sequence[str] | None = None,
    identity: Identity | None = None,
    seed: int = 0,
    atol: float = 0.0,
) -> list[ConformanceCase]:
    """The `Refiner` checks bound to one shared `RefinerTrial`: the pipeline checks only for a
    refiner with a pipeline, the training check only when ``refine`` takes a callback."""
    trial = RefinerTrial(refiner, images, captions, identity=identity, seed=seed, atol=atol)
    checks = list(REFINER_CHECKS)
    if trial.pipe is not None:
        checks.append(check_refiner_leaves_pipeline_unchanged)
        if trial.observes_training:
            checks.append(check_refiner_only_identity_parameters_train)
        else:
            logger.info(
                "%s.refine takes no callback: skipping refiner_only_identity_parameters_train",
                type(refiner).__name__,
            )
    return bind(checks, trial)


def check_refiner(
    refiner: Any,
    images: Sequence[Image.Image],
    captions: Sequence[str],
    *,
    identity: Identity | None = None,
    seed: int = 0,
    atol: float = 0.0,
) -> list[str]:
    """Runs the `Refiner` checks; returns the names of the checks that ran.

    Refines three times (twice from `identity` with `seed`, once warm from the result), so
    configure the refiner with few training steps.

    Args:
        refiner: The refiner.
        images: Training images.
        captions: One caption per image, with the identity's token.
        identity: The identity to continue from (`None`: start fresh).
        seed: Seed passed to ``refine``.
        atol: Largest difference accepted between two refines with the same seed (0: exact).

    Raises:
        AssertionError: ``[check_name] what went wrong``.

    Example:
        >>> check_refiner(my_refiner, images, ["a <cc> creature"] * len(images))  # doctest: +SKIP
    """
    return run_all(refiner_cases(refiner, images, captions, identity, seed, atol))
