"""A cast: one identity per subject of a prompt set, each in its own resumable run folder.

Each subject's extraction is what ``consistent-char extract SUBJECT --out CAST/RUN`` does with
the same config (so the same seeds): a cast of one equals an extract. A subject whose run
finished is skipped, an unfinished one resumes its folder, and a subject that fails is
recorded in ``cast.json`` while the others go on. The subjects run one after another in this
process (`SequentialBackend`) or as tasks on a Ray cluster
(`consistent_char.cast.ray_backend.RayBackend`).

Example:
    >>> from consistent_char import ExtractorConfig
    >>> prompts, source = load_subjects("subjects.yaml")  # doctest: +SKIP
    >>> record = run_cast(prompts, "cast/", ExtractorConfig.build({"model": "toy"}),
    ...                   source=source)  # doctest: +SKIP
    >>> record.counts()  # doctest: +SKIP
    {'pending': 0, 'running': 0, 'done': 3, 'failed': 0}
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from consistent_char.cast.record import CAST_FILE, CastRecord, SubjectRecord
from consistent_char.cast.subjects import load_subjects, run_folder_names
from consistent_char.errors import OutputExistsError, UserError, one_line

if TYPE_CHECKING:
    from consistent_char.config import ExtractorConfig
    from consistent_char.eval.real import PromptSet
    from consistent_char.extractor import IterativeIdentityExtractor
    from consistent_char.rundir import RunDirectory

__all__ = [
    "CastBackend",
    "CastEvent",
    "SequentialBackend",
    "SubjectJob",
    "extract_subject",
    "load_subjects",
    "plan_cast",
    "run_cast",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SubjectJob:
    """What a worker needs to extract one subject: plain data, so it travels to a Ray worker.

    Attributes:
        subject: The subject's prompt.
        run_dir: Its run folder (absolute).
        config: The extractor's config as a dict (`ExtractorConfig.to_dict`).
    """

    subject: str
    run_dir: str
    config: dict[str, Any]


#: What a finished job reports: ``status`` ("done" or "failed"), ``error``, ``iterations``,
#: ``converged``, ``seconds``.
Outcome = dict[str, Any]


class CastBackend(Protocol):
    """Runs the jobs of a cast; calls `on_start` when a job is handed to a worker and
    `on_done` with its outcome when it ends, in the order they end."""

    def run(
        self,
        jobs: Sequence[SubjectJob],
        on_start: Callable[[SubjectJob], None],
        on_done: Callable[[SubjectJob, Outcome], None],
    ) -> None: ...


@dataclass
class CastEvent:
    """What a cast reports as it goes.

    Attributes:
        kind: ``"start"`` when a subject is handed to a worker, ``"end"`` when it ended
            (done or failed) or was found finished before the cast started (`reused`).
        record: The subject's record (its status, and after ``"end"`` its outcome).
        finished: Subjects ended so far, this one included.
        total: Subjects in the cast.
        reused: The subject's run had finished before this cast started.
    """

    kind: Literal["start", "end"]
    record: SubjectRecord
    finished: int
    total: int
    reused: bool = False


# ----------------------------------------------------------------------------- one subject


_EXTRACTOR: tuple[str, IterativeIdentityExtractor] | None = None


def _extractor_for(config: ExtractorConfig) -> IterativeIdentityExtractor:
    """The extractor for `config`, its models loaded once per process: a sequential cast and a
    Ray worker that runs several subjects load them for the first only (an extraction leaves
    the stages as it found them, so the next subject's run is the same as in a new process)."""
    from consistent_char.extractor import IterativeIdentityExtractor

    global _EXTRACTOR
    key = config.to_yaml()
    if _EXTRACTOR is None or _EXTRACTOR[0] != key:
        _EXTRACTOR = None  # free the previous models before loading others
        _EXTRACTOR = (key, IterativeIdentityExtractor.from_config(config))
    return _EXTRACTOR[1]


def extract_subject(job: SubjectJob) -> Outcome:
    """Extracts one subject into its run folder, resuming the run there if one was started;
    any error becomes a ``failed`` outcome with its text (the cast goes on)."""
    from consistent_char.config import ExtractorConfig
    from consistent_char.rundir import RunDirectory

    start = time.perf_counter()
    try:
        config = ExtractorConfig.build(job.config)
        run = RunDirectory(job.run_dir)
        if not run.exists():
            _clear_unstarted(Path(job.run_dir), config)
        result = _extractor_for(config).extract(
            job.subject, run_dir=job.run_dir, resume=run.exists()
        )
    except Exception as err:  # noqa: BLE001 - recorded; the other subjects go on
        logger.warning("subject %r failed: %s", job.subject, err)
        text = str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
        return {"status": "failed", "error": one_line(text), "seconds": _since(start)}
    return {
        "status": "done",
        "error": None,
        "iterations": result.iterations,
        "converged": result.converged,
        "seconds": _since(start),
    }


def _since(start: float) -> float:
    return round(time.perf_counter() - start, 3)


def _clear_unstarted(folder: Path, config: Any) -> None:
    """Removes the ``config.yaml`` of this subject's run whose writer died before its
    ``state.json``: the run never started, and the file would make the folder look like someone
    else's. Only a file that holds this very config is removed; any other is left alone."""
    from consistent_char.config import ExtractorConfig, load_mapping
    from consistent_char.rundir import LOCK_FILE, TEMP_SUFFIX, RunLock

    if not folder.is_dir() or RunLock(folder).holder() is not None:
        return
    names = {p.name for p in folder.iterdir() if not p.name.endswith(TEMP_SUFFIX)}
    if names - {LOCK_FILE} != {"config.yaml"}:
        return
    try:
        ours = ExtractorConfig.build(load_mapping(folder / "config.yaml")) == config
    except (OSError, ValueError):
        ours = False
    if ours:
        (folder / "config.yaml").unlink()


class SequentialBackend:
    """Runs the subjects one after another in this process, loading the models once."""

    def run(
        self,
        jobs: Sequence[SubjectJob],
        on_start: Callable[[SubjectJob], None],
        on_done: Callable[[SubjectJob, Outcome], None],
    ) -> None:
        for job in jobs:
            on_start(job)
            on_done(job, extract_subject(job))


# ----------------------------------------------------------------------------- the cast


def plan_cast(
    prompt_set: PromptSet, out: str | os.PathLike[str], config: ExtractorConfig, *, source: str
) -> CastRecord:
    """The cast's record before it runs: each subject's run folder, and ``done`` for those
    whose run finished before (their iterations and convergence read from it).

    Raises:
        ConfigError: A subject's run was made with other settings than `config` (a finished
            run would be kept, an unfinished one could not resume).
        OutputNotWritableError: `out` cannot be created or written.
        OutputExistsError: `out` holds other files than the subjects' run folders and is not
            a cast folder.
    """
    from consistent_char.rundir import RunDirectory, check_output_dir

    root = check_output_dir(out)
    names = [s.name for s in prompt_set.subjects]
    folders = run_folder_names(names)
    others = {p.name for p in root.iterdir()} - set(folders) if root.is_dir() else set()
    if others and not (root / CAST_FILE).is_file():
        raise OutputExistsError(
            f"{root} exists and is not a cast folder (no {CAST_FILE}); choose a new or empty "
            "folder, or the folder of an earlier cast to resume it (nothing was changed)"
        )
    record = CastRecord(source)
    for name, folder in zip(names, folders, strict=True):
        entry = SubjectRecord(name, folder)
        record.subjects.append(_planned(entry, RunDirectory(root / folder), config))
    return record


def _planned(entry: SubjectRecord, run: RunDirectory, config: ExtractorConfig) -> SubjectRecord:
    """`entry`, marked ``done`` when its run finished before (with `config`)."""
    if not run.exists():
        return entry
    try:
        state, saved = run.read_state(), run.read_config()
    except UserError:  # its extraction fails with this error, recorded with the subject
        return entry
    _check_same_settings(run.root, saved, config)
    if state.finished:
        entry.status, entry.iterations = "done", len(state.history)
        entry.converged = state.converged
    return entry


def _check_same_settings(run: Path, saved: ExtractorConfig, config: ExtractorConfig) -> None:
    from consistent_char.config import ConfigError

    diff = saved.describe_differences(config)
    if diff:
        raise ConfigError(
            f"{run} was run with other settings; differing fields: {diff}; run the cast with "
            "the settings it started with, or choose another --out"
        )


def run_cast(
    prompt_set: PromptSet,
    out: str | os.PathLike[str],
    config: ExtractorConfig,
    *,
    source: str,
    backend: CastBackend | None = None,
    callback: Callable[[CastEvent], None] | None = None,
) -> CastRecord:
    """Extracts an identity for every subject of `prompt_set` into ``out/RUN`` and records the
    cast in ``out/cast.json`` (rewritten as each subject starts and ends).

    Args:
        prompt_set: The subjects (their settings are for ``eval real``).
        out: The cast folder: new, empty, or an earlier cast's (which is resumed).
        config: Every subject's extraction config.
        source: Where the subjects came from (a built-in set's name or a file), recorded.
        backend: Runs the subjects; default `SequentialBackend`.
        callback: Receives a `CastEvent` as each subject starts and ends.

    Returns:
        The cast's record, as written to ``cast.json``.
    """
    started = time.perf_counter()
    record = plan_cast(prompt_set, out, config, source=source)
    root = Path(out).expanduser().absolute()
    root.mkdir(parents=True, exist_ok=True)
    total, finished = len(record.subjects), 0
    report = callback or (lambda event: None)
    for entry in record.subjects:
        if entry.status == "done":
            finished += 1
            report(CastEvent("end", entry, finished, total, reused=True))
    todo = [r for r in record.subjects if r.status != "done"]
    jobs = [SubjectJob(r.subject, str(root / r.run), config.to_dict()) for r in todo]
    record.write(root)

    def on_start(job: SubjectJob) -> None:
        entry = record.subject(job.subject)
        entry.status, entry.error = "running", None
        record.write(root)
        report(CastEvent("start", entry, finished, total))

    def on_done(job: SubjectJob, outcome: Outcome) -> None:
        nonlocal finished
        entry = record.subject(job.subject)
        for key, value in outcome.items():
            setattr(entry, key, value)
        finished += 1
        record.seconds = _since(started)
        record.write(root)
        report(CastEvent("end", entry, finished, total))

    try:
        (backend or SequentialBackend()).run(jobs, on_start, on_done)
    finally:
        # A cut cast (Ctrl-C) leaves its unfinished subjects pending, to be resumed.
        for entry in record.subjects:
            if entry.status == "running":
                entry.status = "pending"
        record.seconds = _since(started)
        record.write(root)
    return record
