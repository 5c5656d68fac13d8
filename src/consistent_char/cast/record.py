"""``cast.json``: every subject of a cast, its run folder and how its extraction went.

It is rewritten atomically each time a subject starts or ends, so that a cut cast leaves a
record that a later ``consistent-char cast`` (which resumes) and ``eval real --cast`` read.

    {"written_by": "consistent-char cast", "prompt_set": "consistory+", "seconds": 812.4,
     "subjects": [{"subject": "...", "run": "a-fiery-...", "status": "done", "error": null,
                   "iterations": 4, "converged": true, "seconds": 201.7}, ...]}

``run`` is relative to the cast folder; ``status`` is ``pending``, ``running`` (on Ray: handed
to the cluster, maybe still queued), ``done`` or ``failed`` (with the error's text in
``error``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from consistent_char.errors import InputFileError

__all__ = ["CAST_FILE", "CAST_MARK", "CastRecord", "SubjectRecord", "SubjectStatus"]

#: The record's file name inside the cast folder.
CAST_FILE = "cast.json"
#: What every cast.json says wrote it.
CAST_MARK = "consistent-char cast"

SubjectStatus = Literal["pending", "running", "done", "failed"]


@dataclass
class SubjectRecord:
    """One subject of a cast.

    Attributes:
        subject: The subject's prompt (the identity prompt of the extraction).
        run: Its run folder, relative to the cast folder.
        status: ``pending``, ``running``, ``done`` or ``failed``.
        error: The error's one-line text when it failed.
        iterations: Iterations of its finished run.
        converged: Whether its run converged.
        seconds: Wall time of the extraction that finished it (a resumed run counts from its
            resume; a worker that died is not counted).
    """

    subject: str
    run: str
    status: SubjectStatus = "pending"
    error: str | None = None
    iterations: int | None = None
    converged: bool | None = None
    seconds: float | None = None


@dataclass
class CastRecord:
    """The whole cast: where its subjects came from and each subject's record."""

    prompt_set: str
    subjects: list[SubjectRecord] = field(default_factory=list)
    seconds: float | None = None

    def subject(self, name: str) -> SubjectRecord:
        """The record of subject `name` (KeyError if the cast has none)."""
        for record in self.subjects:
            if record.subject == name:
                return record
        raise KeyError(name)

    def counts(self) -> dict[str, int]:
        """How many subjects have each status."""
        statuses = ("pending", "running", "done", "failed")
        return {s: sum(r.status == s for r in self.subjects) for s in statuses}

    def to_dict(self) -> dict[str, Any]:
        return {"written_by": CAST_MARK, **dataclasses.asdict(self)}

    def write(self, folder: Path) -> None:
        """Writes ``folder/cast.json`` atomically."""
        from consistent_char.rundir import write_json_atomic

        write_json_atomic(folder / CAST_FILE, self.to_dict())

    @classmethod
    def read(cls, folder: str | Path) -> CastRecord:
        """Reads ``folder/cast.json``.

        Raises:
            InputNotFoundError: There is none (the folder is not a cast).
            InputFileError: It is not a cast record.
        """
        from consistent_char.errors import InputNotFoundError

        path = Path(folder) / CAST_FILE
        if not path.is_file():
            raise InputNotFoundError(
                f"{folder} is not a cast folder: no {CAST_FILE} in it (consistent-char cast "
                "writes one)"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("written_by") != CAST_MARK:
                raise ValueError(f"written_by is not {CAST_MARK!r}")
            subjects = [SubjectRecord(**s) for s in data["subjects"]]
            return cls(data["prompt_set"], subjects, data.get("seconds"))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise InputFileError(f"{path} is not a cast record ({err})") from None
