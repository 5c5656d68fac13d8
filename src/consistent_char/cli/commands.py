"""The commands that find and use an identity: ``extract``, ``generate``, ``report``, ``story``
and ``export``."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.progress import (
    Progress,
    TaskID,
)

from consistent_char.cli.core import (
    INTERRUPTED,
    ConfigOption,
    DeviceOption,
    GuidanceOption,
    IdentityUntilOption,
    InControlNetOption,
    LateControlScaleOption,
    LoraScaleOption,
    ModelOption,
    NumImagesOption,
    SeedOption,
    SetOption,
    StepsOption,
    app,
    check_late_control,
    check_prompts,
    check_seeds,
    fail,
    finite,
    progress_bars,
    say,
    setup_logging,
)
from consistent_char.config import DEFAULT_MODEL, ExtractorConfig, load_mapping, parse_assignment
from consistent_char.errors import InputNotFoundError

if TYPE_CHECKING:
    from consistent_char.extractor import IterativeIdentityExtractor
    from consistent_char.interfaces import ExtractionResult
    from consistent_char.rundir import RunDirectory

_STAGE_LABEL = {
    "generate": "generate",
    "embed": "embed",
    "cluster": "cluster",
    "refine": "refine",
}


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
    config: ConfigOption = None,
    set_: SetOption = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log INFO messages.")] = False,
) -> None:
    """Run the iterative identity extraction (Algorithm 1) for PROMPT."""
    setup_logging(verbose)
    from consistent_char.extractor import IterativeIdentityExtractor
    from consistent_char.stages import build_stages

    # 1. Check inputs: the prompt, the settings and the run directory, before any model loads.
    check_prompts([prompt], example="'a watercolor fox with a scarf'")
    prompt = prompt.strip()
    run, cfg = _run_settings(out, model, config, set_, resume)
    for warning in cfg.warnings():
        say(("warning:", "yellow"), " ", warning)
    run.check(prompt, cfg, resume=resume)

    # 2. Load the models (the extractor checks the refiner's token and modules before drawing).
    stages = build_stages(cfg, warn=False)
    extractor = IterativeIdentityExtractor(*stages, config=cfg)

    # 3. Run, with a way back after Ctrl-C.
    result = _extract_with_progress(extractor, run, cfg, prompt, out, resume=resume, quiet=quiet)
    why = result.stop_reason
    state = why if why == "converged" else f"stopped: {why}"
    say(
        ("done", "bold green"),
        f": {result.iterations} iterations ({state}); identity token ",
        (result.identity.token, "bold"),
        f" in {out / 'identity'}",
    )


def _run_settings(
    out: Path, model: str | None, config: Path | None, set_: list[str] | None, resume: bool
) -> tuple[RunDirectory, ExtractorConfig]:
    """The run directory and the settings of ``extract``: the config file, ``--model`` and
    ``--set`` on the defaults, or, resuming with none of them, the run's own config."""
    from consistent_char.rundir import RunDirectory

    data = load_mapping(config) if config else {}
    if model is not None:
        data["model"] = model
    overrides = dict(parse_assignment(s) for s in (set_ or []))
    run = RunDirectory(out)
    if resume and not config and not overrides and model is None and run.exists():
        return run, run.read_config()
    return run, ExtractorConfig.from_overrides(overrides, base=data)


def _extract_with_progress(
    extractor: IterativeIdentityExtractor,
    run: RunDirectory,
    cfg: ExtractorConfig,
    prompt: str,
    out: Path,
    *,
    resume: bool,
    quiet: bool,
) -> ExtractionResult:
    """Runs the extraction under progress bars; Ctrl-C prints how to resume and exits 130."""
    with progress_bars(quiet) as progress:
        printer = _ProgressPrinter(progress, cfg.max_iterations, cfg.core_size)
        try:
            return extractor.extract(prompt, run_dir=out, resume=resume, callback=printer)
        except KeyboardInterrupt:
            progress.stop()
            _interrupted(run, prompt, out)


def _interrupted(run: RunDirectory, prompt: str, out: Path) -> NoReturn:
    if run.exists():
        command = shlex.join(["consistent-char", "extract", prompt, "--out", str(out), "--resume"])
        say(("interrupted;", "yellow"), " continue the run with: ", command)
    else:
        say(("interrupted", "yellow"), " before the run started; nothing to resume")
    raise typer.Exit(INTERRUPTED)


@app.command()
def generate(
    identity_dir: Annotated[Path, typer.Argument(help="An identity folder (run/identity).")],
    prompts: Annotated[
        list[str],
        typer.Argument(help="Prompts; '{token}' marks the identity, else the run's template."),
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder for the images.")],
    model: ModelOption = None,
    seed: SeedOption = 0,
    num_images: NumImagesOption = 1,
    steps: StepsOption = None,
    guidance_scale: GuidanceOption = None,
    scale: LoraScaleOption = 1.0,
    device: DeviceOption = "auto",
    control_image: Annotated[
        Path | None, typer.Option(help="A control image (e.g. a pose) for --controlnet.")
    ] = None,
    controlnet: Annotated[
        str | None,
        typer.Option(help="ControlNet for the base model: folder, hub id, or 'toy' (ToyWorld)."),
    ] = None,
    control_scale: Annotated[
        float, typer.Option(callback=finite(0.0), help="ControlNet strength (>= 0).")
    ] = 1.0,
    identity_until: IdentityUntilOption = 1.0,
    in_controlnet: InControlNetOption = False,
    late_control_scale: LateControlScaleOption = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Draw PROMPTS with a learned identity (following a control image with --controlnet)."""
    setup_logging(verbose)
    from consistent_char.identity import Identity
    from consistent_char.stages import resolve_device

    # 1. Check inputs and outputs before the model loads.
    check_prompts(prompts)
    check_seeds(seed, num_images)
    resolve_device(device)
    control = _control_input(control_image, controlnet)
    if control is None and (identity_until != 1 or in_controlnet or late_control_scale is not None):
        fail(
            "--identity-until, --identity-in-controlnet and --late-control-scale act through "
            "a ControlNet: give --controlnet and --control-image"
        )
    check_late_control(late_control_scale, identity_until)
    identity = Identity.load(identity_dir)
    drawing = IdentityDrawing(identity, prompts, seed, num_images, out)

    # 2. Draw and write.
    generator = drawing.generator(model, device, steps, guidance_scale, scale)
    jobs = drawing.jobs
    kwargs = {}
    if control is not None:
        from consistent_char.control import ControlledGenerator, load_controlnet

        pipe = generator.pipeline
        net = load_controlnet(str(controlnet), device=pipe.device, dtype=pipe.unet.dtype)
        say(f"controlnet: {controlnet}, control image {control_image}")
        settings = generator.settings.model_dump()
        generator = ControlledGenerator(
            pipe,
            net,
            control_scale=control_scale,
            identity_until=identity_until,
            identity_in_controlnet=in_controlnet,
            late_control_scale=late_control_scale,
            **settings,
        )
        kwargs["control_images"] = control
    images = generator.generate([p for p, _ in jobs], [s for _, s in jobs], identity, **kwargs)
    drawing.write(images)


class IdentityDrawing:
    """What ``generate`` and ``edit`` share: every (prompt, seed) to draw with an identity, the
    output folder checked for their files before any model loads, the generator on the
    identity's base model, and the writing of the images."""

    def __init__(
        self, identity: Any, prompts: list[str], seed: int, num_images: int, out: Path
    ) -> None:
        from consistent_char.rundir import OutputFolder
        from consistent_char.usage import prompt_with_identity

        self.identity, self.out = identity, out
        full = [prompt_with_identity(identity, p) for p in prompts]
        self.jobs = [(p, seed + j) for p in full for j in range(num_images)]
        self.names = [f"{k:03d}_seed{s}.png" for k, (_, s) in enumerate(self.jobs)]
        self.folder = OutputFolder(out)
        self.folder.check(self.names)

    def generator(
        self,
        model: str | None,
        device: str,
        steps: int | None,
        guidance_scale: float | None,
        lora_scale: float,
    ) -> Any:
        """The identity's generator on its base model (or `model`), saying which and why."""
        from consistent_char.usage import base_model, identity_generator

        base, why = base_model(self.identity, model)
        say(f"model: {base} ({why})")
        return identity_generator(
            self.identity,
            model=base,
            device=device,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            lora_scale=lora_scale,
        )

    def write(self, images: list[Any]) -> None:
        """Writes the images under their names, one line each."""
        from consistent_char.rundir import save_png_atomic

        self.folder.claim(self.names)
        for name, (prompt, _), image in zip(self.names, self.jobs, images, strict=True):
            save_png_atomic(self.out / name, image)
            say(f"{self.out / name}  ←  {prompt}")


def _control_input(image: Path | None, controlnet: str | None) -> Any:
    """The control image, read and checked before any model loads (None without control)."""
    if (image is None) != (controlnet is None):
        fail("--control-image and --controlnet go together: give both, or neither")
    if image is None:
        return None
    from consistent_char.control import load_control_image
    from consistent_char.stages import resolve_model

    resolve_model(str(controlnet), kind="controlnet")
    return load_control_image(image)


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
    setup_logging(verbose)
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

            check_prompts(sample, "--sample prompt")
            check_seeds(seed, len(sample))
            if not (run.identity_dir / IDENTITY_JSON).is_file():
                raise InputNotFoundError(
                    f"{run_dir} has no final identity yet (the run has not finished); resume it "
                    "with extract --resume, then draw samples"
                )
            identity = Identity.load(run.identity_dir)
            OutputFolder(run_dir / SAMPLES_DIR).check(output_names(len(sample)))
            base, why = base_model(identity)
            say(f"model: {base} ({why})")
            generator = identity_generator(identity, device=device)
            illustrate(identity, sample, run_dir / SAMPLES_DIR, generator=generator, seed=seed)
        path = build_report(run_dir)
        say(f"report: {path}")


@app.command()
def story(
    identity_dir: Annotated[Path, typer.Argument(help="An identity folder (run/identity).")],
    prompts_file: Annotated[
        Path,
        typer.Argument(help="One prompt per line; blank lines and # comments are skipped."),
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder for the images and contact sheet.")],
    seed: SeedOption = 0,
    model: ModelOption = None,
    device: DeviceOption = "auto",
    steps: StepsOption = None,
    scale: LoraScaleOption = 1.0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Illustrate a story: one image per line of PROMPTS_FILE, plus contact_sheet.png."""
    setup_logging(verbose)
    from consistent_char.identity import Identity
    from consistent_char.rundir import OutputFolder
    from consistent_char.stages import resolve_device
    from consistent_char.story import CONTACT_SHEET, illustrate, output_names, read_prompts
    from consistent_char.usage import base_model, identity_generator, prompt_with_identity

    prompts = read_prompts(prompts_file)
    if not prompts:
        fail(f"{prompts_file} has no prompts (blank lines and # comments are skipped)")
    check_seeds(seed, len(prompts))
    resolve_device(device)
    identity = Identity.load(identity_dir)
    for p in prompts:
        prompt_with_identity(identity, p)
    OutputFolder(out).check(output_names(len(prompts)))
    base, why = base_model(identity, model)
    say(f"model: {base} ({why})")
    generator = identity_generator(
        identity, model=base, device=device, num_inference_steps=steps, lora_scale=scale
    )
    paths = illustrate(identity, prompts, out, generator=generator, seed=seed)
    for path, prompt in zip(paths, prompts, strict=True):
        say(f"{path}  ←  {prompt}")
    say(f"contact sheet: {out / CONTACT_SHEET}")


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
    setup_logging(verbose)
    from consistent_char.export import export_kohya
    from consistent_char.identity import Identity

    if format_ != "kohya":
        fail(f"unknown --format {format_!r}; known: kohya")
    lora_file, emb_file = export_kohya(Identity.load(identity_dir), out)
    if lora_file is not None:
        say(
            f"LoRA: {lora_file}  (A1111: models/Lora, <lora:{lora_file.stem}:1>; "
            "ComfyUI: models/loras)"
        )
    say(
        f"embedding: {emb_file}  (A1111: embeddings/, write {emb_file.stem} in the prompt; "
        f"ComfyUI: models/embeddings, write embedding:{emb_file.stem})"
    )
