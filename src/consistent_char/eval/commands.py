"""The work behind the ``consistent-char eval`` subcommands, given their parsed options.

Each subcommand checks its inputs and outputs before any model loads, runs one of this
package's evaluations and prints a short summary. The checks, the runs and the summary lines
live here, so that `consistent_char.cli` keeps only option parsing and printing; every function
that reports as it goes takes a callback that receives the line to show.

- ``eval run``: `score_run`, `run_summary`;
- ``eval seeds``: `parse_seeds`, `seed_line`, `seeds_summary`;
- ``eval toy``: `toy_settings`, `estimate_lines`, `toy_benchmark`;
- ``eval real``: `load_prompt_set`, `generator_settings`, `score_prompt_set`, `real_table`,
  `real_record`;
- every ``--out`` result file: `check_result_file`, `write_result`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from consistent_char.errors import InputNotFoundError, InvalidValueError, OutputExistsError

if TYPE_CHECKING:
    from consistent_char.eval.presets import ToyBenchmarkSettings
    from consistent_char.eval.real import PromptSet
    from consistent_char.identity import Identity

#: What every result file of ``consistent-char eval`` says wrote it: ``--out`` overwrites only
#: such a file, never one of the user's.
RESULT_MARK = "consistent-char eval"


def check_result_file(out: Path | None) -> None:
    """Refuses a result file that exists and is not an earlier result of these commands."""
    from consistent_char.rundir import check_output_file

    if out is None:
        return
    check_output_file(out)
    if out.exists() or out.is_symlink():
        try:
            ours = json.loads(out.read_text(encoding="utf-8")).get("written_by") == RESULT_MARK
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise OutputExistsError(
                f"{out} exists and is not a result of consistent-char eval; choose another "
                "--out or move that file (nothing was run)"
            )


def write_result(out: Path, result: Mapping[str, Any]) -> None:
    """Writes `result` as JSON, marked as ours so that a later run may overwrite it."""
    from consistent_char.rundir import write_json_atomic

    write_json_atomic(out, {"written_by": RESULT_MARK, **result})


def set_threads(threads: int | None) -> None:
    """Caps torch's CPU threads (a shared CPU runs fastest and steadiest with few)."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- eval run


def score_run(
    run_dir: Path,
    *,
    seeds_per_scene: int,
    seed: int,
    out: Path | None,
    probe: Path | None,
    device: str | None,
    guidance_scale: float | None,
) -> dict[str, Any]:
    """`evaluate_run` on a run directory, after checking it is one and that `out` is free."""
    from consistent_char.eval.run import evaluate_run
    from consistent_char.rundir import RunDirectory

    if not RunDirectory(run_dir).exists():
        raise InputNotFoundError(f"{run_dir} is not a run directory: no state.json in it")
    check_result_file(out)
    return evaluate_run(
        run_dir,
        seeds_per_scene=seeds_per_scene,
        seed=seed,
        probe=probe,
        device=device,
        guidance_scale=guidance_scale,
    )


def run_summary(result: Mapping[str, Any], seeds_per_scene: int) -> list[str]:
    """The lines ``eval run`` prints: the run, both sides' scores, drift and validity."""
    lines = [
        f"{result['prompt']!r}: {result['iterations']} iterations, "
        f"{'converged' if result['converged'] else 'not converged'}; "
        f"{len(result['scenes'])} scenes × {seeds_per_scene} seeds, "
        f"guidance {result['guidance_scale']}",
        "             identity consistency   prompt adherence   validity",
    ]
    for name in ("identity", "vanilla"):
        r = result[name]
        validity = "–" if r.get("validity") is None else f"{r['validity']:.3f}"
        lines.append(
            f"  {name:<10} {r['identity_consistency']:>20.3f} {r['prompt_adherence']:>18.3f}"
            f" {validity:>10}"
        )
    drift = result["drift"]
    if drift["kept"] is not None:
        lines.append(
            f"drift: chosen at iteration 0 {' '.join(drift['chosen'].values())}, final "
            f"{' '.join(drift['final'].values())}: kept {drift['kept']:.2f} of the attributes"
        )
    readings = [m["validity"] for m in result["per_iteration"]]
    if readings and all(v is not None for v in readings):
        lines.append("validity per iteration: " + ", ".join(f"{v:.2f}" for v in readings))
    return lines


# ----------------------------------------------------------------------------- eval seeds


def parse_seeds(text: str) -> list[int]:
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


def seed_line(prompt: str, seed: int, run: Mapping[str, Any]) -> str:
    """The line ``eval seeds`` prints after each scored run."""
    kept = "–" if run["drift_kept"] is None else f"{run['drift_kept']:.2f}"
    return (
        f"{prompt!r} seed {seed}: {run['iterations']} iterations, consistency "
        f"{run['identity_consistency']:.3f}, adherence {run['prompt_adherence']:.3f}, "
        f"drift kept {kept}"
    )


def seeds_summary(study: dict[str, Any]) -> str:
    """The per-prompt summary of results.md, without its per-run table."""
    from consistent_char.eval.seeds import markdown_summary

    return markdown_summary(study).split("\n\n| prompt | seed")[0]


# ----------------------------------------------------------------------------- eval toy


def toy_settings(
    preset: str,
    *,
    prompts: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    seeds_per_scene: int | None = None,
    seed: int | None = None,
    ablations: bool = True,
    overrides: Mapping[str, Any] | None = None,
) -> ToyBenchmarkSettings:
    """A benchmark preset with the command line's changes: the prompts (the first one also for
    the ablations), the methods, the evaluation images, the seed and loop settings."""
    from consistent_char.eval.presets import PRESETS

    if preset not in PRESETS:
        raise InvalidValueError(f"unknown --preset {preset!r}; known: {', '.join(PRESETS)}")
    settings = PRESETS[preset]()
    changes: dict[str, Any] = {}
    if prompts:
        changes["prompts"] = list(prompts)
        changes["ablation_prompts"] = list(prompts)[:1]
    if methods:
        changes["methods"] = list(methods)
    if seeds_per_scene is not None:
        changes["seeds_per_scene"] = seeds_per_scene
    if seed is not None:
        changes["seed"] = seed
    if not ablations:
        changes["ablations"] = {}
    changes["overrides"] = {**settings.overrides, **(overrides or {})}
    return dataclasses.replace(settings, **changes)


def estimate_lines(
    settings: ToyBenchmarkSettings, *, probe: Path | None, device: str | None
) -> list[str]:
    """Times small pieces of the benchmark and says what each part would take, in minutes."""
    from consistent_char.eval.estimate import estimate_seconds, measure_unit_costs

    costs = measure_unit_costs(settings, probe=probe, device=device)
    est = estimate_seconds(settings, costs)
    lines = [
        f"unit costs ({costs.torch_threads} thread(s)): "
        f"{costs.gen_image_step * 1000:.1f} ms per image-step "
        f"({costs.gen_image_step_identity * 1000:.1f} ms with an identity), "
        f"{costs.refine_step:.3f} s per refine step + {costs.refine_call:.2f} s per call, "
        f"{costs.embed_image * 1000:.1f} ms embed, {costs.probe_image * 1000:.1f} ms probe "
        "per image",
        f"  {'startup':<16} {est['startup'] / 60:7.1f} min",
    ]
    lines += [f"  {method:<16} {secs / 60:7.1f} min" for method, secs in est["methods"].items()]
    lines.append(f"  {'ablations':<16} {est['ablations'] / 60:7.1f} min")
    lines.append(
        f"estimated total (upper bound: every loop at max_iterations): {est['total'] / 60:.1f} min"
    )
    return lines


def toy_benchmark(
    settings: ToyBenchmarkSettings,
    out: Path | None,
    *,
    probe: Path | None,
    device: str | None,
    resume: bool,
    say: Callable[[str], None],
) -> tuple[Path, dict[str, Any]]:
    """Runs the benchmark into `out` (default: ``bench/toy-NAME``), saying one line per entry;
    returns the folder and the results."""
    from consistent_char.eval.benchmark import BenchmarkEvent, run_toy_benchmark
    from consistent_char.rundir import check_output_dir

    target = out or Path("bench") / f"toy-{settings.name}"
    check_output_dir(target)

    def report(event: BenchmarkEvent) -> None:
        what = event.method if event.group is None else f"{event.group}: {event.variant}"
        e = event.entry
        note = "  (from results.json)" if event.reused else ""
        say(
            f"[{event.done}/{event.total}] {what} · {event.prompt!r}: identity consistency "
            f"{e['identity_consistency']:.3f}, prompt adherence {e['prompt_adherence']:.3f}, "
            f"{e['seconds']:.1f} s{note}"
        )

    results = run_toy_benchmark(
        settings, target, probe=probe, device=device, resume=resume, progress=report
    )
    return target, results


# ----------------------------------------------------------------------------- eval real


def load_prompt_set(
    prompt_set: str, items: Sequence[str], cast: Path | None = None
) -> tuple[PromptSet, dict[str, Identity], list[str]]:
    """The prompt set `prompt_set` names (a file or a built-in set such as ``consistory+``),
    each subject's identity (from the ``SUBJECT=IDENTITY_DIR`` options and the finished
    subjects of the cast folder `cast`), checked against the set's subjects, and the set's
    subjects that the cast has no finished identity for."""
    from consistent_char.cast import load_subjects
    from consistent_char.identity import Identity

    prompts, _ = load_subjects(prompt_set)
    names = {s.name for s in prompts.subjects}
    identities, unfinished = cast_identities(cast, names) if cast is not None else ({}, [])
    for item in items:
        subject, sep, folder = item.rpartition("=")
        if not sep or not subject.strip() or not folder:
            raise InvalidValueError(f"--identity takes SUBJECT=IDENTITY_DIR, got {item!r}")
        if subject.strip() in identities:
            raise InvalidValueError(f"--identity {subject.strip()!r}: that subject has one already")
        identities[subject.strip()] = Identity.load(folder)
    unknown = sorted(set(identities) - names)
    if unknown:
        raise InvalidValueError(f"--identity names subjects not in {prompt_set}: {unknown}")
    return prompts, identities, unfinished


def cast_identities(cast: Path, names: set[str]) -> tuple[dict[str, Identity], list[str]]:
    """The identity of every finished subject of the cast folder `cast` that is in `names`,
    and the subjects of `names` the cast has not finished.

    Raises:
        InputNotFoundError: `cast` is not a cast folder.
        InvalidValueError: The cast has subjects that are not in `names` (another prompt set).
    """
    from consistent_char.cast import CastRecord
    from consistent_char.identity import Identity

    record = CastRecord.read(cast)
    foreign = sorted({r.subject for r in record.subjects} - names)
    if foreign:
        raise InvalidValueError(
            f"--cast {cast} was cast from {record.prompt_set}, whose subjects {foreign[:3]}"
            f"{' ...' if len(foreign) > 3 else ''} are not in this prompt set"
        )
    done = {r.subject: r for r in record.subjects if r.status == "done"}
    identities = {name: Identity.load(cast / r.run / "identity") for name, r in done.items()}
    return identities, sorted(names - set(done))


def generator_settings(steps: int | None, guidance: float | None) -> dict[str, Any]:
    """The generator's default settings with the command line's steps and guidance scale."""
    from consistent_char.config import GeneratorConfig

    settings = GeneratorConfig().model_dump()
    if steps is not None:
        settings["num_inference_steps"] = steps
    if guidance is not None:
        settings["guidance_scale"] = guidance
    return settings


def score_prompt_set(
    model: str,
    prompts: PromptSet,
    identities: Mapping[str, Identity],
    *,
    settings: Mapping[str, Any],
    device: Any,
    clip_model: str,
    dino_model: str,
    dreamsim: bool,
    seeds_per_setting: int,
    seed: int,
    vanilla: bool = False,
) -> dict[str, Any]:
    """Loads SDXL, CLIP, DINOv2 (and DreamSim when asked and installed) and scores the prompt
    set with `evaluate_prompt_set`. Every model is found before any loads."""
    from consistent_char.embedders.dinov2 import DINOv2Embedder
    from consistent_char.eval.real import (
        CLIPScorer,
        DreamSimEmbedder,
        dreamsim_available,
        evaluate_prompt_set,
    )
    from consistent_char.generators.sdxl import SDXLGenerator
    from consistent_char.stages import resolve_dtype, resolve_model

    sdxl = resolve_model(model)
    clip_source = resolve_model(clip_model, kind="embedder")
    dino_source = resolve_model(dino_model, kind="embedder")
    generator = SDXLGenerator.from_pretrained(
        sdxl, device=device, dtype=resolve_dtype("auto", device), **settings
    )
    clip = CLIPScorer.from_pretrained(clip_source, device=device)
    dino = DINOv2Embedder.from_pretrained(dino_source, device=device)
    second = (
        DreamSimEmbedder.from_pretrained(device=str(device))
        if dreamsim and dreamsim_available()
        else None
    )
    return evaluate_prompt_set(
        generator,
        prompts,
        clip=clip,
        dino=dino,
        dreamsim=second,
        identities=identities,
        seeds_per_setting=seeds_per_setting,
        seed=seed,
        vanilla=vanilla,
    )


def real_table(result: Mapping[str, Any], identities: Mapping[str, Identity]) -> list[str]:
    """The lines ``eval real`` prints: one row of scores per subject and their mean; with the
    vanilla baseline, the paper-style comparison over the subjects that have an identity (each
    drawn with and without it, same prompts and seeds)."""

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    def row(label: str, marked: str, score: Mapping[str, Any]) -> str:
        cells = [cell(score[k]) for k in ("clip_t", "clip_i", "dino_similarity")]
        return (
            f"{label[:40]:<40} {marked:>8} {cells[0]:>7} {cells[1]:>7} {cells[2]:>7} "
            f"{cell(score['dreamsim_similarity']):>8}"
        )

    header = f"{'identity':>8} {'CLIP-T':>7} {'CLIP-I':>7} {'DINOv2':>7} {'DreamSim':>8}"
    lines = [f"{'subject':<40} {header}"]
    for name, score in result["subjects"].items():
        lines.append(row(name, "yes" if name in identities else "no", score))
    lines.append(row("mean", "", result["mean"]))
    if result.get("vanilla"):
        n = len(result["vanilla"]["subjects"])
        lines += [
            "",
            f"{f'{n} subjects with an identity':<40} {header}",
            row("The Chosen One (identity)", "yes", result["mean_with_identity"]),
            row("vanilla (base model)", "no", result["vanilla"]["mean"]),
        ]
    return lines


def real_record(
    result: dict[str, Any],
    prompt_set: str,
    model: str,
    identities: Mapping[str, Identity],
    cast: Path | None = None,
) -> dict[str, Any]:
    """`result` with what it measured: the prompt set, the model, the cast folder and each
    identity's token."""
    return {
        **result,
        "prompt_set": prompt_set,
        "cast": None if cast is None else str(cast),
        "model": model,
        "identities": {name: str(i.token) for name, i in identities.items()},
    }
