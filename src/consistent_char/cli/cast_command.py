"""The ``cast`` command: one identity per subject of a prompt set, in this process or on Ray."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from consistent_char.cli.commands import _run_settings
from consistent_char.cli.core import (
    INTERNAL_ERROR,
    INTERRUPTED,
    ConfigOption,
    SetOption,
    app,
    fail,
    progress_bars,
    say,
    setup_logging,
)
from consistent_char.config import DEFAULT_MODEL, CastConfig

if TYPE_CHECKING:
    from consistent_char.cast import CastEvent, CastRecord
    from consistent_char.cast.ray_backend import RayBackend
    from consistent_char.config import ExtractorConfig
    from consistent_char.eval.real import PromptSet


def _help(name: str) -> str:
    """A Ray option's help: its `CastConfig` field's description and default."""
    field = CastConfig.model_fields[name]
    default = "" if field.default is None else f" Default {field.default:g}."
    return f"{field.description}{default} With --ray."


@app.command()
def cast(
    subjects: Annotated[
        str,
        typer.Argument(help="A prompt-set file (as for eval real) or a built-in set: consistory+."),
    ],
    out: Annotated[Path, typer.Option("--out", help="Cast folder (an earlier cast's resumes).")],
    model: Annotated[
        str | None,
        typer.Option(
            help=f"SDXL hub id, local diffusers folder, or 'toy'; default {DEFAULT_MODEL}."
        ),
    ] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            help="Run each subject as a Ray task: 'auto' (this machine's cluster, else a local "
            "instance) or a cluster address. Needs consistent-char[ray].",
        ),
    ] = None,
    gpus_per_subject: Annotated[
        float | None,
        typer.Option(min=0, help=_help("gpus_per_subject")),
    ] = None,
    cpus_per_subject: Annotated[
        float | None,
        typer.Option(min=0.01, help=_help("cpus_per_subject")),
    ] = None,
    max_retries: Annotated[int | None, typer.Option(min=0, help=_help("max_retries"))] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log INFO messages.")] = False,
) -> None:
    """Find a consistent character for every subject of SUBJECTS, one run folder each."""
    setup_logging(verbose)
    from consistent_char.cast import load_subjects, plan_cast

    # 1. Check inputs: the subjects, the settings, the cast folder and Ray, before any model loads.
    prompts, source = load_subjects(subjects)
    _, cfg = _run_settings(out, model, config, set_, resume=False)
    for warning in cfg.warnings():
        say(("warning:", "yellow"), " ", warning)
    plan_cast(prompts, out, cfg, source=source)
    task_options = {
        "gpus_per_subject": gpus_per_subject,
        "cpus_per_subject": cpus_per_subject,
        "max_retries": max_retries,
    }
    backend = _backend(ray, task_options, cfg, verbose=verbose)

    # 2. Run every subject; each ends as one line, the bar counts the whole cast.
    record = _run_with_progress(prompts, out, cfg, source, backend, quiet=quiet)
    _summary(record, out)


def _backend(
    ray: str | None, options: dict[str, float | None], cfg: ExtractorConfig, *, verbose: bool
) -> RayBackend | None:
    """The Ray backend `--ray` asks for, with the Ray task options given; None without it."""
    chosen = {k: v for k, v in options.items() if v is not None}
    if ray is None:
        if chosen:
            names = ", ".join("--" + k.replace("_", "-") for k in chosen)
            fail(f"{names}: Ray task settings, which apply only with --ray")
        return None
    from consistent_char.cast.ray_backend import RayBackend

    settings = CastConfig.model_validate(chosen).with_defaults_for(cfg)
    return RayBackend(ray, settings, log_to_driver=verbose)


def _run_with_progress(
    prompts: PromptSet,
    out: Path,
    cfg: ExtractorConfig,
    source: str,
    backend: RayBackend | None,
    *,
    quiet: bool,
) -> CastRecord:
    """Runs the cast under one bar for all its subjects; Ctrl-C says how to resume, exits 130."""
    from consistent_char.cast import run_cast

    with progress_bars(quiet) as progress:
        bar = progress.add_task("cast", total=len(prompts.subjects))

        def show(event: CastEvent) -> None:
            if event.kind == "end":
                progress.update(bar, completed=event.finished)
                progress.console.print(_subject_line(event))

        try:
            return run_cast(prompts, out, cfg, source=source, backend=backend, callback=show)
        except KeyboardInterrupt:
            progress.stop()
            say(("interrupted;", "yellow"), " run the same command again to resume the cast")
            raise typer.Exit(INTERRUPTED) from None


def _subject_line(event: CastEvent) -> str:
    r = event.record
    where = f"[{event.finished}/{event.total}] {r.subject!r}"
    if r.status == "failed":
        return f"{where}: failed: {r.error}"
    state = "converged" if r.converged else "not converged"
    seconds = "" if event.reused else f", {r.seconds:.1f} s"
    reused = " (finished before)" if event.reused else ""
    return f"{where}: {r.iterations} iterations ({state}){seconds} → {r.run}{reused}"


def _summary(record: CastRecord, out: Path) -> None:
    counts = record.counts()
    total = len(record.subjects)
    seconds = record.seconds or 0.0
    if counts["failed"]:
        say(
            ("done with failures", "bold red"),
            f": {counts['done']} of {total} subjects done, {counts['failed']} failed, in "
            f"{seconds:.1f} s; see {out / 'cast.json'}; run the same command again to retry them",
        )
        raise typer.Exit(INTERNAL_ERROR)
    say(("done", "bold green"), f": {total} subjects in {seconds:.1f} s; {out / 'cast.json'}")
