"""The loop over many seeds on ToyWorld: does it find a kept character every time?

`evaluate_seeds` runs the loop for every prompt × seed (one run folder each, resumable, models
loaded once), scores every finished run with `evaluate_run` (the identity and the plain prompt
in every scene, drift and validity), and summarises each prompt over its seeds:

- identity consistency and prompt adherence (mean and min over seeds);
- the identity attributes the prompt names, kept on what fraction of images (mean and min),
  against plain prompting;
- validity: the lowest over every iteration of every seed;
- drift: on how many seeds the final identity kept at least 0.8 of the attributes of the
  character chosen at iteration 0;
- the distinct final identities found over the seeds, and how many wear a hat.

It writes ``results.json`` and ``results.md`` into the output folder after every run, so a cut
study resumes where it stopped (`consistent-char eval seeds`).

Example:
    >>> from consistent_char.eval.seeds import evaluate_seeds
    >>> study = evaluate_seeds(["a creature"], range(8), "runs/seeds")  # doctest: +SKIP
    >>> study["prompts"]["a creature"]["summary"]["consistency_mean"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from consistent_char.config import ExtractorConfig, toy_preset
from consistent_char.eval.results import slug
from consistent_char.eval.run import EVALUATION_FILE, evaluate_run, load_probe
from consistent_char.rundir import write_json_atomic, write_text_atomic

__all__ = ["DRIFT_KEPT", "evaluate_seeds", "markdown_summary", "summarize_prompt"]

logger = logging.getLogger(__name__)

#: A run "kept its character" when its final identity agrees with iteration 0's chosen
#: cluster on at least this fraction of the identity attributes.
DRIFT_KEPT = 0.8


def evaluate_seeds(
    prompts: Sequence[str],
    seeds: Iterable[int],
    out: str | os.PathLike[str],
    *,
    overrides: dict[str, Any] | None = None,
    seeds_per_scene: int = 8,
    probe: Any = None,
    device: str | None = None,
    callback: Callable[[str, int, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Runs and scores the loop for every prompt × seed on ToyWorld.

    Args:
        prompts: The prompts to find characters for, e.g. ``["a creature", "a red creature"]``.
        seeds: The loop's seeds (config ``seed``).
        out: The study's folder: ``runs/<prompt>/seed-<k>/`` (each a run folder, resumed when
            cut), ``results.json`` and ``results.md``.
        overrides: Dotted config overrides on top of ToyWorld's preset.
        seeds_per_scene: Evaluation images per scene (`evaluate_run`).
        probe: The identity probe (default: ToyWorld's).
        device: Overrides the config's device.
        callback: Called as ``callback(prompt, seed, run_entry)`` after each run is scored.

    Returns:
        ``{"settings", "prompts": {prompt: {"vanilla", "runs": {seed: entry}, "summary"}},
        "seconds"}`` (see `summarize_prompt`).
    """
    from consistent_char.eval.methods import BenchmarkStages

    seeds = list(seeds)
    root = Path(out)
    study = _new_study(list(prompts), seeds, dict(overrides or {}), seeds_per_scene, root)
    overrides, previous = study["settings"]["overrides"], root / "results.json"
    stages = BenchmarkStages(device=device)
    scorer = load_probe(probe)
    t0 = time.perf_counter()
    for prompt in prompts:
        entry: dict[str, Any] = {"vanilla": None, "runs": {}}
        study["prompts"][prompt] = entry
        for seed in seeds:
            config = ExtractorConfig.from_overrides({**overrides, "seed": seed}, base=toy_preset())
            run_dir = root / "runs" / slug(prompt, empty="prompt") / f"seed-{seed}"
            evaluation = _finished_evaluation(run_dir, seeds_per_scene) or _run_and_score(
                stages, config, prompt, run_dir, scorer, seeds_per_scene, entry["vanilla"]
            )
            entry["vanilla"] = evaluation["vanilla"]
            entry["runs"][str(seed)] = _run_entry(evaluation)
            entry["summary"] = summarize_prompt(entry)
            study["seconds"] = time.perf_counter() - t0
            write_json_atomic(previous, study)
            write_text_atomic(root / "results.md", markdown_summary(study))
            if callback is not None:
                callback(prompt, seed, entry["runs"][str(seed)])
    return study


def _new_study(
    prompts: list[str],
    seeds: list[int],
    overrides: dict[str, Any],
    seeds_per_scene: int,
    root: Path,
) -> dict[str, Any]:
    """An empty study in `root`, checked before any model loads: prompts and seeds given, the
    overrides valid, and no earlier study there with other settings."""
    if not prompts or not seeds:
        raise ValueError("evaluate_seeds needs at least one prompt and one seed")
    root.mkdir(parents=True, exist_ok=True)
    ExtractorConfig.from_overrides({**overrides, "seed": seeds[0]}, base=toy_preset())
    previous = root / "results.json"
    if previous.is_file():
        saved = json.loads(previous.read_text()).get("settings", {})
        if saved.get("overrides") != overrides or saved.get("seeds_per_scene") != seeds_per_scene:
            raise ValueError(
                f"{root} holds a study with other settings ({saved}); choose another folder"
            )
    settings = {
        "prompts": prompts,
        "seeds": seeds,
        "overrides": overrides,
        "seeds_per_scene": seeds_per_scene,
    }
    return {"settings": settings, "prompts": {}, "seconds": 0.0}


def _run_and_score(
    stages: Any,
    config: ExtractorConfig,
    prompt: str,
    run_dir: Path,
    probe: Any,
    seeds_per_scene: int,
    vanilla: dict[str, Any] | None,
) -> dict[str, Any]:
    """Runs (or resumes) the loop in `run_dir` and scores its identity; `vanilla` is the score
    of the same prompt on the same evaluation images, when an earlier seed drew it."""
    resume = (run_dir / "state.json").is_file()
    stages.extractor(config).extract(prompt, run_dir=run_dir, resume=resume)
    return evaluate_run(
        run_dir,
        seeds_per_scene=seeds_per_scene,
        probe=probe,
        generator=stages.generator(config),
        vanilla=vanilla,
    )


def _finished_evaluation(run_dir: Path, seeds_per_scene: int) -> dict[str, Any] | None:
    path = run_dir / EVALUATION_FILE
    if not path.is_file():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data if data.get("seeds_per_scene") == seeds_per_scene else None


def _run_entry(evaluation: dict[str, Any]) -> dict[str, Any]:
    identity, drift = evaluation["identity"], evaluation.get("drift") or {}
    return {
        "iterations": evaluation["iterations"],
        "converged": evaluation["converged"],
        "identity_consistency": identity["identity_consistency"],
        "prompt_adherence": identity["prompt_adherence"],
        "base_prompt_adherence": identity.get("base_prompt_adherence"),
        "validity": identity.get("validity"),
        "iteration_validity": [m.get("validity") for m in evaluation.get("per_iteration", [])],
        "min_validity": evaluation.get("min_validity"),
        "drift_kept": drift.get("kept"),
        "chosen": drift.get("chosen"),
        "final": drift.get("final"),
    }


def _stat(values: Sequence[float | None], fn: Callable[[Any], Any]) -> float | None:
    present = [v for v in values if v is not None]
    return float(fn(present)) if present else None


def summarize_prompt(entry: dict[str, Any]) -> dict[str, Any]:
    """One prompt over its seeds: means and minima of the scores, the lowest validity of any
    iteration, the seeds whose character was kept (drift kept >= `DRIFT_KEPT`), and the
    distinct final identities (and how many of them wear a hat)."""
    runs = list(entry["runs"].values())
    vanilla = entry.get("vanilla") or {}
    finals = {tuple(r["final"].values()) for r in runs if r.get("final")}
    return {
        "seeds": len(runs),
        "consistency_mean": _stat([r["identity_consistency"] for r in runs], np.mean),
        "consistency_min": _stat([r["identity_consistency"] for r in runs], np.min),
        "adherence_mean": _stat([r["prompt_adherence"] for r in runs], np.mean),
        "adherence_min": _stat([r["prompt_adherence"] for r in runs], np.min),
        "named_kept_mean": _stat([r["base_prompt_adherence"] for r in runs], np.mean),
        "named_kept_min": _stat([r["base_prompt_adherence"] for r in runs], np.min),
        "vanilla_named_kept": vanilla.get("base_prompt_adherence"),
        "vanilla_consistency": vanilla.get("identity_consistency"),
        "min_validity": _stat([r["min_validity"] for r in runs], np.min),
        "drift_kept_seeds": sum(
            1 for r in runs if r.get("drift_kept") is not None and r["drift_kept"] >= DRIFT_KEPT
        ),
        "distinct_identities": len(finals),
        "identities_with_hat": sum(1 for f in finals if f[2] != "none"),
        "converged": sum(1 for r in runs if r["converged"]),
    }


def _f(value: Any, digits: int = 3) -> str:
    return (
        "–" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)
    )


def markdown_summary(study: dict[str, Any]) -> str:
    """The study as Markdown: one summary row per prompt, then one row per run."""
    settings = study["settings"]
    lines = [
        "# The loop over seeds (ToyWorld)",
        "",
        f"Seeds {settings['seeds']}; overrides {settings['overrides'] or 'none'}; each identity "
        f"drawn in 5 scenes × {settings['seeds_per_scene']} seeds. "
        f"{_f(study.get('seconds'), 0)} s in all.",
        "",
        "| prompt | seeds | consistency mean / min | adherence mean / min | named kept mean / "
        "min (plain prompt) | lowest validity | drift kept ≥ 0.8 | identities (with hat) "
        "| converged |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for prompt, entry in study["prompts"].items():
        s = entry.get("summary")
        if not s:
            continue
        lines.append(
            f"| {prompt} | {s['seeds']} | {_f(s['consistency_mean'])} / "
            f"{_f(s['consistency_min'])} | {_f(s['adherence_mean'])} / {_f(s['adherence_min'])} "
            f"| {_f(s['named_kept_mean'])} / {_f(s['named_kept_min'])} "
            f"({_f(s['vanilla_named_kept'])}) | {_f(s['min_validity'])} "
            f"| {s['drift_kept_seeds']} of {s['seeds']} | {s['distinct_identities']} "
            f"({s['identities_with_hat']}) | {s['converged']} of {s['seeds']} |"
        )
    lines += [
        "",
        "| prompt | seed | iterations | consistency | adherence | named kept | validity per "
        "iteration | drift kept | chosen at iteration 0 | final identity |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for prompt, entry in study["prompts"].items():
        for seed, r in entry["runs"].items():
            validity = ", ".join(_f(v, 2) for v in r["iteration_validity"])
            chosen = " ".join(r["chosen"].values()) if r.get("chosen") else "–"
            final = " ".join(r["final"].values()) if r.get("final") else "–"
            ended = "" if r["converged"] else " (not converged)"
            lines.append(
                f"| {prompt} | {seed} | {r['iterations']}{ended} "
                f"| {_f(r['identity_consistency'])} | {_f(r['prompt_adherence'])} "
                f"| {_f(r['base_prompt_adherence'])} | {validity} | {_f(r['drift_kept'])} "
                f"| {chosen} | {final} |"
            )
    lines += [
        "",
        "Consistency: pairs of images in different scenes whose five identity attributes agree. "
        "Adherence: images in the scene asked for. Named kept: images that keep the identity "
        "attributes the prompt names (– when it names none). Validity: images the probe takes "
        "for ToyWorld images. Drift kept: identity attributes on which the final identity's "
        "images agree with the cluster chosen at iteration 0.",
        "",
    ]
    return "\n".join(lines)
