"""What the conformance checks of every stage kind share: sample inputs, the check decorator that
names failures, the ``(name, check)`` table rows, and image comparisons."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, NoReturn, TypeVar

import numpy as np
from PIL import Image
from typing_extensions import Self

#: A conformance check: takes the stage (or its prepared trial), raises `AssertionError` when
#: the stage breaks the contract the check is about.
Check = Callable[[Any], None]

_T = TypeVar("_T")


class ConformanceCase(NamedTuple):
    """One named check bound to a stage and its inputs; call ``check()`` to run it."""

    name: str
    check: Callable[[], None]


class Trial:
    """A stage with the inputs its checks run on; outputs computed once are shared by every
    check given the same trial. Each stage kind has its own (`EmbedderTrial`, ...)."""

    def __init__(self, stage: Any) -> None:
        self.stage = stage

    @classmethod
    def of(cls, stage: Any) -> Self:
        """`stage` itself when it is already such a trial, else a trial with default inputs."""
        return stage if isinstance(stage, cls) else cls(stage)


# ----------------------------------------------------------------------------- inputs


def sample_images(
    n: int = 6, *, size: tuple[int, int] = (48, 40), seed: int = 0
) -> list[Image.Image]:
    """`n` distinct RGB images (colour gradients with a random square), non-square on purpose.

    Example:
        >>> [im.size for im in sample_images(2)]
        [(48, 40), (48, 40)]
    """
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    images = []
    for _ in range(n):
        base = rng.uniform(0, 255, 3)
        slope = rng.uniform(-2, 2, (2, 3))
        pixels = base + xx[..., None] * slope[0] + yy[..., None] * slope[1]
        s = max(2, min(w, h) // 3)
        top, left = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
        pixels[top : top + s, left : left + s] = rng.uniform(0, 255, 3)
        images.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB"))
    return images


def sample_blobs(
    n_per_blob: int = 8, n_blobs: int = 3, dim: int = 4, *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Well separated Gaussian blobs: float32 embeddings (N, dim) and their int64 blob labels.

    The centres are at least 10 apart, the points within 0.05 of them: any reasonable
    clusterer with k = n_blobs recovers the blobs.
    """
    rng = np.random.default_rng(seed)
    centres = 10.0 * np.eye(max(n_blobs, dim))[:n_blobs, :dim] * np.sqrt(2)
    if n_blobs > dim:
        centres = rng.normal(0, 1, (n_blobs, dim))
        centres *= 10 / min(
            np.linalg.norm(a - b) for i, a in enumerate(centres) for b in centres[i + 1 :]
        )
    x = np.concatenate([c + rng.normal(0, 0.01, (n_per_blob, dim)) for c in centres])
    return x.astype(np.float32), np.repeat(np.arange(n_blobs), n_per_blob).astype(np.int64)


# ----------------------------------------------------------------------- checks and cases


def fail(message: str) -> NoReturn:
    """Reports a broken contract; `conformance_check` prefixes the check's name."""
    raise AssertionError(message)


def check_name(check: Callable[..., Any]) -> str:
    """The name a check reports under: its function name without ``check_``."""
    return check.__name__.removeprefix("check_")


def conformance_check(prepare: Callable[[Any], _T]) -> Callable[[Callable[[_T], None]], Check]:
    """Turns ``check_<name>(trial)`` into a check that runs on its own.

    The decorated check takes the stage itself (its trial is then made with default inputs by
    `prepare`) or a trial prepared by the caller, whose outputs the checks of one table share.
    Every failure, and any other exception the stage raises, comes out as
    ``AssertionError("[<name>] what went wrong")``; bad inputs (`prepare` raising) do not.
    """

    def decorate(body: Callable[[_T], None]) -> Check:
        name = check_name(body)

        @functools.wraps(body)
        def check(stage: Any) -> None:
            trial = prepare(stage)
            try:
                body(trial)
            except AssertionError as err:
                text = str(err)
                raise AssertionError(
                    text if text.startswith(f"[{name}]") else f"[{name}] {text}"
                ) from err
            except Exception as err:
                raise AssertionError(f"[{name}] raised {type(err).__name__}: {err}") from err

        return check

    return decorate


def bind(checks: Sequence[Check], trial: Any) -> list[ConformanceCase]:
    """One `ConformanceCase` per check, all on the same `trial` so they share its outputs."""
    cases = []
    for check in checks:
        name = check_name(check)

        def run(check: Check = check) -> None:
            check(trial)

        run.__name__ = run.__qualname__ = name
        cases.append(ConformanceCase(name, run))
    return cases


def run_all(cases: list[ConformanceCase]) -> list[str]:
    """Runs `cases` in order, stopping at the first failure; returns their names."""
    for case in cases:
        case.check()
    return [case.name for case in cases]


# --------------------------------------------------------------------------- images


def max_pixel_diff(a: Sequence[Image.Image], b: Sequence[Image.Image]) -> int:
    """Largest absolute pixel difference between two image lists (huge if their shapes differ)."""
    pa = [np.asarray(im).astype(np.int16) for im in a]
    pb = [np.asarray(im).astype(np.int16) for im in b]
    if [p.shape for p in pa] != [p.shape for p in pb]:
        return 10**9
    return max((int(np.abs(x - y).max()) for x, y in zip(pa, pb, strict=True)), default=0)


def image_signature(images: Sequence[Image.Image]) -> list[tuple[str, tuple[int, int], str]]:
    """Mode, size and content hash of each image: equal signatures mean untouched inputs."""
    return [(im.mode, im.size, hashlib.sha1(im.tobytes()).hexdigest()) for im in images]
