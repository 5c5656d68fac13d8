"""The ToyWorld benchmark: methods × vague prompts, and ablations of the loop, scored by the probe.

Each method (`consistent_char.eval.methods.METHODS`) makes an identity for each vague prompt;
each identity is drawn in every scene with the same evaluation seeds and scored with
`consistent_char.eval.toy.score_toy`. The ablations rerun the full loop with one setting
changed (embedder, K through ``d_size_c``, ``d_min_c``, identity prompt template, refiner
mode) on the ablation prompts; each group's baseline is the plain loop.

What runs is a `ToyBenchmarkSettings`, one of three presets (`consistent_char.eval.presets`);
`consistent_char.eval.estimate` says beforehand how long it will take. Results are written after
every entry, so a cut benchmark resumes from its ``results.json``.

Example:
    >>> from consistent_char.eval.benchmark import quick_settings, run_toy_benchmark
    >>> results = run_toy_benchmark(quick_settings(), "bench/quick")  # doctest: +SKIP
    >>> results["methods"]["loop"]["mean"]["identity_consistency"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from consistent_char.config import ExtractorConfig
from consistent_char.eval.drift import (
    drift,
    image_validity,
    iteration_measures,
    min_validity,
    modal_identity,
)
from consistent_char.eval.estimate import UnitCosts, estimate_seconds, measure_unit_costs
from consistent_char.eval.methods import (
    METHOD_LABELS,
    SINGLE_IMAGE_MODES,
    BenchmarkStages,
    MethodOutcome,
    cache_key,
    loop_identities,
    single_image_identity,
)
from consistent_char.eval.presets import (
    ABLATION_GROUPS,
    FULL_PROMPTS,
    PRESETS,
    ToyBenchmarkSettings,
    ablation_label,
    full_settings,
    minimal_settings,
    quick_settings,
    reductions,
)
from consistent_char.eval.results import (
    RESULTS_FILE,
    SCHEMA_VERSION,
    slug,
    summarize,
    write_outputs,
)
from consistent_char.eval.run import load_probe
from consistent_char.eval.toy import Probe, render_identity_in_scenes, score_records
from consistent_char.identity import Identity
from consistent_char.provenance import versions
from consistent_char.rundir import save_png_atomic, write_json_atomic

__all__ = [
    "ABLATION_GROUPS",
    "FULL_PROMPTS",
    "ablation_label",
    "PRESETS",
    "BenchmarkEvent",
    "ToyBenchmarkSettings",
    "UnitCosts",
    "estimate_seconds",
    "full_settings",
    "measure_unit_costs",
    "minimal_settings",
    "quick_settings",
    "reductions",
    "run_toy_benchmark",
]

logger = logging.getLogger(__name__)


@dataclass
class BenchmarkEvent:
    """Reported after each entry: `done` of `total` entries, what it was and its scores."""

    done: int
    total: int
    method: str
    prompt: str
    group: str | None
    variant: str | None
    entry: dict[str, Any]
    reused: bool = False


@dataclass
class _Job:
    method: str
    prompt: str
    overrides: dict[str, Any]
    group: str | None = None
    variant: str | None = None


def _jobs(settings: ToyBenchmarkSettings) -> list[_Job]:
    jobs: list[_Job] = []
    for prompt in settings.prompts:
        jobs += [_Job(m, prompt, {}) for m in settings.methods]
    for group in settings.ablations:
        variants = settings.ablation_variants(group)
        for prompt in settings.ablation_prompts:
            jobs += [_Job("loop", prompt, o, group, label) for label, o in variants.items()]
    return jobs


def run_toy_benchmark(
    settings: ToyBenchmarkSettings,
    out_dir: str | os.PathLike[str],
    *,
    probe: Probe | str | os.PathLike[str] | None = None,
    device: str | None = None,
    resume: bool = True,
    progress: Callable[[BenchmarkEvent], None] | None = None,
) -> dict[str, Any]:
    """Runs the ToyWorld benchmark into `out_dir` and returns the results.

    Writes ``results.json`` after each entry (the schema is in ``docs/evaluation.md``),
    ``grids/<method or variant>/<prompt>.png`` (the scored images, a row per scene) and, at the
    end, ``results.md`` and ``scatter.png``.

    Args:
        settings: What to run (`full_settings`, `quick_settings`, ...).
        out_dir: Where the results go.
        probe: The identity probe (object, folder, or ``None`` for ToyWorld's).
        device: Overrides the config's device.
        resume: Reuse the entries of an earlier ``results.json`` in `out_dir` written with the
            same settings and config (one written with others is an error); ``False``
            overwrites it.
        progress: Called with a `BenchmarkEvent` after each entry.
    """
    # 1. Check the settings and prepare the output
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = settings.config()
    jobs = _jobs(settings)
    results = _start(settings, base, out / RESULTS_FILE if resume else None)
    scorer = load_probe(probe)
    stages = BenchmarkStages(device=device)
    t_start = time.perf_counter()
    spent_before = float(results.get("seconds_total", 0.0))
    # Loop runs shared between the methods table and the ablation baselines, by overrides.
    loops: dict[str, dict[str, Any]] = {}

    # 2. Run every entry, scoring each identity on the same evaluation seeds
    for done, job in enumerate(jobs, start=1):
        slot = _slot(results, job, settings)
        shared = cache_key(job.overrides, job.prompt)
        if job.prompt in slot["prompts"]:
            if job.method in ("loop", "loop_1"):  # a resumed run reuses it as a baseline too
                loops.setdefault(shared, {})[job.method] = slot["prompts"][job.prompt]
            _emit(progress, done, len(jobs), job, slot["prompts"][job.prompt], reused=True)
            continue
        entry = _run_job(job, settings, stages, scorer, out, loops, shared)
        slot["prompts"][job.prompt] = entry
        results["seconds_total"] = spent_before + time.perf_counter() - t_start
        write_json_atomic(out / RESULTS_FILE, summarize(results))
        _emit(progress, done, len(jobs), job, entry)

    # 3. Means, the table and the figure
    results["seconds_total"] = spent_before + time.perf_counter() - t_start
    results = summarize(results)
    write_outputs(results, out)
    return results


def _run_job(
    job: _Job,
    settings: ToyBenchmarkSettings,
    stages: BenchmarkStages,
    probe: Probe,
    out: Path,
    loops: dict[str, dict[str, Any]],
    shared: str,
) -> dict[str, Any]:
    """Makes and scores one entry's identity; a loop entry whose run another entry already made
    (the same prompt and overrides) is read off that run."""
    if job.method in ("loop", "loop_1") and job.method in loops.get(shared, {}):
        return dict(loops[shared][job.method])
    config = settings.config(job.overrides)
    if job.method == "vanilla":
        outcome = MethodOutcome(None, iterations=0, converged=None, seconds=0.0)
    elif job.method in SINGLE_IMAGE_MODES:
        outcome = single_image_identity(
            stages,
            config,
            job.prompt,
            SINGLE_IMAGE_MODES[job.method],
            steps=settings.single_image_steps,
        )
    elif job.method == "loop_1" and "loop" not in settings.methods:
        # No full loop to read the first iteration off: run just one.
        one = settings.config({**job.overrides, "max_iterations": 1})
        run_dir = out / "runs" / "loop_1" / slug(job.prompt)
        outcome, _ = loop_identities(stages, one, job.prompt, run_dir=run_dir)
    else:
        # One run of the loop gives both the full loop and its first iteration; an ablation
        # variant reports the full loop only. Its run is kept, to read what each iteration kept.
        folder = f"{job.group}-{slug(job.variant or 'loop')}" if job.group else "loop"
        run_dir = out / "runs" / folder / slug(job.prompt)
        full, first = loop_identities(stages, config, job.prompt, run_dir=run_dir)
        wanted = [("loop", full)]
        if job.group is None and "loop_1" in settings.methods:
            wanted.append(("loop_1", first))
        loops[shared] = {}
        for method, outcome in wanted:
            name = job.variant if method == "loop" and job.variant else method
            loops[shared][method] = _score(
                outcome, config, job.prompt, settings, stages, probe, out, name, job.group
            )
        return dict(loops[shared][job.method])
    name = job.variant or job.method
    return _score(outcome, config, job.prompt, settings, stages, probe, out, name, job.group)


def _score(
    outcome: MethodOutcome,
    config: ExtractorConfig,
    prompt: str,
    settings: ToyBenchmarkSettings,
    stages: BenchmarkStages,
    probe: Probe,
    out: Path,
    name: str,
    group: str | None,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    drawn = render_identity_in_scenes(
        stages.generator(config),
        outcome.identity,
        prompt,
        settings.scenes,
        settings.seeds_per_scene,
        settings.seed,
    )
    images = [image for _, image in drawn]
    records = probe.predict(images)
    score = score_records(records, [scene for scene, _ in drawn], base_prompt=prompt)
    folder = out / "grids" / (f"{group}-{slug(name)}" if group else slug(name))
    save_png_atomic(folder / f"{slug(prompt)}.png", _grid(drawn, settings.seeds_per_scene))
    entry: dict[str, Any] = {
        **score,
        "iterations": outcome.iterations,
        "converged": outcome.converged,
        "seconds": outcome.seconds,
        "eval_seconds": 0.0,
        "token": outcome.identity.token if isinstance(outcome.identity, Identity) else None,
        "validity": image_validity(probe, images),
        "min_validity": None,
        "drift": None,
    }
    if outcome.run_dir is not None:
        measures = iteration_measures(outcome.run_dir, probe)
        if outcome.iterations == 1:
            measures = measures[:1]  # loop_1: the identity after the first refine
        entry["min_validity"] = min_validity(measures)
        entry["drift"] = drift(measures, records)
    elif outcome.training_images:
        chosen = modal_identity(probe.predict(outcome.training_images))
        entry["drift"] = drift([{"chosen_modal": chosen}], records)
    entry["eval_seconds"] = time.perf_counter() - t0
    return entry


def _start(
    settings: ToyBenchmarkSettings, base: ExtractorConfig, previous: Path | None
) -> dict[str, Any]:
    fresh: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "toyworld",
        "preset": settings.name,
        "reduced": reductions(settings) if settings.name != "full" else [],
        "settings": settings.to_dict(),
        "config": base.to_dict(),
        "versions": versions(),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(),
        },
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "methods": {},
        "ablations": {},
        "seconds_total": 0.0,
    }
    if previous is None or not previous.is_file():
        return fresh
    try:
        old = json.loads(previous.read_text())
    except (OSError, json.JSONDecodeError):
        logger.warning("cannot read %s; starting afresh", previous)
        return fresh
    same = (
        old.get("schema_version") == SCHEMA_VERSION
        and old.get("settings") == fresh["settings"]
        and _same_config(old.get("config"), base)
    )
    if not same:
        # Never overwrite finished results silently: they may have taken an hour.
        raise ValueError(
            f"{previous} was written with other settings or another config; choose another "
            "output folder, or pass resume=False (--no-resume) to overwrite it"
        )
    logger.info("resuming the benchmark in %s", previous.parent)
    return {**fresh, **{k: old[k] for k in ("methods", "ablations", "seconds_total", "started")}}


def _same_config(saved: Any, config: ExtractorConfig) -> bool:
    """Whether a saved config dict resolves to `config`: read through the config class, so
    that a setting added since (at its default) does not tell the two apart."""
    try:
        return not ExtractorConfig.model_validate(saved).differences(config)
    except ValidationError:
        return False


def _slot(results: dict[str, Any], job: _Job, settings: ToyBenchmarkSettings) -> dict[str, Any]:
    if job.group is None:
        return results["methods"].setdefault(  # type: ignore[no-any-return]
            job.method, {"label": METHOD_LABELS[job.method], "prompts": {}}
        )
    baseline = ablation_label(job.group, settings.config())
    group = results["ablations"].setdefault(job.group, {"baseline": baseline, "variants": {}})
    return group["variants"].setdefault(  # type: ignore[no-any-return]
        job.variant, {"overrides": job.overrides, "prompts": {}}
    )


def _emit(
    progress: Callable[[BenchmarkEvent], None] | None,
    done: int,
    total: int,
    job: _Job,
    entry: dict[str, Any],
    *,
    reused: bool = False,
) -> None:
    logger.info("%d/%d %s %s %s: %s", done, total, job.method, job.variant, job.prompt, entry)
    if progress is not None:
        progress(
            BenchmarkEvent(
                done, total, job.method, job.prompt, job.group, job.variant, entry, reused
            )
        )


def _grid(drawn: list[tuple[str, Any]], per_row: int) -> Any:
    from PIL import Image

    w, h = drawn[0][1].size
    rows = (len(drawn) + per_row - 1) // per_row
    sheet = Image.new("RGB", (w * per_row, h * rows), "white")
    for k, (_, image) in enumerate(drawn):
        sheet.paste(image, ((k % per_row) * w, (k // per_row) * h))
    return sheet
