"""The ToyWorld benchmark: methods × vague prompts, and ablations of the loop, scored by the probe.

Each method (`consistent_char.eval.methods.METHODS`) makes an identity for each vague prompt;
each identity is drawn in every scene with the same evaluation seeds and scored with
`consistent_char.eval.toy.score_toy`. The ablations rerun the full loop with one setting
changed (embedder, K through ``d_size_c``, ``d_min_c``, identity prompt template, refiner
mode) on the ablation prompts; each group's baseline is the plain loop.

Three presets: `full_settings` (the benchmark), `quick_settings` (the same path, reduced to a few
minutes on a 2-core CPU; `reductions` names what was reduced) and `minimal_settings` (seconds on
tiny models, for tests). Results are written after every entry, so a cut benchmark resumes from
its ``results.json``.

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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from consistent_char.config import ExtractorConfig, toy_preset
from consistent_char.eval.drift import (
    drift,
    image_validity,
    iteration_measures,
    min_validity,
    modal_identity,
)
from consistent_char.eval.methods import (
    METHOD_LABELS,
    METHODS,
    SINGLE_IMAGE_MODES,
    BenchmarkStages,
    MethodOutcome,
    loop_identities,
    single_image_identity,
)
from consistent_char.eval.results import (
    RESULTS_FILE,
    SCHEMA_VERSION,
    summarize,
    write_outputs,
)
from consistent_char.eval.run import load_probe
from consistent_char.eval.toy import Probe, render_identity_in_scenes, score_records
from consistent_char.identity import Identity
from consistent_char.rundir import save_png_atomic, write_json_atomic
from consistent_char.toy.world import SCENES

__all__ = [
    "ABLATION_GROUPS",
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

#: The vague prompts of the full benchmark: different subsets of the identity attributes.
FULL_PROMPTS: tuple[str, ...] = (
    "a creature",
    "a red creature",
    "a round creature",
    "a creature wearing a hat",
    "a creature with big eyes",
    "a blue creature wearing a crown",
)
ABLATION_GROUPS: tuple[str, ...] = ("embedder", "K", "d_min_c", "core_size", "template", "refiner")


def ablation_label(group: str, config: ExtractorConfig) -> str:
    """How a variant of an ablation group is named, read from its resolved config (so a label
    stays true when other settings change): ``"pixels"``, ``"K=2 (d_size_c=16)"``, ..."""
    if group == "embedder":
        return config.embedder.kind
    if group == "K":
        return f"K={config.num_clusters} (d_size_c={config.d_size_c})"
    if group == "d_min_c":
        return f"d_min_c={config.d_min_c}"
    if group == "core_size":
        return f"core_size={config.core_size}"
    if group == "template":
        return config.identity_prompt_template
    if group == "refiner":
        return config.refiner.mode
    raise ValueError(f"unknown ablation group {group!r}; known: {', '.join(ABLATION_GROUPS)}")


@dataclass
class ToyBenchmarkSettings:
    """What the benchmark runs. Plain data: saved in ``results.json`` and compared on resume.

    Attributes:
        name: ``"full"``, ``"quick"``, ``"minimal"`` or ``"custom"``.
        prompts: The vague prompts every method runs on.
        methods: Which of `METHODS` to run.
        scenes: Scenes each identity is drawn in.
        seeds_per_scene: Evaluation images per scene and identity.
        seed: The loop's seed (config ``seed``) and the evaluation images' seed.
        overrides: Dotted config overrides on top of ToyWorld's preset (`toy_preset`).
        single_image_steps: Training steps of the single-image methods (``None``: the loop's
            ``refiner.steps``, one refine).
        ablations: ``{group: [overrides, ...]}``: each variant is the full loop with its
            overrides on top of `overrides`; each group's baseline is the plain loop. Variants
            are named from their resolved config (`ablation_label`).
        ablation_prompts: The prompts the ablations run on.
    """

    name: str
    prompts: list[str]
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    scenes: list[str] = field(default_factory=lambda: list(SCENES))
    seeds_per_scene: int = 4
    seed: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)
    single_image_steps: int | None = None
    ablations: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    ablation_prompts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
        if not self.prompts:
            raise ValueError("prompts is empty: the benchmark needs at least one prompt")
        if self.seeds_per_scene < 1:
            raise ValueError(f"seeds_per_scene must be at least 1, got {self.seeds_per_scene}")
        if len(set(self.scenes)) < 2:
            raise ValueError(f"need at least 2 distinct scenes, got {self.scenes}")
        unknown = [g for g in self.ablations if g not in ABLATION_GROUPS]
        if unknown:
            raise ValueError(f"unknown ablation groups {unknown}; known: {ABLATION_GROUPS}")
        # An impossible setting fails here, before anything loads.
        self.config()
        for variants in self.ablations.values():
            for overrides in variants:
                self.config(overrides)

    def ablation_variants(self, group: str) -> dict[str, dict[str, Any]]:
        """``{label: overrides}`` of a group, its baseline (the plain loop, ``{}``) first;
        a variant that resolves to the baseline's config is dropped."""
        out: dict[str, dict[str, Any]] = {ablation_label(group, self.config()): {}}
        for overrides in self.ablations.get(group, []):
            out.setdefault(ablation_label(group, self.config(overrides)), overrides)
        return out

    def config(self, extra: dict[str, Any] | None = None) -> ExtractorConfig:
        """The loop's config: ToyWorld's preset, then `overrides`, then `extra`."""
        return ExtractorConfig.from_overrides(
            {**self.overrides, "seed": self.seed, **(extra or {})}, base=toy_preset()
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_overrides(self, overrides: dict[str, Any]) -> ToyBenchmarkSettings:
        """A copy with more config overrides (e.g. another model), validated."""
        return replace(self, overrides={**self.overrides, **overrides})


def full_settings() -> ToyBenchmarkSettings:
    """The benchmark: 6 prompts × 6 methods, 5 scenes × 4 seeds, 9 ablation variants.

    The loop is ToyWorld's preset as `extract` runs it (`toy_preset`), unreduced, so the table
    measures the loop a user gets.
    """
    return ToyBenchmarkSettings(
        name="full",
        prompts=list(FULL_PROMPTS),
        seeds_per_scene=4,
        ablations={
            "embedder": [{"embedder.kind": "pixels"}],
            "K": [{"d_size_c": 16}, {"d_size_c": 4}],
            "d_min_c": [{"d_min_c": 1}, {"d_min_c": 8}],
            "core_size": [{"core_size": None}],
            "template": [{"identity_prompt_template": "{prompt} {token}"}],
            "refiner": [{"refiner.mode": "ti"}, {"refiner.mode": "lora"}],
        },
        ablation_prompts=["a creature"],
    )


def quick_settings() -> ToyBenchmarkSettings:
    """The full path in a few minutes on a 2-core CPU: 2 prompts, 2 seeds per scene, N = 12
    (K = 2), 10 denoising and 10 refine steps, at most 2 iterations, and the ablations with one
    variant per group (two for the refiner: TI only, LoRA only)."""
    return ToyBenchmarkSettings(
        name="quick",
        prompts=["a creature", "a red creature"],
        seeds_per_scene=2,
        overrides={
            "num_images": 12,
            "d_size_c": 6,
            "d_min_c": 3,
            "core_size": 3,
            "max_iterations": 2,
            "generator.num_inference_steps": 10,
            "refiner.steps": 10,
        },
        ablations={
            "embedder": [{"embedder.kind": "pixels"}],
            "K": [{"d_size_c": 4}],
            "d_min_c": [{"d_min_c": 1}],
            "template": [{"identity_prompt_template": "{prompt} {token}"}],
            "refiner": [{"refiner.mode": "ti"}, {"refiner.mode": "lora"}],
        },
        ablation_prompts=["a creature"],
    )


def minimal_settings() -> ToyBenchmarkSettings:
    """Seconds on tiny models (tests): 2 prompts, 2 scenes × 1 seed, N = 4, 2 denoising steps,
    1 refine step, one variant per ablation group. The numbers mean nothing."""
    return ToyBenchmarkSettings(
        name="minimal",
        prompts=["a creature", "a red creature"],
        scenes=["forest", "snow"],
        seeds_per_scene=1,
        overrides={
            "num_images": 4,
            "d_size_c": 2,
            "d_min_c": 1,
            "core_size": 2,
            "max_iterations": 2,
            "generator.num_inference_steps": 2,
            "refiner.steps": 1,
            "refiner.batch_size": 2,
        },
        ablations={
            "embedder": [{"embedder.kind": "pixels"}],
            "K": [{"d_size_c": 4}],
            "d_min_c": [{"d_min_c": 2}],
            "template": [{"identity_prompt_template": "{prompt} {token}"}],
            "refiner": [{"refiner.mode": "ti"}, {"refiner.mode": "lora"}],
        },
        ablation_prompts=["a creature"],
    )


PRESETS: dict[str, Callable[[], ToyBenchmarkSettings]] = {
    "full": full_settings,
    "quick": quick_settings,
    "minimal": minimal_settings,
}


def reductions(
    settings: ToyBenchmarkSettings, reference: ToyBenchmarkSettings | None = None
) -> list[str]:
    """What `settings` runs less of than `reference` (default: the full benchmark), in words."""
    ref = reference or full_settings()
    out: list[str] = []
    if settings.prompts != ref.prompts:
        out.append(
            f"prompts: {len(settings.prompts)} ({settings.prompts}) instead of {len(ref.prompts)}"
        )
    if settings.methods != ref.methods:
        out.append(f"methods: {settings.methods} instead of {ref.methods}")
    if settings.scenes != ref.scenes:
        out.append(f"scenes: {settings.scenes} instead of {ref.scenes}")
    if settings.seeds_per_scene != ref.seeds_per_scene:
        out.append(f"seeds per scene: {settings.seeds_per_scene} instead of {ref.seeds_per_scene}")
    mine, theirs = settings.config(), ref.config()
    for name in mine.differences(theirs):
        if name == "seed":
            continue
        out.append(f"{name}: {_dotted(mine, name)!r} instead of {_dotted(theirs, name)!r}")
    if settings.single_image_steps != ref.single_image_steps:
        out.append(
            f"single_image_steps: {settings.single_image_steps} instead of {ref.single_image_steps}"
        )
    n_mine = sum(len(settings.ablation_variants(g)) - 1 for g in settings.ablations)
    n_ref = sum(len(ref.ablation_variants(g)) - 1 for g in ref.ablations)
    if n_mine != n_ref or settings.ablation_prompts != ref.ablation_prompts:
        out.append(
            f"ablations: {n_mine} variants on {settings.ablation_prompts} instead of {n_ref} "
            f"on {ref.ablation_prompts}"
        )
    return out


# ----------------------------------------------------------------------------- running


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
        shared = _key(job.overrides, job.prompt)
        if job.prompt in slot["prompts"]:
            if job.method in ("loop", "loop_1"):  # a resumed run reuses it as a baseline too
                loops.setdefault(shared, {})[job.method] = slot["prompts"][job.prompt]
            _emit(progress, done, len(jobs), job, slot["prompts"][job.prompt], reused=True)
            continue
        config = settings.config(job.overrides)
        if job.method in ("loop", "loop_1") and shared in loops and job.method in loops[shared]:
            entry = dict(loops[shared][job.method])
        else:
            entry = _run_job(job, config, settings, stages, scorer, out, loops, shared)
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
    config: ExtractorConfig,
    settings: ToyBenchmarkSettings,
    stages: BenchmarkStages,
    probe: Probe,
    out: Path,
    loops: dict[str, dict[str, Any]],
    shared: str,
) -> dict[str, Any]:
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
        run_dir = out / "runs" / "loop_1" / _slug(job.prompt)
        outcome, _ = loop_identities(stages, one, job.prompt, run_dir=run_dir)
    else:
        # One run of the loop gives both the full loop and its first iteration; an ablation
        # variant reports the full loop only. Its run is kept, to read what each iteration kept.
        folder = f"{job.group}-{_slug(job.variant or 'loop')}" if job.group else "loop"
        run_dir = out / "runs" / folder / _slug(job.prompt)
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
    folder = out / "grids" / (f"{group}-{_slug(name)}" if group else _slug(name))
    save_png_atomic(folder / f"{_slug(prompt)}.png", _grid(drawn, settings.seeds_per_scene))
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
        "versions": _versions(),
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


def _slug(text: str) -> str:
    slug = "".join(c if c.isalnum() else "-" for c in text.lower())
    return "-".join(p for p in slug.split("-") if p)[:60] or "x"


def _key(*parts: Any) -> str:
    return json.dumps(parts, sort_keys=True, default=str)


def _dotted(config: ExtractorConfig, name: str) -> Any:
    node: Any = config.to_dict()
    for part in name.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _versions() -> dict[str, str]:
    from consistent_char.provenance import versions

    return versions()


# --------------------------------------------------------------------------- estimating


@dataclass
class UnitCosts:
    """Measured seconds of the benchmark's units of work, on one machine.

    Attributes:
        gen_image_step: One image, one denoising step (with the config's guidance).
        gen_image_step_identity: The same with an identity applied (its LoRA adds work).
        refine_step: One refiner step at the config's batch size.
        refine_call: The fixed cost of one refine call (encoding the images, set-up).
        embed_image: Embedding one image.
        probe_image: The probe reading one image.
        startup: Loading the models and the first (warm-up) generation.
        torch_threads: ``torch.get_num_threads()`` when measured.
    """

    gen_image_step: float
    gen_image_step_identity: float
    refine_step: float
    refine_call: float
    embed_image: float
    probe_image: float
    startup: float = 0.0
    torch_threads: int = 1


def measure_unit_costs(
    settings: ToyBenchmarkSettings,
    *,
    probe: Probe | str | os.PathLike[str] | None = None,
    device: str | None = None,
    n_images: int = 8,
    refine_steps: tuple[int, int] = (2, 6),
) -> UnitCosts:
    """Times small pieces of the benchmark's work (a few seconds to a minute on a CPU).

    Generation is timed on `n_images` images at the config's denoising steps; the refiner at two
    step counts, whose difference gives the cost per step and the rest the cost per call.
    """
    config = settings.config()
    stages = BenchmarkStages(device=device)
    t0 = time.perf_counter()
    generator = stages.generator(config)
    prompts = [settings.prompts[0]] * n_images
    seeds = list(range(n_images))
    generator.generate(prompts[:1], seeds[:1])  # warm-up: first-call allocations
    startup = time.perf_counter() - t0
    t0 = time.perf_counter()
    images = generator.generate(prompts, seeds)
    gen = (time.perf_counter() - t0) / (n_images * generator.num_inference_steps)
    t0 = time.perf_counter()
    embedder = stages.embedder(config)
    scorer = load_probe(probe)
    startup += time.perf_counter() - t0
    t0 = time.perf_counter()
    embedder.embed(images)
    embed = (time.perf_counter() - t0) / n_images
    t0 = time.perf_counter()
    scorer.predict(images)
    probe_s = (time.perf_counter() - t0) / n_images
    caption = config.identity_prompt_template.format(
        token=config.refiner.token, prompt=settings.prompts[0]
    )
    timings = []
    for steps in refine_steps:
        refiner = stages.refiner(config, steps=steps)
        t0 = time.perf_counter()
        identity = refiner.refine(None, images, [caption] * len(images), seed=0)
        timings.append(time.perf_counter() - t0)
    (s1, t1), (s2, t2) = zip(refine_steps, timings, strict=True)
    per_step = max((t2 - t1) / (s2 - s1), 0.0)
    t0 = time.perf_counter()
    generator.generate([caption] * n_images, seeds, identity)
    gen_identity = (time.perf_counter() - t0) / (n_images * generator.num_inference_steps)
    return UnitCosts(
        gen_image_step=gen,
        gen_image_step_identity=gen_identity,
        refine_step=per_step,
        refine_call=max(t1 - per_step * s1, 0.0),
        embed_image=embed,
        probe_image=probe_s,
        startup=startup,
        torch_threads=torch.get_num_threads(),
    )


def estimate_seconds(settings: ToyBenchmarkSettings, costs: UnitCosts) -> dict[str, Any]:
    """An upper bound on the benchmark's run time from measured unit costs.

    Every loop is counted at ``max_iterations`` refines (a loop that converges earlier costs
    less); ``loop_1`` costs only its scoring (it is read off the full loop).

    Returns:
        ``{"startup": seconds, "methods": {method: seconds over all prompts}, "ablations":
        seconds, "total": seconds}``.
    """

    def gen(config: ExtractorConfig, n: int, identity: bool = True) -> float:
        per_step = costs.gen_image_step_identity if identity else costs.gen_image_step
        return n * config.generator.num_inference_steps * per_step

    def refine(steps: int) -> float:
        return costs.refine_call + steps * costs.refine_step

    def evaluate(config: ExtractorConfig, identity: bool = True) -> float:
        n = len(settings.scenes) * settings.seeds_per_scene
        return gen(config, n, identity) + n * costs.probe_image

    def loop(config: ExtractorConfig) -> float:
        n = config.num_images
        iterations = config.max_iterations * (n * costs.embed_image + refine(config.refiner.steps))
        # Iteration 0 draws the plain prompt; every later one draws with the identity.
        drawing = gen(config, n, False) + (config.max_iterations - 1) * gen(config, n)
        return iterations + drawing + evaluate(config)

    base = settings.config()
    single_steps = settings.single_image_steps or base.refiner.steps
    single = gen(base, 1, False) + refine(single_steps) + evaluate(base)
    per_prompt = {
        "vanilla": evaluate(base, False),
        "ti_single": single,
        "lora_single": single,
        "ti_lora_single": single,
        # Read off the full loop when it runs; else a loop of one iteration.
        "loop_1": evaluate(base)
        if "loop" in settings.methods
        else loop(settings.config({"max_iterations": 1})),
        "loop": loop(base),
    }
    methods = {m: per_prompt[m] * len(settings.prompts) for m in settings.methods}
    ablations = 0.0
    for group in settings.ablations:
        for overrides in list(settings.ablation_variants(group).values())[1:]:
            ablations += loop(settings.config(overrides)) * len(settings.ablation_prompts)
    if settings.ablations:
        # Each group's baseline is the plain loop, already run for the main prompts.
        ran = settings.prompts if "loop" in settings.methods else []
        ablations += loop(base) * len([p for p in settings.ablation_prompts if p not in ran])
    total = costs.startup + sum(methods.values()) + ablations
    return {"startup": costs.startup, "methods": methods, "ablations": ablations, "total": total}
