"""Drawing an iteration's images in chunks, each chunk written to the run folder as it comes.

Image j depends only on its prompt and seed, so a run cut during generation keeps the images it
wrote and draws only the rest when resumed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from PIL import Image

from consistent_char.identity import Identity
from consistent_char.interfaces import Generator
from consistent_char.loop_state import mark_step
from consistent_char.progress import ProgressReporter
from consistent_char.rundir import RunDirectory, RunState

__all__ = ["GENERATION_CHUNK", "accepts", "generate_images"]

# Large enough that the generator's own batching stays efficient and the identity is applied
# rarely; small enough that a cut run keeps most of what it drew.
GENERATION_CHUNK = 64


def generate_images(
    generator: Generator,
    run: RunDirectory | None,
    state: RunState,
    iteration: int,
    prompts: Sequence[str],
    seeds: Sequence[int],
    identity: Identity | None,
    progress: ProgressReporter,
) -> list[Image.Image]:
    """Iteration `iteration`'s images, one per (prompt, seed), as RGB.

    With a run folder, the images already written are read back and only the rest are drawn;
    each chunk is written as PNGs on a worker thread while the next one is drawn, and the step
    is marked done once every write has succeeded.
    """
    n = len(seeds)
    if run is not None and state.done(iteration, "generated"):
        return run.load_images(iteration, n)
    have = run.existing_images(iteration, n) if run is not None else 0
    images = run.load_images(iteration, have) if run is not None else []
    progress.emit("progress", iteration, "generate", done=have, total=n)
    with ThreadPoolExecutor(max_workers=1) as writer:
        pending = []
        for start in range(have, n, GENERATION_CHUNK):
            end = start + GENERATION_CHUNK
            done_before = len(images)

            def report(done: int, _total: int, before: int = done_before) -> None:
                progress.emit("progress", iteration, "generate", done=before + done, total=n)

            new = _generate_chunk(
                generator, list(prompts[start:end]), list(seeds[start:end]), identity, report
            )
            if run is not None:
                pending.append(writer.submit(run.save_images, iteration, start, new))
            images += new
            progress.emit("progress", iteration, "generate", done=len(images), total=n)
        for future in pending:
            future.result()  # re-raises a failed write before the step is marked done
    if run is not None:
        mark_step(run, state, iteration, "generated", None)
    return images


def _generate_chunk(
    generator: Generator,
    prompts: list[str],
    seeds: list[int],
    identity: Identity | None,
    report: Callable[[int, int], None],
) -> list[Image.Image]:
    kwargs: dict[str, Any] = {}
    if accepts(generator.generate, "callback"):
        # Finer progress from generators that report it (the default reports per batch).
        kwargs["callback"] = report
    new = generator.generate(prompts, seeds, identity, **kwargs)
    if len(new) != len(seeds):
        raise RuntimeError(f"generator returned {len(new)} images for {len(seeds)} prompts")
    return [im.convert("RGB") for im in new]


def accepts(method: Callable[..., Any], name: str) -> bool:
    """True when `method` takes a parameter called `name` (an optional stage feature)."""
    try:
        return name in inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False
