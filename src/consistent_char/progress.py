"""`ProgressEvent`: what the extractor reports to a callback as a run goes on."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from consistent_char.interfaces import IterationRecord
from consistent_char.seeds import StageName

__all__ = ["EventKind", "ProgressCallback", "ProgressEvent"]

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
