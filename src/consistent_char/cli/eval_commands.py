"""The ``eval`` subcommands: their options and what they print; the work itself is in
`consistent_char.eval.commands`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from consistent_char.cli.core import (
    app,
    check_late_control,
    check_prompts,
    console,
    fail,
    finite,
    fraction,
    say,
    scale_or_auto,
    setup_logging,
)
from consistent_char.config import parse_assignment

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

# Options of eval toy.
PresetOption = Annotated[
    str, typer.Option(help="full, quick or minimal (seconds, for tests on tiny models).")
]
PromptsOption = Annotated[
    list[str] | None, typer.Option("--prompt", help="Replace the prompts (repeatable).")
]
MethodsOption = Annotated[
    list[str] | None,
    typer.Option("--method", help="Run only these methods (repeatable; default all)."),
]
EstimateOption = Annotated[
    bool,
    typer.Option("--estimate", help="Time small pieces and print the run time; run nothing else."),
]

# Options of eval real.
IdentitiesOption = Annotated[
    list[str] | None,
    typer.Option(
        "--identity",
        help="SUBJECT=IDENTITY_DIR: draw that subject with the identity (repeatable).",
    ),
]
ClipOption = Annotated[
    str, typer.Option("--clip", help="CLIP model for CLIP-T (hub id or folder).")
]
DinoOption = Annotated[str, typer.Option("--dino", help="DINOv2 model for identity similarity.")]


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
            callback=finite(0.0),
            help="Draw at this guidance scale (> 0) instead of the run's own.",
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Score RUN_DIR's identity beside its prompt without identity (ToyWorld probe)."""
    setup_logging(verbose)
    from consistent_char.eval.commands import run_summary, score_run

    result = score_run(
        run_dir,
        seeds_per_scene=seeds_per_scene,
        seed=seed,
        out=out,
        probe=probe,
        device=device,
        guidance_scale=guidance_scale,
    )
    for line in run_summary(result, seeds_per_scene):
        console.print(line)
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
    setup_logging(verbose)
    from consistent_char.eval.commands import parse_seeds, seed_line, seeds_summary, set_threads
    from consistent_char.eval.seeds import evaluate_seeds
    from consistent_char.rundir import check_output_dir

    check_prompts(prompts)
    chosen = parse_seeds(seeds)
    overrides = dict(parse_assignment(s) for s in (set_ or []))
    check_output_dir(out)
    set_threads(threads)
    study = evaluate_seeds(
        prompts,
        chosen,
        out,
        overrides=overrides,
        seeds_per_scene=seeds_per_scene,
        probe=probe,
        device=device,
        callback=lambda prompt, seed, run: console.print(seed_line(prompt, seed, run)),
    )
    console.print(seeds_summary(study))
    say(f"results: {out / 'results.json'}, {out / 'results.md'}")


def _write_result(out: Path, result: dict[str, Any]) -> None:
    from consistent_char.eval.commands import write_result

    write_result(out, result)
    say(f"result: {out}")


@eval_app.command("toy")
def eval_toy(
    out: Annotated[
        Path | None, typer.Option("--out", help="Output folder (default: bench/toy-PRESET).")
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="The quick preset: a few minutes on a CPU.")
    ] = False,
    preset: PresetOption = "full",
    prompt: PromptsOption = None,
    set_: SetOption = None,
    method: MethodsOption = None,
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
    estimate: EstimateOption = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the ToyWorld benchmark: methods × vague prompts, ablations, table and figure."""
    setup_logging(verbose)
    from consistent_char.eval.commands import (
        estimate_lines,
        set_threads,
        toy_benchmark,
        toy_settings,
    )
    from consistent_char.eval.presets import reductions

    settings = toy_settings(
        "quick" if quick else preset,
        prompts=prompt,
        methods=method,
        seeds_per_scene=seeds_per_scene,
        seed=seed,
        ablations=ablations,
        overrides=dict(parse_assignment(s) for s in (set_ or [])),
    )
    set_threads(threads)
    for line in reductions(settings) if settings.name != "full" else []:
        console.print(f"reduced: {line}")
    if estimate:
        for line in estimate_lines(settings, probe=probe, device=device):
            console.print(line)
        return
    target, results = toy_benchmark(
        settings, out, probe=probe, device=device, resume=resume, say=console.print
    )
    say(
        ("done", "bold green"),
        f" in {results['seconds_total']:.0f} s: {target / 'results.json'}, "
        f"{target / 'results.md'}, {target / 'scatter.png'}",
    )


@eval_app.command("real")
def eval_real(
    prompt_set: Annotated[
        str,
        typer.Argument(
            help="Prompt-set file (YAML/JSON): subjects × settings, or a built-in set: consistory+."
        ),
    ],
    model: Annotated[str, typer.Option(help="SDXL hub id or local diffusers folder.")],
    identity: IdentitiesOption = None,
    cast: Annotated[
        Path | None,
        typer.Option(
            "--cast", help="A cast folder: draw each subject it finished with its identity."
        ),
    ] = None,
    vanilla: Annotated[
        bool,
        typer.Option(
            help="Also draw each subject that has an identity without it (same seeds), the "
            "base model's baseline."
        ),
    ] = True,
    clip_model: ClipOption = "openai/clip-vit-large-patch14",
    dino_model: DinoOption = "facebook/dinov2-large",
    dreamsim: Annotated[
        bool, typer.Option(help="Also score with DreamSim when it is installed.")
    ] = True,
    seeds_per_setting: Annotated[
        int, typer.Option("--seeds-per-setting", min=1, max=1000, help="Images per setting.")
    ] = 1,
    seed: Annotated[int, typer.Option(help="The first seed.")] = 0,
    steps: Annotated[int | None, typer.Option(min=1, help="Denoising steps per image.")] = None,
    guidance: Annotated[
        float | None, typer.Option(callback=finite(0.0), help="Guidance scale.")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write the result as JSON.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Score CLIP-T, CLIP-I and identity similarity over a prompt set on a real (SDXL-class)
    model, with identities beside the base model's own images."""
    setup_logging(verbose)
    from consistent_char.eval.commands import (
        check_result_file,
        generator_settings,
        load_prompt_set,
        real_record,
        real_table,
        score_prompt_set,
    )
    from consistent_char.generators.settings import GeneratorSettings
    from consistent_char.stages import resolve_device

    # 1. Check inputs and outputs before any model loads.
    prompts, identities, unfinished = load_prompt_set(prompt_set, identity or [], cast)
    if cast is not None and unfinished:
        say(
            ("warning:", "yellow"),
            f" the cast has no finished identity for {len(unfinished)} of the set's "
            f"{len(prompts.subjects)} subjects; they are drawn without one",
        )
    check_result_file(out)
    dev = resolve_device(device)
    settings = generator_settings(steps, guidance)
    GeneratorSettings.from_keywords(settings, "SDXLGenerator")

    # 2. Load and score.
    result = score_prompt_set(
        model,
        prompts,
        identities,
        settings=settings,
        device=dev,
        clip_model=clip_model,
        dino_model=dino_model,
        dreamsim=dreamsim,
        seeds_per_setting=seeds_per_setting,
        seed=seed,
        vanilla=vanilla,
    )
    for line in real_table(result, identities):
        console.print(line)
    if out is not None:
        _write_result(out, real_record(result, prompt_set, model, identities, cast))


@eval_app.command("toy-apps")
def eval_toy_apps(
    out: Annotated[Path, typer.Option("--out", help="Output folder (results, pictures, run).")],
    quick: Annotated[
        bool, typer.Option("--quick", help="Fewer images: a few minutes on a CPU.")
    ] = False,
    identity: Annotated[
        Path | None,
        typer.Option(help="A ToyWorld identity folder (default: extract 'a creature' into OUT)."),
    ] = None,
    set_: SetOption = None,
    seed: Annotated[int, typer.Option(min=0, help="Picks the scenes, poses and seeds.")] = 0,
    paper: Annotated[
        bool,
        typer.Option(
            "--paper",
            help="Pose the identity the paper's way: learned by the plain refiner, its LoRA at "
            "1 in every step of the UNet (the options below still replace each setting).",
        ),
    ] = False,
    control_scale: Annotated[
        float, typer.Option(callback=finite(0.0), help="ControlNet strength (>= 0).")
    ] = 1.0,
    identity_until: Annotated[
        float | None,
        typer.Option(
            callback=fraction,
            help="The fraction of the steps the identity's LoRA acts in, (0, 1] (default 0.85; "
            "--paper: 1).",
        ),
    ] = None,
    lora_scale: Annotated[
        str | None,
        typer.Option(
            callback=scale_or_auto,
            help="The identity's LoRA scale in pose control (>= 0), or 'auto': chosen per "
            "identity on calibration poses the evaluation does not draw (default auto; "
            "--paper: 1).",
        ),
    ] = None,
    in_controlnet: Annotated[
        bool | None,
        typer.Option(
            "--identity-in-controlnet/--no-identity-in-controlnet",
            help="Apply the identity's LoRA to the ControlNet's UNet copy too (default yes; "
            "--paper: no).",
        ),
    ] = None,
    late_control_scale: Annotated[
        float | None,
        typer.Option(
            callback=finite(0.0),
            help="The ControlNet's strength after --identity-until (default 2; --paper: "
            "--control-scale).",
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
    threads: ThreadsOption = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Measure the paper's applications in ToyWorld: local editing and pose control."""
    setup_logging(verbose)
    import consistent_char.toy as toy
    from consistent_char.config import TOY_MODEL, ExtractorConfig
    from consistent_char.eval.apps import (
        apps_settings,
        apps_table,
        extraction_overrides,
        run_toy_apps,
    )
    from consistent_char.eval.commands import check_result_file, set_threads
    from consistent_char.identity import Identity
    from consistent_char.rundir import check_output_dir, write_text_atomic
    from consistent_char.stages import resolve_device

    # Everything is checked before a model loads.
    check_output_dir(out)
    check_result_file(out / "results.json")
    settings = apps_settings(
        quick,
        seed,
        paper=paper,
        control_scale=control_scale,
        identity_until=identity_until,
        lora_scale=lora_scale if lora_scale in (None, "auto") else float(lora_scale),
        identity_in_controlnet=in_controlnet,
        late_control_scale=late_control_scale,
    )
    check_late_control(late_control_scale, settings.identity_until)
    resolve_device(device)
    overrides = dict(parse_assignment(s) for s in (set_ or []))
    if identity is not None:
        if overrides:
            fail("--set configures the extraction, and --identity skips it: give one of them")
        Identity.load(identity)
    else:  # the settings the extraction will run with, the refiner's ControlNet among them
        ExtractorConfig.from_overrides(
            extraction_overrides(settings, overrides), {"model": TOY_MODEL, "device": device}
        )
    try:
        toy.controlnet_dir(), toy.pose_probe_dir(), toy.probe_dir()
    except toy.ToyWeightsMissingError as err:
        fail(str(err))
    set_threads(threads)
    results = run_toy_apps(
        settings,
        out,
        identity_dir=identity,
        overrides=overrides,
        device=device,
        say=console.print,
    )
    _write_result(out / "results.json", results)
    write_text_atomic(out / "results.md", apps_table(results))
    for name, t in results["targets"].items():
        mark = ("met", "green") if t["met"] else ("not met", "yellow")
        say(f"{name}: {t['value']:.3f} (target {t['target']}) ", mark)
