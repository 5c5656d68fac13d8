"""The `consistent-char` command. The library logs; only this module prints."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

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

from consistent_char.config import (
    ConfigError,
    ExtractorConfig,
    load_mapping,
    parse_assignment,
)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Find a consistent character for a prompt and use it in any SDXL pipeline.",
)
console = Console(stderr=True)

_STAGE_LABEL = {
    "generate": "generate",
    "embed": "embed",
    "cluster": "cluster",
    "refine": "refine",
}


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(code=2)


def _setup_logging(verbose: bool) -> None:
    if not verbose:
        # transformers/diffusers announce every load with bars and advisory warnings (a missing
        # torchvision, embedding resizing); the command's own progress says what matters.
        for name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
            os.environ.setdefault(name, "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
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


class _ProgressPrinter:
    """Turns the extractor's `ProgressEvent`s into one bar per iteration and one per stage."""

    def __init__(self, progress: Progress, max_iterations: int):
        self.progress = progress
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
            chosen = (
                f"cluster {r.chosen_cluster} ({r.cluster_sizes[r.chosen_cluster]} images, "
                f"cohesion {r.chosen_cohesion:.3f})"
                if r.chosen_cluster is not None
                else "converged"
            )
            p.console.print(
                f"iteration {r.iteration}: spread {r.spread:.4f} "
                f"(threshold {r.threshold:.4f}) → {chosen}",
                soft_wrap=True,
            )


@app.command()
def extract(
    prompt: Annotated[str, typer.Argument(help="What to draw, e.g. 'a watercolor fox'.")],
    out: Annotated[Path, typer.Option("--out", help="Run directory to write.")],
    model: Annotated[
        str | None,
        typer.Option(help="SDXL hub id, local diffusers folder, or 'toy' (ToyWorld, offline)."),
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

    try:
        data = load_mapping(config) if config else {}
        if model is not None:
            data["model"] = model
        overrides = dict(parse_assignment(s) for s in (set_ or []))
        if resume and not config and not overrides and model is None:
            # Resuming without settings means: the run's own config.
            cfg = ExtractorConfig.from_file(out / "config.yaml")
        else:
            cfg = ExtractorConfig.from_overrides(overrides, base=data)
    except ConfigError as err:
        _fail(str(err))
        return

    try:
        extractor = IterativeIdentityExtractor.from_config(cfg)
    except (FileNotFoundError, ValueError, OSError) as err:
        _fail(str(err))
        return

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=quiet,
        transient=False,
    ) as progress:
        printer = _ProgressPrinter(progress, cfg.max_iterations)
        try:
            result = extractor.extract(prompt, run_dir=out, resume=resume, callback=printer)
        except (FileExistsError, FileNotFoundError, ConfigError, ValueError) as err:
            progress.stop()
            _fail(str(err))
            return
    state = "converged" if result.converged else "stopped at max_iterations"
    console.print(
        f"[bold green]done[/]: {result.iterations} iterations ({state}); "
        f"identity token [bold]{result.identity.token}[/] in {out / 'identity'}"
    )


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
    seed: Annotated[int, typer.Option(help="Seed of the first image; image j uses seed+j.")] = 0,
    num_images: Annotated[int, typer.Option("--num-images", "-n", min=1)] = 1,
    steps: Annotated[int | None, typer.Option(help="Denoising steps.")] = None,
    guidance_scale: Annotated[float | None, typer.Option(help="CFG scale.")] = None,
    scale: Annotated[float, typer.Option(help="LoRA scale.")] = 1.0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Draw PROMPTS with a learned identity."""
    _setup_logging(verbose)
    from consistent_char.identity import Identity, IdentityError
    from consistent_char.usage import identity_generator, prompt_with_identity

    try:
        identity = Identity.load(identity_dir)
        generator = identity_generator(
            identity,
            model=model,
            device=device,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            lora_scale=scale,
        )
    except (IdentityError, FileNotFoundError, ValueError, ConfigError) as err:
        _fail(str(err))
        return
    out.mkdir(parents=True, exist_ok=True)
    full = [prompt_with_identity(identity, p) for p in prompts]
    jobs = [(p, seed + j) for p in full for j in range(num_images)]
    images = generator.generate([p for p, _ in jobs], [s for _, s in jobs], identity)
    from consistent_char.rundir import save_png_atomic

    for k, ((p, s), image) in enumerate(zip(jobs, images, strict=True)):
        path = out / f"{k:03d}_seed{s}.png"
        save_png_atomic(path, image)
        console.print(f"{path}  ←  {p}")


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
    seed: Annotated[int, typer.Option(help="Seed of the first sample; sample j uses seed+j.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ... (for --sample)")] = "auto",
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """(Re)build RUN_DIR/report.html: grids, clusters, spread curve, stage times, samples."""
    _setup_logging(verbose)
    from consistent_char.identity import Identity, IdentityError
    from consistent_char.report import SAMPLES_DIR, build_report

    if not (run_dir / "state.json").is_file():
        _fail(f"{run_dir} is not a run directory: no state.json in it")
        return
    if sample:
        from consistent_char.story import illustrate
        from consistent_char.usage import identity_generator

        try:
            identity = Identity.load(run_dir / "identity")
            generator = identity_generator(identity, device=device)
        except (IdentityError, FileNotFoundError, ValueError, ConfigError) as err:
            _fail(str(err))
            return
        illustrate(identity, sample, run_dir / SAMPLES_DIR, generator=generator, seed=seed)
    path = build_report(run_dir)
    console.print(f"report: {path}")


@app.command()
def story(
    identity_dir: Annotated[Path, typer.Argument(help="An identity folder (run/identity).")],
    prompts_file: Annotated[
        Path,
        typer.Argument(help="One prompt per line; blank lines and # comments are skipped."),
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder for the images and contact sheet.")],
    seed: Annotated[int, typer.Option(help="Seed of the first image; image j uses seed+j.")] = 0,
    model: Annotated[
        str | None, typer.Option(help="Base model (default: the one the identity was learned on).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
    steps: Annotated[int | None, typer.Option(help="Denoising steps.")] = None,
    scale: Annotated[float, typer.Option(help="LoRA scale.")] = 1.0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Illustrate a story: one image per line of PROMPTS_FILE, plus contact_sheet.png."""
    _setup_logging(verbose)
    from consistent_char.identity import Identity, IdentityError
    from consistent_char.story import CONTACT_SHEET, illustrate, read_prompts
    from consistent_char.usage import identity_generator

    try:
        prompts = read_prompts(prompts_file)
    except OSError as err:
        _fail(f"cannot read {prompts_file}: {err}")
        return
    if not prompts:
        _fail(f"{prompts_file} has no prompts (blank lines and # comments are skipped)")
        return
    try:
        identity = Identity.load(identity_dir)
        generator = identity_generator(
            identity, model=model, device=device, num_inference_steps=steps, lora_scale=scale
        )
    except (IdentityError, FileNotFoundError, ValueError, ConfigError) as err:
        _fail(str(err))
        return
    paths = illustrate(identity, prompts, out, generator=generator, seed=seed)
    for path, prompt in zip(paths, prompts, strict=True):
        console.print(f"{path}  ←  {prompt}")
    console.print(f"contact sheet: {out / CONTACT_SHEET}")


@app.command()
def export(
    identity_dir: Annotated[Path, typer.Argument(help="An identity folder (run/identity).")],
    out: Annotated[Path, typer.Option("--out", help="LoRA file to write, e.g. fox.safetensors.")],
    format_: Annotated[
        str,
        typer.Option("--format", help="kohya: A1111 / ComfyUI LoRA + SDXL embedding file."),
    ] = "kohya",
) -> None:
    """Export an identity for AUTOMATIC1111 and ComfyUI (LoRA + embedding file)."""
    from consistent_char.export import ExportError, export_kohya
    from consistent_char.identity import Identity, IdentityError

    if format_ != "kohya":
        _fail(f"unknown --format {format_!r}; known: kohya")
        return
    try:
        lora_file, emb_file = export_kohya(Identity.load(identity_dir), out)
    except (IdentityError, ExportError, FileNotFoundError) as err:
        _fail(str(err))
        return
    if lora_file is not None:
        console.print(
            f"LoRA: {lora_file}  (A1111: models/Lora, <lora:{lora_file.stem}:1>; "
            "ComfyUI: models/loras)"
        )
    console.print(
        f"embedding: {emb_file}  (A1111: embeddings/, write {emb_file.stem} in the prompt; "
        f"ComfyUI: models/embeddings, write embedding:{emb_file.stem})"
    )


eval_app = typer.Typer(
    no_args_is_help=True,
    help="Measure identities: score a run on ToyWorld, or run the ToyWorld benchmark.",
)
app.add_typer(eval_app, name="eval")


@eval_app.command("run")
def eval_run(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory (written by extract).")],
    seeds_per_scene: Annotated[
        int, typer.Option("--seeds-per-scene", min=1, help="Images per scene, for each of the two.")
    ] = 8,
    seed: Annotated[int, typer.Option(help="Picks the evaluation images.")] = 0,
    out: Annotated[Path | None, typer.Option("--out", help="Write the result as JSON.")] = None,
    probe: Annotated[
        Path | None, typer.Option(help="Identity probe folder (default: ToyWorld's).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="Override the run's device.")] = None,
    guidance_scale: Annotated[
        float | None,
        typer.Option(
            "--guidance-scale",
            help="Draw at this guidance scale (> 0) instead of the run's own.",
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Score RUN_DIR's identity beside its prompt without identity (ToyWorld probe)."""
    _setup_logging(verbose)
    from consistent_char.eval.run import evaluate_run
    from consistent_char.identity import IdentityError
    from consistent_char.rundir import write_json_atomic

    try:
        result = evaluate_run(
            run_dir,
            seeds_per_scene=seeds_per_scene,
            seed=seed,
            probe=probe,
            device=device,
            guidance_scale=guidance_scale,
        )
    except (IdentityError, FileNotFoundError, ValueError, ConfigError) as err:
        _fail(str(err))
        return
    console.print(
        f"{result['prompt']!r}: {result['iterations']} iterations, "
        f"{'converged' if result['converged'] else 'not converged'}; "
        f"{len(result['scenes'])} scenes × {seeds_per_scene} seeds, "
        f"guidance {result['guidance_scale']}"
    )
    console.print("             identity consistency   prompt adherence")
    for name in ("identity", "vanilla"):
        r = result[name]
        console.print(
            f"  {name:<10} {r['identity_consistency']:>20.3f} {r['prompt_adherence']:>18.3f}"
        )
    if out is not None:
        write_json_atomic(out, result)
        console.print(f"result: {out}")


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
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a loop setting: key=value (dotted, repeatable)."),
    ] = None,
    method: Annotated[
        list[str] | None,
        typer.Option("--method", help="Run only these methods (repeatable; default all)."),
    ] = None,
    seeds_per_scene: Annotated[
        int | None, typer.Option("--seeds-per-scene", min=1, help="Evaluation images per scene.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the loop and the evaluation.")] = None,
    ablations: Annotated[bool, typer.Option(help="Run the ablations.")] = True,
    probe: Annotated[
        Path | None, typer.Option(help="Identity probe folder (default: ToyWorld's).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, ...")] = None,
    threads: Annotated[
        int | None, typer.Option(min=1, help="torch threads (1 is safest on a shared CPU).")
    ] = None,
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
        return
    if threads is not None:
        torch.set_num_threads(threads)
    try:
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
    except (ConfigError, ValueError) as err:
        _fail(str(err))
        return
    for line in reductions(settings) if settings.name != "full" else []:
        console.print(f"reduced: {line}")

    if estimate:
        try:
            costs = measure_unit_costs(settings, probe=probe, device=device)
        except (FileNotFoundError, ValueError, ConfigError) as err:
            _fail(str(err))
            return
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

    def report(event: Any) -> None:
        what = event.method if event.group is None else f"{event.group}: {event.variant}"
        e = event.entry
        note = "  (from results.json)" if event.reused else ""
        console.print(
            f"[{event.done}/{event.total}] {what} · {event.prompt!r}: identity consistency "
            f"{e['identity_consistency']:.3f}, prompt adherence {e['prompt_adherence']:.3f}, "
            f"{e['seconds']:.1f} s{note}"
        )

    try:
        results = run_toy_benchmark(
            settings, target, probe=probe, device=device, resume=resume, progress=report
        )
    except (FileNotFoundError, ValueError, ConfigError) as err:
        _fail(str(err))
        return
    console.print(
        f"[bold green]done[/] in {results['seconds_total']:.0f} s: {target / 'results.json'}, "
        f"{target / 'results.md'}, {target / 'scatter.png'}"
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
    guidance: Annotated[float | None, typer.Option(min=0.0, help="Guidance scale.")] = None,
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
    from consistent_char.identity import Identity, IdentityError
    from consistent_char.rundir import write_json_atomic
    from consistent_char.stages import resolve_device, resolve_dtype, resolve_model

    try:
        prompts = PromptSet.from_file(prompt_set)
        identities: dict[str, Identity] = {}
        for item in identity or []:
            subject, sep, folder = item.rpartition("=")
            if not sep or not subject.strip() or not folder:
                raise ValueError(f"--identity takes SUBJECT=IDENTITY_DIR, got {item!r}")
            identities[subject.strip()] = Identity.load(folder)
        unknown = sorted(set(identities) - {s.name for s in prompts.subjects})
        if unknown:
            raise ValueError(f"--identity names subjects not in {prompt_set}: {unknown}")
        dev = resolve_device(device)
        settings = GeneratorConfig().model_dump()
        if steps is not None:
            settings["num_inference_steps"] = steps
        if guidance is not None:
            settings["guidance_scale"] = guidance
        generator = SDXLGenerator.from_pretrained(
            resolve_model(model), device=dev, dtype=resolve_dtype("auto", dev), **settings
        )
        clip = CLIPScorer.from_pretrained(clip_model, device=dev)
        dino = DINOv2Embedder.from_pretrained(dino_model, device=dev)
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
    except (IdentityError, FileNotFoundError, ValueError, ConfigError) as err:
        _fail(str(err))
        return

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
        write_json_atomic(out, result)
        console.print(f"result: {out}")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
