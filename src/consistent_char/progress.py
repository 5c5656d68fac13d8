"""`ProgressEvent`: what the extractor reports to a callback as a run goes on."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from consistent_char.interfaces import IterationRecord
from consistent_char.seeds import StageName

__all__ = ["EventKind", "ProgressCallback", "ProgressEvent", "ProgressReporter"]

EventKind = Literal["stage_start", "progress", "stage_end", "iteration_end"]


@dataclass
class ProgressEvent:
    """What the extractor reports to its callback.

    `kind` is ``"stage_start"``, ``"progress"``, ``"stage_end"`` or ``"iteration_end"``; `done`
    and `total` count the stage's units (images, training steps); `record` is set on
    ``"iteration_end"``.
    """

    kind: EventKind
    iteration: int
    stage: StageName | None = None
    done: int = 0
    total: int = 0
    seconds: float = 0.0
    record: IterationRecord | None = None
    extra: dict[str, Any] = field(default_factory=dict)


ProgressCallback = Callable[[ProgressEvent], None]


class ProgressReporter:
    """Sends `ProgressEvent`s to a callback (or nowhere) and times each stage."""

    def __init__(self, callback: ProgressCallback | None) -> None:
        self.callback = callback

    @contextmanager
    def stage(
        self, iteration: int, stage: StageName, total: int, seconds: dict[str, float]
    ) -> Iterator[None]:
        """Reports the stage's start and end, and adds its time to ``seconds[stage]``."""
        self.emit("stage_start", iteration, stage, total=total)
        t0 = time.perf_counter()
        yield
        elapsed = time.perf_counter() - t0
        seconds[stage] = seconds.get(stage, 0.0) + elapsed
        self.emit("stage_end", iteration, stage, done=total, total=total, seconds=elapsed)

    def emit(
        self,
        kind: EventKind,
        iteration: int,
        stage: StageName | None = None,
        *,
        done: int = 0,
        total: int = 0,
        seconds: float = 0.0,
        record: IterationRecord | None = None,
    ) -> None:
        """Calls the callback with one event; an exception it raises stops the run."""
        if self.callback is not None:
            self.callback(
                ProgressEvent(kind, iteration, stage, done, total, seconds, record=record)
            )
