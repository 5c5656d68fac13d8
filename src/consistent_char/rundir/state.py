"""``state.json``: which steps of a run are finished, the history of its iterations and the
checksum of every file it wrote; validated field by field when read back.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, Literal

from consistent_char.errors import InputFileError

Step = Literal["generated", "embedded", "clustered", "refined"]
STEPS: tuple[Step, ...] = ("generated", "embedded", "clustered", "refined")

STATE_VERSION = 1


@dataclass
class RunState:
    """What is finished: `(iteration, step)` is the last completed step; `history` holds the
    records of the iterations so far (as dicts), `finished` is set when the run returned;
    `checksums` maps run-relative file paths to their SHA-256 as written."""

    prompt: str
    iteration: int = -1
    step: Step | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False
    converged: bool = False
    version: int = STATE_VERSION
    checksums: dict[str, str] = field(default_factory=dict)

    def done(self, iteration: int, step: Step) -> bool:
        """True when `step` of `iteration` finished before (so a resumed run skips it)."""
        if self.step is None or iteration > self.iteration:
            return False
        if iteration < self.iteration:
            return True
        return STEPS.index(step) <= STEPS.index(self.step)

    def roll_back_to_before(self, iteration: int, step: Step) -> None:
        """Forgets `step` of `iteration` and everything after it, so a run computes it again."""
        index = STEPS.index(step)
        if index > 0:
            self.iteration, self.step = iteration, STEPS[index - 1]
        elif iteration > 0:
            self.iteration, self.step = iteration - 1, "refined"
        else:
            self.iteration, self.step = -1, None
        self.history = self.history[:iteration]
        self.finished = self.converged = False

    @classmethod
    def from_dict(cls, data: Any, source: Path) -> RunState:
        """Validates a parsed ``state.json``; raises `InputFileError` naming what is wrong."""

        def bad(why: str) -> InputFileError:
            return InputFileError(
                f"{source} is not a valid run state ({why}): restore it, or start a new run in "
                "another folder"
            )

        if not isinstance(data, dict):
            raise bad(f"a JSON object was expected, found {type(data).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise bad(f"unknown keys {unknown}")
        if not isinstance(data.get("prompt"), str) or not data["prompt"].strip():
            raise bad("no prompt")
        if data.get("version", STATE_VERSION) != STATE_VERSION:
            raise bad(f"version {data.get('version')!r}, this library reads {STATE_VERSION}")
        it = data.get("iteration", -1)
        if isinstance(it, bool) or not isinstance(it, int) or it < -1:
            raise bad(f"iteration {it!r}")
        step = data.get("step")
        if step is not None and step not in STEPS:
            raise bad(f"step {step!r}")
        if (step is None) != (it == -1):
            raise bad(f"iteration {it} with step {step!r}")
        history = data.get("history", [])
        if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
            raise bad("history is not a list of records")
        for index, record in enumerate(history):
            problem = _record_problem(record, index)
            if problem:
                raise bad(f"history[{index}] {problem}")
        for name in ("finished", "converged"):
            if not isinstance(data.get(name, False), bool):
                raise bad(f"{name} is {data[name]!r}")
        checksums = data.get("checksums", {})
        if not isinstance(checksums, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in checksums.items()
        ):
            raise bad("checksums is not a mapping of file names to digests")
        return cls(**data)


def _record_problem(record: dict[str, Any], index: int) -> str | None:
    """What is wrong with one saved `IterationRecord`, or None."""
    from consistent_char.interfaces import IterationRecord

    fields = IterationRecord.__dataclass_fields__
    required = {
        n for n, f in fields.items() if f.default is MISSING and f.default_factory is MISSING
    }
    if set(record) - set(fields) or required - set(record):
        unknown, missing = sorted(set(record) - set(fields)), sorted(required - set(record))
        return f"has unknown keys {unknown} or lacks {missing}"
    if record["iteration"] != index:
        return f"is iteration {record['iteration']!r}"
    for name in ("spread", "threshold"):
        value = record[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            return f"has {name} {value!r}"
    return None
