"""The `consistent-char` command. The library logs; only this module prints.

Every error a user can fix ends the command with one line on stderr, ``error: ...``, and exit
status 2: bad options (click's usage errors), bad settings and files (`consistent_char.errors`'
`UserError`\ s, `ValueError`\ s of the library's input checks) and the operating system's
refusals (`OSError`: a full disk, a folder without permission). They are caught in one place,
`_Group.main`. Anything else is a bug: one line and exit 1, and the traceback with ``--verbose``.
Ctrl-C exits 130; in `extract` it prints the command that resumes the run.

User text (prompts, paths, tokens, model names) is printed literally: the console interprets no
markup, emoji codes or highlighting.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import shlex
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text
from typer.core import TyperGroup

from consistent_char.config import (
    DEFAULT_MODEL,
    ExtractorConfig,
    load_mapping,
    parse_assignment,
)
from consistent_char.errors import (
    InputNotFoundError,
    InvalidValueError,
    OutputExistsError,
    UserError,
    one_line,
)

try:  # typer vendors click from 0.20 on
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - older typer
    from click import exceptions as click_exceptions  # type: ignore[no-redef]

#: The exit status of every error a user can fix.
USER_ERROR = 2
#: The exit status of an unexpected error (a bug).
INTERNAL_ERROR = 1
#: The exit status after Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED = 130

# Markup, emoji codes (":cat:") and highlighting off: prompts and paths print as typed.
console = Console(stderr=True, markup=False, emoji=False, highlight=False, soft_wrap=True)

_STAGE_LABEL = {
    "generate": "generate",
    "embed": "embed",
    "cluster": "cluster",
    "refine": "refine",
}


class _State:
    """What the error handler needs from the command that ran."""

    verbose = False


def _say(*parts: str | tuple[str, str]) -> None:
    """Prints one line of plain text; a ``(text, style)`` part is styled, never parsed."""
    console.print(Text.assemble(*parts))


def _error_line(message: str) -> None:
    _say(("error:", "bold red"), " ", one_line(message))


def _fail(message: str) -> NoReturn:
    raise InvalidValueError(message)


class _Group(TyperGroup):
    """The command group, with the one place where errors become exit statuses."""

    def main(  # type: ignore[override]
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        code = self._run(args, prog_name, complete_var, **extra)
        if not standalone_mode:
            return code
        sys.exit(code)

    def _run(self, args: Any, prog_name: str | None, complete_var: str | None, **extra: Any) -> int:
        _State.verbose = False
        try:
            result = super().main(
                args=args,
                prog_name=prog_name,
                complete_var=complete_var,
                standalone_mode=False,
                **extra,
            )
        except click_exceptions.ClickException as err:
            if type(err).__name__ == "NoArgsIsHelpError":
                err.show()
                return int(err.exit_code)
            command = getattr(getattr(err, "ctx", None), "command_path", None)
            hint = f" (see {command} --help)" if command else ""
            _error_line(err.format_message().rstrip(".") + hint)
            return int(err.exit_code)
        except typer.Abort:
            _error_line("aborted")
            return INTERNAL_ERROR
        except UserError as err:
            return _report(err, USER_ERROR, traceback_too=False)
        except OSError as err:
            return _report(err, USER_ERROR, message=_os_error(err))
        except ValueError as err:
            return _report(err, USER_ERROR)
        except Exception as err:
            return _report(
                err,
                INTERNAL_ERROR,
                message=f"unexpected {type(err).__name__}: {err}"
                + ("" if _State.verbose else " (run with --verbose for the traceback)"),
            )
        return result if isinstance(result, int) else 0


def _report(
    err: BaseException, code: int, *, message: str | None = None, traceback_too: bool = True
) -> int:
    if _State.verbose and traceback_too:
        console.print("".join(traceback.format_exception(err)).rstrip())
    _error_line(message if message is not None else str(err) or type(err).__name__)
    return code


#: What to do about the operating system's refusals a user meets most.
_OS_ERROR_HINTS = {
    errno.ENOSPC: "free some space and run the command again (extract: with --resume)",
    errno.EDQUOT: "free some space and run the command again (extract: with --resume)",
    errno.EACCES: "check the permissions of that path, or choose another",
    errno.EPERM: "check the permissions of that path, or choose another",
    errno.EROFS: "the file system is read-only: choose a folder on another one",
    errno.ENOENT: "check the path",
}


def _os_error(err: OSError) -> str:
    what = err.strerror or str(err) or type(err).__name__
    where = f": {err.filename}" if err.filename else ""
    hint = _OS_ERROR_HINTS.get(err.errno or 0)
    return f"{what}{where}" + (f"; {hint}" if hint else "")


app = typer.Typer(
    name="consistent-char",
    cls=_Group,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="Find a consistent character for a prompt and use it in any SDXL pipeline.",
)


@app.callback()
def _root() -> None:
    """Find a consistent character for a prompt and use it in any SDXL pipeline."""
    # Before any command imports transformers or diffusers, which read these at import.
    _quiet_environment()


def _quiet_environment() -> None:
    # transformers/diffusers announce every load with bars and advisory notices (a missing
    # torchvision, embedding resizing) that have nothing to do with the user's command.
    for name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        os.environ.setdefault(name, "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _setup_logging(verbose: bool) -> None:
    _State.verbose = verbose
    if not verbose:
        _quiet_environment()
        _quiet_libraries()
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _quiet_libraries() -> None:
    import diffusers
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    diffusers.logging.set_verbosity_error()
    diffusers.logging.disable_progress_bar()


def _finite(minimum: float | None = None) -> Callable[[float | None], float | None]:
    """A typer callback refusing NaN, infinity and values below `minimum` (click's FloatRange
    lets NaN through: every comparison with it is false)."""

    def check(value: float | None) -> float | None:
        if value is None:
            return None
        if not math.isfinite(value) or (minimum is not None and value < minimum):
            bound = "" if minimum is None else f" >= {minimum:g}"
            raise typer.BadParameter(f"must be a finite number{bound}, got {value}")
        return value

    return check


def _check_prompts(
    prompts: list[str], what: str = "prompt", example: str = "'{token} in the snow'"
) -> None:
    for p in prompts:
        if not p.strip():
            _fail(f"the {what} is empty; say what to draw, e.g. {example}")


def _check_seeds(seed: int, count: int) -> None:
    if seed + count - 1 >= 2**63:
        _fail(f"--seed {seed} leaves no room for {count} images below 2**63; choose a smaller seed")


class _ProgressPrinter:
    """Turns the extractor's `ProgressEvent`s into one bar per iteration and one per stage."""

    def __init__(self, progress: Progress, max_iterations: int, core_size: int | None = None):
        self.progress = progress
        self.core_size = core_size
        self.iterations: TaskID = progress.add_task("iterations", total=max_iterations)
        self.stage_task: TaskID | None = None
        self.stage_total = 1

    def __call__(self, event: Any) -> None:
        p = self.progress
        if event.kind == "stage_start":
            label = f"  iter {event.iteration} · {_STAGE_LABEL.get(event.stage, event.stage)}"
            if self.stage_task is not None:
                p.remove_task(self.stage_task)
            self.stage_total = max(event.total, 1)
            self.stage_task = p.add_task(label, total=self.stage_total)
        elif event.kind == "progress" and self.stage_task is not None:
            self.stage_total = max(event.total, 1)
            p.update(self.stage_task, completed=event.done, total=self.stage_total)
        elif event.kind == "stage_end" and self.stage_task is not None:
            p.update(self.stage_task, completed=self.stage_total)
        elif event.kind == "iteration_end" and event.record is not None:
            r = event.record
            p.advance(self.iterations)
            if r.chosen_cluster is None:
                chosen = "converged" if r.converged else "stopped"
            else:
                size = r.cluster_sizes[r.chosen_cluster]
                detail = (
                    f"{size} images, cohesion {r.chosen_cohesion:.3f}"
                    if self.core_size is None
                    else f"{size} images; learns from its densest {self.core_size}, "
                    f"tightness {r.chosen_cohesion:.3f}"
                )
                chosen = f"cluster {r.chosen_cluster} ({detail})"
            p.console.print(
                f"iteration {r.iteration}: spread {r.spread:.4f} "
                f"(threshold {r.threshold:.4f}) → {chosen}"
            )


@app.command()
def extract(
    prompt: Annotated[str, typer.Argument(help="What to draw, e.g. 'a watercolor fox'.")],
    out: Annotated[Path, typer.Option("--out", help="Run directory to write.")],
    model: Annotated[
        str | None,
        typer.Option(
            help="SDXL hub id, local diffusers folder, or 'toy' (ToyWorld, offline); default: "
            f"{DEFAULT_MODEL} (with --resume: the run's own).",
        ),
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML/JSON config file.")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a setting: key=value (dotted, repeatable)."),
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log INFO messages.")] = False,
) -> None:
    """Run the iterative identity extraction (Algorithm 1) for PROMPT."""
    _setup_logging(verbose)
    from consistent_char.extractor import IterativeIdentityExtractor
    from consistent_char.rundir import RunDirectory
    from consistent_char.stages import build_stages

    # 1. Check inputs: the prompt, the settings and the run directory, before any model loads.
    _check_prompts([prompt], example="'a watercolor fox with a scarf'")
    prompt = prompt.strip()
    data = load_mapping(config) if config else {}
    if model is not None:
        data["model"] = model
    overrides = dict(parse_assignment(s) for s in (set_ or []))
    run = RunDirectory(out)
    if resume and not config and not overrides and model is None and run.exists():
        # Resuming without settings means: the run's own config.
        cfg = run.read_config()
    else:
        cfg = ExtractorConfig.from_overrides(overrides, base=data)
    for warning in cfg.warnings():
        _say(("warning:", "yellow"), " ", warning)
    run.check(prompt, cfg, resume=resume)

    # 2. Load the models (the extractor checks the refiner's token and modules before drawing).
    stages = build_stages(cfg, warn=False)
    extractor = IterativeIdentityExtractor(*stages, config=cfg)

    # 3. Run, with a way back after Ctrl-C.
    with Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=quiet,
        transient=False,
    ) as progress:
        printer = _ProgressPrinter(progress, cfg.max_iterations, cfg.core_size)
        try:
            result = extractor.extract(prompt, run_dir=out, resume=resume, callback=printer)
        except KeyboardInterrupt:
            progress.stop()
            _interrupted(run, prompt, out)
    why = result.stop_reason
    state = why if why == "converged" else f"stopped: {why}"
    _say(
        ("done", "bold green"),
        f": {result.iterations} iterations ({state}); identity token ",
        (result.identity.token, "bold"),
        f" in {out / 'identity'}",
    )


def _interrupted(run: Any, prompt: str, out: Path) -> NoReturn:
    if run.exists():
        command = shlex.join(["consistent-char", "extract", prompt, "--out", str(out), "--resume"])
        _say(("interrupted;", "yellow"), " continue the run with: ", command)
    else:
        _say(("interrupted", "yellow"), " before the run started; nothing to resume")
    raise typer.Exit(INTERRUPTED)


@app.command()
def generate(
    identity_dir: Annotated[Path, typer.Argument(help="An identity folder (run/identity).")],
    prompts: Annotated[
        list[str],
        typer.Argument(help="Prompts; '{token}' marks the identity, else the run's template."),
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder for the images.")],
    model: Annotated[
        str | None, typer.Option(help="Base model (default: the one the identity was learned on).")
    ] = None,
    seed: Annotated[
        int, typer.Option(min=0, help="Seed of the first image; image j uses seed+j.")
    ] = 0,
    num_images: Annotated[
        int, typer.Option("--num-images", "-n", min=1, help="Images per prompt.")
    ] = 1,
    steps: Annotated[int | None, typer.Option(min=1, help="Denoising steps.")] = None,
    guidance_scale: Annotated[
        float | None, typer.Option(callback=_finite(0.0), help="CFG scale (>= 0).")
    ] = None,
    scale: Annotated[float, typer.Option(callback=_finite(0.0), help="LoRA scale (>= 0).")] = 1.0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Draw PROMPTS with a learned identity."""
    _setup_logging(verbose)
    from consistent_char.identity import Identity
    from consistent_char.rundir import OutputFolder, save_png_atomic
    from consistent_char.stages import resolve_device
    from consistent_char.usage import base_model, identity_generator, prompt_with_identity

    # 1. Check inputs and outputs before the model loads.
    _check_prompts(prompts)
    _check_seeds(seed, num_images)
    resolve_device(device)
    identity = Identity.load(identity_dir)
    full = [prompt_with_identity(identity, p) for p in prompts]
    jobs = [(p, seed + j) for p in full for j in range(num_images)]
    names = [f"{k:03d}_seed{s}.png" for k, (_, s) in enumerate(jobs)]
    folder = OutputFolder(out)
    folder.check(names)
    base, why = base_model(identity, model)
    _say(f"model: {base} ({why})")

    # 2. Draw and write.
    generator = identity_generator(
        identity,
        model=base,
        device=device,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        lora_scale=scale,
    )
    images = generator.generate([p for p, _ in jobs], [s for _, s in jobs], identity)
    folder.claim(names)
    for name, (p, _), image in zip(names, jobs, images, strict=True):
        save_png_atomic(out / name, image)
        _say(f"{out / name}  ←  {p}")


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (written by extract).")],
    sample: Annotated[
        list[str] | None,
        typer.Option(
            "--sample",
            help="Also draw the final identity for this prompt into RUN_DIR/samples "
            "(repeatable; loads the model).",
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option(min=0, help="Seed of the first sample; sample j uses seed+j.")
    ] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ... (for --sample)")] = "auto",
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """(Re)build RUN_DIR/report.html: grids, clusters, spread curve, stage times, samples."""
    _setup_logging(verbose)
    from consistent_char.identity import IDENTITY_JSON, Identity
    from consistent_char.report import SAMPLES_DIR, build_report
    from consistent_char.rundir import RunDirectory, check_output_dir

    run = RunDirectory(run_dir)
    if not run.exists():
        raise InputNotFoundError(
            f"{run_dir} is not a run directory: no state.json in it (extract writes one)"
        )
    run.read_state()
    check_output_dir(run_dir)
    # The report and samples are written into the run: not while another process writes it.
    with run.lock():
        if sample:
            from consistent_char.rundir import OutputFolder
            from consistent_char.story import illustrate, output_names
            from consistent_char.usage import base_model, identity_generator

            _check_prompts(sample, "--sample prompt")
            _check_seeds(seed, len(sample))
            if not (run.identity_dir / IDENTITY_JSON).is_file():
                raise InputNotFoundError(
                    f"{run_dir} has no final identity yet (the run has not finished); resume it "
                    "with extract --resume, then draw samples"
                )
            identity = Identity.load(run.identity_dir)
            OutputFolder(run_dir / SAMPLES_DIR).check(output_names(len(sample)))
            base, why = base_model(identity)
            _say(f"model: {base} ({why})")
            generator = identity_generator(identity, device=device)
            illustrate(identity, sample, run_dir / SAMPLES_DIR, generator=generator, seed=seed)
        path = build_report(run_dir)
        _say(f"report: {path}")


@app.command()
def story(
    identity_dir: Annotated[Path, typer.Argument(help="An identity folder (run/identity).")],
    prompts_file: Annotated[
        Path,
        typer.Argument(help="One prompt per line; blank lines and # comments are skipped."),
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder for the images and contact sheet.")],
    seed: Annotated[
        int, typer.Option(min=0, help="Seed of the first image; image j uses seed+j.")
    ] = 0,
    model: Annotated[
        str | None, typer.Option(help="Base model (default: the one the identity was learned on).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
    steps: Annotated[int | None, typer.Option(min=1, help="Denoising steps.")] = None,
    scale: Annotated[float, typer.Option(callback=_finite(0.0), help="LoRA scale (>= 0).")] = 1.0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Illustrate a story: one image per line of PROMPTS_FILE, plus contact_sheet.png."""
    _setup_logging(verbose)
    from consistent_char.identity import Identity
    from consistent_char.rundir import OutputFolder
    from consistent_char.stages import resolve_device
    from consistent_char.story import CONTACT_SHEET, illustrate, output_names, read_prompts
    from consistent_char.usage import base_model, identity_generator, prompt_with_identity

    prompts = read_prompts(prompts_file)
    if not prompts:
        _fail(f"{prompts_file} has no prompts (blank lines and # comments are skipped)")
    _check_seeds(seed, len(prompts))
    resolve_device(device)
    identity = Identity.load(identity_dir)
    for p in prompts:
        prompt_with_identity(identity, p)
    OutputFolder(out).check(output_names(len(prompts)))
    base, why = base_model(identity, model)
    _say(f"model: {base} ({why})")
    generator = identity_generator(
        identity, model=base, device=device, num_inference_steps=steps, lora_scale=scale
    )
    paths = illustrate(identity, prompts, out, generator=generator, seed=seed)
    for path, prompt in zip(paths, prompts, strict=True):
        _say(f"{path}  ←  {prompt}")
    _say(f"contact sheet: {out / CONTACT_SHEET}")


@app.command()
def export(
    identity_dir: Annotated[Path, typer.Argument(help="An identity folder (run/identity).")],
    out: Annotated[Path, typer.Option("--out", help="LoRA file to write, e.g. fox.safetensors.")],
    format_: Annotated[
        str,
        typer.Option("--format", help="kohya: A1111 / ComfyUI LoRA + SDXL embedding file."),
    ] = "kohya",
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Export an identity for AUTOMATIC1111 and ComfyUI (LoRA + embedding file)."""
    _setup_logging(verbose)
    from consistent_char.export import export_kohya
    from consistent_char.identity import Identity

    if format_ != "kohya":
        _fail(f"unknown --format {format_!r}; known: kohya")
    lora_file, emb_file = export_kohya(Identity.load(identity_dir), out)
    if lora_file is not None:
        _say(
            f"LoRA: {lora_file}  (A1111: models/Lora, <lora:{lora_file.stem}:1>; "
            "ComfyUI: models/loras)"
        )
    _say(
        f"embedding: {emb_file}  (A1111: embeddings/, write {emb_file.stem} in the prompt; "
        f"ComfyUI: models/embeddings, write embedding:{emb_file.stem})"
    )


eval_app = typer.Typer(
    no_args_is_help=True,
    help="Measure identities: score a run on ToyWorld, or run the ToyWorld benchmark.",
)
app.add_typer(eval_app, name="eval")


# Options shared by the eval commands.
ProbeOption = Annotated[
    Path | None, typer.Option(help="Identity probe folder (default: ToyWorld's).")
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a loop setting: key=value (dotted, repeatable)."),
]
ThreadsOption = Annotated[
    int | None, typer.Option(min=1, help="torch threads (1 is safest on a shared CPU).")
]
DeviceOption = Annotated[str | None, typer.Option(help="auto, cpu, cuda, ...")]


@eval_app.command("run")
def eval_run(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory (written by extract).")],
    seeds_per_scene: Annotated[
        int, typer.Option("--seeds-per-scene", min=1, help="Images per scene, for each of the two.")
    ] = 8,
    seed: Annotated[int, typer.Option(help="Picks the evaluation images.")] = 0,
    out: Annotated[Path | None, typer.Option("--out", help="Write the result as JSON.")] = None,
    probe: ProbeOption = None,
    device: Annotated[str | None, typer.Option(help="Override the run's device.")] = None,
    guidance_scale: Annotated[
        float | None,
        typer.Option(
            "--guidance-scale",
            callback=_finite(0.0),
            help="Draw at this guidance scale (> 0) instead of the run's own.",
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Score RUN_DIR's identity beside its prompt without identity (ToyWorld probe)."""
    _setup_logging(verbose)
    from consistent_char.eval.run import evaluate_run
    from consistent_char.rundir import RunDirectory

    if not RunDirectory(run_dir).exists():
        raise InputNotFoundError(f"{run_dir} is not a run directory: no state.json in it")
    _check_result_file(out)
    result = evaluate_run(
        run_dir,
        seeds_per_scene=seeds_per_scene,
        seed=seed,
        probe=probe,
        device=device,
        guidance_scale=guidance_scale,
    )
    console.print(
        f"{result['prompt']!r}: {result['iterations']} iterations, "
        f"{'converged' if result['converged'] else 'not converged'}; "
        f"{len(result['scenes'])} scenes × {seeds_per_scene} seeds, "
        f"guidance {result['guidance_scale']}"
    )
    console.print("             identity consistency   prompt adherence   validity")
    for name in ("identity", "vanilla"):
        r = result[name]
        validity = "–" if r.get("validity") is None else f"{r['validity']:.3f}"
        console.print(
            f"  {name:<10} {r['identity_consistency']:>20.3f} {r['prompt_adherence']:>18.3f}"
            f" {validity:>10}"
        )
    drift = result["drift"]
    if drift["kept"] is not None:
        console.print(
            f"drift: chosen at iteration 0 {' '.join(drift['chosen'].values())}, final "
            f"{' '.join(drift['final'].values())}: kept {drift['kept']:.2f} of the attributes"
        )
    readings = [m["validity"] for m in result["per_iteration"]]
    if readings and all(v is not None for v in readings):
        console.print("validity per iteration: " + ", ".join(f"{v:.2f}" for v in readings))
    if out is not None:
        _write_result(out, result)


@eval_app.command("seeds")
def eval_seeds(
    prompts: Annotated[list[str], typer.Argument(help="Prompts to find characters for.")],
    out: Annotated[Path, typer.Option("--out", help="The study's folder (resumed if cut).")],
    seeds: Annotated[
        str, typer.Option("--seeds", help="Loop seeds: a range 0-7 or a list 0,3,5.")
    ] = "0-7",
    set_: SetOption = None,
    seeds_per_scene: Annotated[
        int, typer.Option("--seeds-per-scene", min=1, help="Evaluation images per scene.")
    ] = 8,
    probe: ProbeOption = None,
    device: DeviceOption = None,
    threads: ThreadsOption = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run and score the ToyWorld loop for every prompt × seed, and summarise each prompt."""
    _setup_logging(verbose)
    from consistent_char.eval.seeds import evaluate_seeds, markdown_summary
    from consistent_char.rundir import check_output_dir

    _check_prompts(prompts)
    chosen = _parse_seeds(seeds)
    overrides = dict(parse_assignment(s) for s in (set_ or []))
    check_output_dir(out)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)

    def progress(prompt: str, seed: int, run: dict[str, Any]) -> None:
        kept = "–" if run["drift_kept"] is None else f"{run['drift_kept']:.2f}"
        console.print(
            f"{prompt!r} seed {seed}: {run['iterations']} iterations, consistency "
            f"{run['identity_consistency']:.3f}, adherence {run['prompt_adherence']:.3f}, "
            f"drift kept {kept}"
        )

    study = evaluate_seeds(
        prompts,
        chosen,
        out,
        overrides=overrides,
        seeds_per_scene=seeds_per_scene,
        probe=probe,
        device=device,
        callback=progress,
    )
    console.print(markdown_summary(study).split("\n\n| prompt | seed")[0])
    _say(f"results: {out / 'results.json'}, {out / 'results.md'}")


def _parse_seeds(text: str) -> list[int]:
    """``"0-7"`` or ``"0,3,5"`` → the seeds (each in [0, 2**32))."""
    try:
        if "-" in text.strip().lstrip("-"):
            first, last = (int(v) for v in text.split("-", 1))
            seeds = list(range(first, last + 1))
        else:
            seeds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InvalidValueError(
            f"--seeds expects a range like 0-7 or a list like 0,3,5; got {text!r}"
        ) from None
    if not seeds or any(not 0 <= s < 2**32 for s in seeds):
        raise InvalidValueError(f"--seeds must name seeds in [0, 2**32); got {text!r}")
    return seeds


def _check_result_file(out: Path | None) -> None:
    """A result file may be new or an earlier result of this command: never a user's file."""
    from consistent_char.rundir import check_output_file

    if out is None:
        return
    check_output_file(out)
    if out.exists() or out.is_symlink():
        try:
            import json

            ours = json.loads(out.read_text(encoding="utf-8")).get("written_by") == _RESULT_MARK
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise OutputExistsError(
                f"{out} exists and is not a result of consistent-char eval; choose another "
                "--out or move that file (nothing was run)"
            )


_RESULT_MARK = "consistent-char eval"


def _write_result(out: Path, result: dict[str, Any]) -> None:
    from consistent_char.rundir import write_json_atomic

    write_json_atomic(out, {"written_by": _RESULT_MARK, **result})
    _say(f"result: {out}")


@eval_app.command("toy")
def eval_toy(
    out: Annotated[
        Path | None, typer.Option("--out", help="Output folder (default: bench/toy-PRESET).")
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="The quick preset: a few minutes on a CPU.")
    ] = False,
    preset: Annotated[
        str, typer.Option(help="full, quick or minimal (seconds, for tests on tiny models).")
    ] = "full",
    prompt: Annotated[
        list[str] | None, typer.Option("--prompt", help="Replace the prompts (repeatable).")
    ] = None,
    set_: SetOption = None,
    method: Annotated[
        list[str] | None,
        typer.Option("--method", help="Run only these methods (repeatable; default all)."),
    ] = None,
    seeds_per_scene: Annotated[
        int | None, typer.Option("--seeds-per-scene", min=1, help="Evaluation images per scene.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the loop and the evaluation.")] = None,
    ablations: Annotated[bool, typer.Option(help="Run the ablations.")] = True,
    probe: ProbeOption = None,
    device: DeviceOption = None,
    threads: ThreadsOption = None,
    resume: Annotated[
        bool, typer.Option(help="Reuse finished entries of OUT/results.json.")
    ] = True,
    estimate: Annotated[
        bool,
        typer.Option(
            "--estimate", help="Time small pieces and print the run time; run nothing else."
        ),
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the ToyWorld benchmark: methods × vague prompts, ablations, table and figure."""
    _setup_logging(verbose)
    import dataclasses

    import torch

    from consistent_char.eval.benchmark import (
        PRESETS,
        estimate_seconds,
        measure_unit_costs,
        reductions,
        run_toy_benchmark,
    )

    name = "quick" if quick else preset
    if name not in PRESETS:
        _fail(f"unknown --preset {name!r}; known: {', '.join(PRESETS)}")
    if threads is not None:
        torch.set_num_threads(threads)
    settings = PRESETS[name]()
    changes: dict[str, Any] = {}
    if prompt:
        changes["prompts"] = list(prompt)
        changes["ablation_prompts"] = list(prompt)[:1]
    if method:
        changes["methods"] = list(method)
    if seeds_per_scene is not None:
        changes["seeds_per_scene"] = seeds_per_scene
    if seed is not None:
        changes["seed"] = seed
    if not ablations:
        changes["ablations"] = {}
    overrides = dict(parse_assignment(s) for s in (set_ or []))
    changes["overrides"] = {**settings.overrides, **overrides}
    settings = dataclasses.replace(settings, **changes)
    for line in reductions(settings) if settings.name != "full" else []:
        console.print(f"reduced: {line}")

    if estimate:
        costs = measure_unit_costs(settings, probe=probe, device=device)
        est = estimate_seconds(settings, costs)
        console.print(
            f"unit costs ({costs.torch_threads} thread(s)): "
            f"{costs.gen_image_step * 1000:.1f} ms per image-step "
            f"({costs.gen_image_step_identity * 1000:.1f} ms with an identity), "
            f"{costs.refine_step:.3f} s per refine step + {costs.refine_call:.2f} s per call, "
            f"{costs.embed_image * 1000:.1f} ms embed, {costs.probe_image * 1000:.1f} ms probe "
            "per image"
        )
        console.print(f"  {'startup':<16} {est['startup'] / 60:7.1f} min")
        for method, secs in est["methods"].items():
            console.print(f"  {method:<16} {secs / 60:7.1f} min")
        console.print(f"  {'ablations':<16} {est['ablations'] / 60:7.1f} min")
        console.print(
            f"estimated total (upper bound: every loop at max_iterations): "
            f"{est['total'] / 60:.1f} min"
        )
        return

    target = out or Path("bench") / f"toy-{settings.name}"
    from consistent_char.rundir import check_output_dir

    check_output_dir(target)

    def report(event: Any) -> None:
        what = event.method if event.group is None else f"{event.group}: {event.variant}"
        e = event.entry
        note = "  (from results.json)" if event.reused else ""
        console.print(
            f"[{event.done}/{event.total}] {what} · {event.prompt!r}: identity consistency "
            f"{e['identity_consistency']:.3f}, prompt adherence {e['prompt_adherence']:.3f}, "
            f"{e['seconds']:.1f} s{note}"
        )

    results = run_toy_benchmark(
        settings, target, probe=probe, device=device, resume=resume, progress=report
    )
    _say(
        ("done", "bold green"),
        f" in {results['seconds_total']:.0f} s: {target / 'results.json'}, "
        f"{target / 'results.md'}, {target / 'scatter.png'}",
    )


@eval_app.command("real")
def eval_real(
    prompt_set: Annotated[
        Path, typer.Argument(help="Prompt-set file (YAML/JSON): subjects × settings.")
    ],
    model: Annotated[str, typer.Option(help="SDXL hub id or local diffusers folder.")],
    identity: Annotated[
        list[str] | None,
        typer.Option(
            "--identity",
            help="SUBJECT=IDENTITY_DIR: draw that subject with the identity (repeatable).",
        ),
    ] = None,
    clip_model: Annotated[
        str, typer.Option("--clip", help="CLIP model for CLIP-T (hub id or folder).")
    ] = "openai/clip-vit-large-patch14",
    dino_model: Annotated[
        str, typer.Option("--dino", help="DINOv2 model for identity similarity.")
    ] = "facebook/dinov2-large",
    dreamsim: Annotated[
        bool, typer.Option(help="Also score with DreamSim when it is installed.")
    ] = True,
    seeds_per_setting: Annotated[
        int, typer.Option("--seeds-per-setting", min=1, max=1000, help="Images per setting.")
    ] = 1,
    seed: Annotated[int, typer.Option(help="The first seed.")] = 0,
    steps: Annotated[int | None, typer.Option(min=1, help="Denoising steps per image.")] = None,
    guidance: Annotated[
        float | None, typer.Option(callback=_finite(0.0), help="Guidance scale.")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write the result as JSON.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Score CLIP-T and identity similarity over a prompt set on a real (SDXL-class) model."""
    _setup_logging(verbose)
    from consistent_char.config import GeneratorConfig
    from consistent_char.embedders.dinov2 import DINOv2Embedder
    from consistent_char.eval.real import (
        CLIPScorer,
        DreamSimEmbedder,
        PromptSet,
        dreamsim_available,
        evaluate_prompt_set,
    )
    from consistent_char.generators.sdxl import SDXLGenerator
    from consistent_char.generators.settings import GeneratorSettings
    from consistent_char.identity import Identity
    from consistent_char.stages import resolve_device, resolve_dtype, resolve_model

    # 1. Check inputs and outputs before any model loads.
    prompts = PromptSet.from_file(prompt_set)
    identities: dict[str, Identity] = {}
    for item in identity or []:
        subject, sep, folder = item.rpartition("=")
        if not sep or not subject.strip() or not folder:
            _fail(f"--identity takes SUBJECT=IDENTITY_DIR, got {item!r}")
        identities[subject.strip()] = Identity.load(folder)
    unknown = sorted(set(identities) - {s.name for s in prompts.subjects})
    if unknown:
        _fail(f"--identity names subjects not in {prompt_set}: {unknown}")
    _check_result_file(out)
    dev = resolve_device(device)
    settings = GeneratorConfig().model_dump()
    if steps is not None:
        settings["num_inference_steps"] = steps
    if guidance is not None:
        settings["guidance_scale"] = guidance
    GeneratorSettings.from_keywords(settings, "SDXLGenerator")
    sdxl = resolve_model(model)
    clip_source = resolve_model(clip_model, kind="embedder")
    dino_source = resolve_model(dino_model, kind="embedder")

    # 2. Load and score.
    generator = SDXLGenerator.from_pretrained(
        sdxl, device=dev, dtype=resolve_dtype("auto", dev), **settings
    )
    clip = CLIPScorer.from_pretrained(clip_source, device=dev)
    dino = DINOv2Embedder.from_pretrained(dino_source, device=dev)
    second = (
        DreamSimEmbedder.from_pretrained(device=str(dev))
        if dreamsim and dreamsim_available()
        else None
    )
    result = evaluate_prompt_set(
        generator,
        prompts,
        clip=clip,
        dino=dino,
        dreamsim=second,
        identities=identities,
        seeds_per_setting=seeds_per_setting,
        seed=seed,
    )

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    console.print(f"{'subject':<40} {'identity':>8} {'CLIP-T':>7} {'DINOv2':>7} {'DreamSim':>8}")
    for name, score in result["subjects"].items():
        marked = "yes" if name in identities else "no"
        console.print(
            f"{name[:40]:<40} {marked:>8} {cell(score['clip_t']):>7} "
            f"{cell(score['dino_similarity']):>7} {cell(score['dreamsim_similarity']):>8}"
        )
    mean = result["mean"]
    console.print(
        f"{'mean':<40} {'':>8} {cell(mean['clip_t']):>7} {cell(mean['dino_similarity']):>7} "
        f"{cell(mean['dreamsim_similarity']):>8}"
    )
    if out is not None:
        result["prompt_set"] = str(prompt_set)
        result["model"] = model
        result["identities"] = {name: str(i.token) for name, i in identities.items()}
        _write_result(out, result)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
