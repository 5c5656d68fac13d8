"""The benchmark's outputs: ``results.json`` (schema below), ``results.md`` and ``scatter.png``.

``results.json`` (``schema_version`` 1)::

    {
      "schema_version": 1,
      "benchmark": "toyworld",
      "preset": "full" | "quick" | "minimal" | "custom",
      "reduced": ["what differs from the full benchmark", ...],   # [] for full
      "settings": {...},            # ToyBenchmarkSettings: prompts, methods, scenes, seeds, ...
      "config": {...},              # the loop's resolved ExtractorConfig
      "versions": {"consistent_char": ..., "torch": ..., ...},
      "machine": {"platform", "processor", "cpu_count", "torch_threads", "cuda"},
      "started": "2026-01-01T00:00:00+0000",
      "seconds_total": float,
      "methods": {
        "<method>": {
          "label": "loop (full)",
          "prompts": {"<prompt>": ENTRY, ...},
          "mean": MEAN
        }, ...
      },
      "ablations": {
        "<group>": {                # embedder, K, d_min_c, template, refiner
          "baseline": "<label of the plain loop>",
          "variants": {"<label>": {"overrides": {...}, "prompts": {...}, "mean": MEAN}, ...}
        }, ...
      }
    }

    ENTRY = {"identity_consistency", "prompt_adherence", "base_prompt_adherence" (null when
             the prompt names no identity attribute), "attribute_agreement": {attribute: float},
             "distinct_identities", "n_images", "iterations", "converged" (null: no loop),
             "seconds" (making the identity), "eval_seconds" (drawing and scoring it), "token",
             "validity" (of the images drawn to score it), "min_validity" (the lowest over the
             loop's iterations; null: no loop), "drift": {"chosen", "final", "kept",
             "attributes"} (null for vanilla; for a single-image method "chosen" is that
             image's identity)}
    MEAN  = {"identity_consistency", "prompt_adherence", "base_prompt_adherence", "validity",
             "min_validity", "drift_kept", "iterations", "seconds", "n_prompts"}: means over
             the prompts
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from consistent_char.rundir import save_png_atomic, write_json_atomic, write_text_atomic

__all__ = [
    "MARKDOWN_FILE",
    "RESULTS_FILE",
    "SCATTER_FILE",
    "SCHEMA_VERSION",
    "markdown_table",
    "mean_entry",
    "scatter_points",
    "slug",
    "summarize",
    "write_outputs",
]

SCHEMA_VERSION = 1
RESULTS_FILE = "results.json"
MARKDOWN_FILE = "results.md"
SCATTER_FILE = "scatter.png"

_MEAN_KEYS = (
    "identity_consistency",
    "prompt_adherence",
    "base_prompt_adherence",
    "validity",
    "min_validity",
)


def mean_entry(prompts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Means over prompts of the measures, iterations and seconds (``None`` where no prompt has
    a value, e.g. ``base_prompt_adherence`` over prompts that name no attribute)."""
    out: dict[str, Any] = {}
    for key in (*_MEAN_KEYS, "iterations", "seconds"):
        values = [e[key] for e in prompts.values() if e.get(key) is not None]
        out[key] = float(np.mean(values)) if values else None
    kept = [
        e["drift"]["kept"]
        for e in prompts.values()
        if e.get("drift") and e["drift"].get("kept") is not None
    ]
    out["drift_kept"] = float(np.mean(kept)) if kept else None
    out["n_prompts"] = len(prompts)
    return out


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Fills in every ``mean`` of `results` (in place) and returns it."""
    for method in results["methods"].values():
        method["mean"] = mean_entry(method["prompts"])
    for group in results["ablations"].values():
        for variant in group["variants"].values():
            variant["mean"] = mean_entry(variant["prompts"])
    return results


def slug(text: str, *, empty: str = "x") -> str:
    """`text` as a file or folder name: lower-case letters and digits joined by ``-``, at most
    60 characters; `empty` when nothing is left."""
    kept = "".join(c if c.isalnum() else "-" for c in text.lower())
    return "-".join(p for p in kept.split("-") if p)[:60] or empty


def _f(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(results: dict[str, Any]) -> str:
    """The results as Markdown: methods (means), methods by prompt, and ablations."""
    settings = results["settings"]
    scenes, seeds = settings["scenes"], settings["seeds_per_scene"]
    lines = [
        f"# ToyWorld benchmark (preset `{results['preset']}`)",
        "",
        f"Each identity drawn in {len(scenes)} scenes × {seeds} seeds "
        f"({len(scenes) * seeds} images), scored by the identity probe. "
        f"Total time {_f(results.get('seconds_total'), 0)} s, "
        f"{results['machine']['torch_threads']} torch thread(s).",
        "",
    ]
    if results.get("reduced"):
        lines += ["Reduced from the full benchmark:", ""]
        lines += [f"- {r}" for r in results["reduced"]]
        lines.append("")
    lines += _methods_tables(results["methods"], settings["prompts"])
    if results["ablations"]:
        lines += _ablations_table(results["ablations"], settings["ablation_prompts"])
    lines += ["", _TABLE_NOTES, ""]
    return "\n".join(lines)


#: What each column of the tables measures.
_TABLE_NOTES = (
    "Identity consistency: fraction of image pairs drawn in different scenes whose identity "
    "attributes (shape, colour, hat, hat colour, eyes) all agree. Prompt adherence: fraction "
    "of images in the scene asked for. Base-prompt attributes: fraction of images that keep "
    "the identity attributes the vague prompt names (– when it names none). Drift kept: the "
    "fraction of identity attributes on which the final identity's images agree with the "
    "character it was learned from (the cluster chosen at iteration 0, or the single "
    "image). Validity: images the probe takes for ToyWorld images (of the scored images; "
    "the lowest over the loop's iterations). Seconds: making the identity (not scoring it)."
)


def _methods_tables(methods: dict[str, Any], prompts: list[str]) -> list[str]:
    """The methods' means, then each method's two scores by prompt."""
    lines = [
        f"## Methods (mean over {len(prompts)} prompts)",
        "",
        "| method | identity consistency | prompt adherence | base-prompt attributes "
        "| drift kept | validity | lowest validity in the loop | iterations | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in methods.values():
        mean = m.get("mean") or mean_entry(m["prompts"])
        lines.append(
            f"| {m['label']} | {_f(mean['identity_consistency'])} "
            f"| {_f(mean['prompt_adherence'])} | {_f(mean['base_prompt_adherence'])} "
            f"| {_f(mean.get('drift_kept'))} | {_f(mean.get('validity'))} "
            f"| {_f(mean.get('min_validity'))} "
            f"| {_f(mean['iterations'], 1)} | {_f(mean['seconds'], 1)} |"
        )
    lines += [
        "",
        "## By prompt: identity consistency / prompt adherence",
        "",
        "| method | " + " | ".join(prompts) + " |",
        "|---|" + "---|" * len(prompts),
    ]
    for m in methods.values():
        cells = []
        for p in prompts:
            e = m["prompts"].get(p)
            cells.append(
                f"{_f(e['identity_consistency'])} / {_f(e['prompt_adherence'])}" if e else "–"
            )
        lines.append(f"| {m['label']} | " + " | ".join(cells) + " |")
    return lines


def _ablations_table(ablations: dict[str, Any], ablation_prompts: list[str]) -> list[str]:
    """Each ablation variant's means, its group's baseline marked."""
    lines = [
        "",
        f"## Ablations (the full loop, mean over {ablation_prompts})",
        "",
        "| group | variant | identity consistency | prompt adherence | drift kept "
        "| lowest validity | iterations | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for group_name, group in ablations.items():
        for label, v in group["variants"].items():
            mean = v.get("mean") or mean_entry(v["prompts"])
            shown = f"`{label}` (baseline)" if label == group["baseline"] else f"`{label}`"
            lines.append(
                f"| {group_name} | {shown} | {_f(mean['identity_consistency'])} "
                f"| {_f(mean['prompt_adherence'])} | {_f(mean.get('drift_kept'))} "
                f"| {_f(mean.get('min_validity'))} | {_f(mean['iterations'], 1)} "
                f"| {_f(mean['seconds'], 1)} |"
            )
    return lines


def scatter_points(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One point per method: ``{"label", "x": prompt adherence, "y": identity consistency,
    "per_prompt": [(x, y), ...]}``."""
    points = []
    for m in results["methods"].values():
        mean = m.get("mean") or mean_entry(m["prompts"])
        if mean["identity_consistency"] is None:
            continue
        points.append(
            {
                "label": m["label"],
                "x": mean["prompt_adherence"],
                "y": mean["identity_consistency"],
                "per_prompt": [
                    (e["prompt_adherence"], e["identity_consistency"])
                    for e in m["prompts"].values()
                ],
            }
        )
    return points


def write_outputs(results: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Writes ``results.json``, ``results.md`` and ``scatter.png`` into `out_dir`."""
    from consistent_char.eval.plot import scatter_plot

    out = Path(out_dir)
    summarize(results)
    paths = {
        "json": out / RESULTS_FILE,
        "markdown": out / MARKDOWN_FILE,
        "scatter": out / SCATTER_FILE,
    }
    write_json_atomic(paths["json"], results)
    write_text_atomic(paths["markdown"], markdown_table(results))
    title = f"ToyWorld benchmark ({results['preset']}): mean over prompts"
    save_png_atomic(paths["scatter"], scatter_plot(scatter_points(results), title=title))
    return paths
