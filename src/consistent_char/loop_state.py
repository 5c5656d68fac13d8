"""Where a run of the loop stands: its state between iterations, and its run folder's record.

The extractor keeps one `LoopState` per `extract` call. With a run folder, each finished step
is recorded in its ``state.json`` (`mark_step`), so a cut run resumes from there with the
identity it had learned (`load_last_identity`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from consistent_char.config import ExtractorConfig
from consistent_char.errors import InvalidValueError
from consistent_char.identity import Identity
from consistent_char.interfaces import ConvergenceCriterion, IterationRecord
from consistent_char.rundir import RunDirectory, RunState, Step

__all__ = [
    "LoopState",
    "check_embeddings",
    "check_prompt",
    "default_run_name",
    "json_floats",
    "load_identity",
    "load_last_identity",
    "mark_step",
    "open_run",
]


@dataclass
class LoopState:
    """What one run of the loop carries from one iteration to the next."""

    prompt: str
    run: RunDirectory | None
    state: RunState
    start: int  # the first iteration to run (past the finished ones of a resumed run)
    history: list[IterationRecord]
    variations: list[str]  # image j's prompt, before the token
    criterion: ConvergenceCriterion
    identity: Identity | None  # Θ: the identity learned so far (None before the first refine)
    anchor: tuple[np.ndarray, float] | None  # iteration 0's chosen cluster: centroid, cohesion
    earlier: list[tuple[Image.Image, str]]  # accumulate_chosen: earlier chosen members
    converged: bool = False
    learned: dict[int, Identity] = field(default_factory=dict)  # Θ after each refine
    base_images: list[Image.Image] | None = None  # iteration 0's: the base model's own


def open_run(
    run: RunDirectory | None, prompt: str, config: ExtractorConfig, resume: bool
) -> RunState:
    """The state of a new run, or of the run in `run` to resume (checked against `config`)."""
    if run is None:
        if resume:
            raise ValueError("resume=True needs the run_dir of the run to continue")
        return RunState(prompt=prompt)
    return run.open(prompt, config, resume=resume)


def load_identity(run: RunDirectory | None, iteration: int) -> Identity:
    """The identity iteration `iteration` learned, from the run folder."""
    if run is None:
        raise RuntimeError(f"the identity of iteration {iteration} is not in memory")
    return Identity.load(run.iteration_identity_dir(iteration))


def load_last_identity(run: RunDirectory | None, state: RunState) -> Identity | None:
    """The last identity a cut run learned (None for a new run or one cut before refining)."""
    if run is None:
        return None
    last = state.iteration if state.step == "refined" else state.iteration - 1
    # A converged run stops before refining, so its identity is the previous iteration's.
    while last >= 0 and not run.iteration_identity_dir(last).is_dir():
        last -= 1
    return Identity.load(run.iteration_identity_dir(last)) if last >= 0 else None


def mark_step(
    run: RunDirectory,
    state: RunState,
    iteration: int,
    step: Step,
    history: list[IterationRecord] | None,
) -> None:
    """Records in the run folder that `step` of `iteration` is finished (with the history)."""
    state.iteration, state.step = iteration, step
    if history is not None:
        state.history = [r.to_dict() for r in history]
    run.write_state(state)


def json_floats(values: Sequence[float]) -> list[float | None]:
    # An empty cluster has no cohesion (NaN); JSON has no NaN, so it is written as null.
    return [float(v) if math.isfinite(v) else None for v in values]


def check_prompt(prompt: str) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidValueError(
            f"prompt must be a non-empty string, got {prompt!r}: say what to draw, e.g. "
            "'a watercolor fox with a scarf'"
        )
    return prompt.strip()


def check_embeddings(embeddings: np.ndarray, n: int) -> np.ndarray:
    arr = np.asarray(embeddings)
    if arr.ndim != 2 or arr.shape[0] != n:
        raise ValueError(f"embedder returned shape {arr.shape}, expected ({n}, D)")
    if not np.isfinite(arr).all():
        raise ValueError("embedder returned non-finite values")
    return np.ascontiguousarray(arr, dtype=np.float32)


def default_run_name(prompt: str) -> str:
    """A folder name from a prompt: ``"a watercolor fox" -> "a-watercolor-fox"``."""
    slug = "".join(c if c.isalnum() else "-" for c in prompt.lower()).strip("-")
    return "-".join(p for p in slug.split("-") if p)[:60] or "run"
