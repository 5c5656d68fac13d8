"""`build_report`: one self-contained ``report.html`` that shows what a run did.

For every iteration: the generated images grouped by cluster (each cluster has a colour, the chosen
cluster is drawn first with a thick border and a star), and a table of the clusters' sizes and
cohesions; for the run: the spread per iteration against the convergence threshold (an inline SVG
plot), the time each stage took per iteration, and sample images of the final identity when the
run directory has any (``samples/`` or ``identity/samples/``, e.g. written by
`consistent_char.story.illustrate`); and, once the run has been evaluated on ToyWorld
(``evaluation.json``, written by `consistent_char.eval.evaluate_run`), the validity of each
iteration's images and the drift from the character chosen at iteration 0.

The page has no scripts, no style sheets or fonts from the network: thumbnails are embedded as
base64 data (each linking to its full-size PNG by a relative path), so the file can be mailed or
opened from anywhere. The report reads only what the run directory holds, so it can be rebuilt at
any time (``consistent-char report RUN_DIR``), also for a run that was cut short.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from consistent_char.convergence import final_stop_reason
from consistent_char.interfaces import IterationRecord
from consistent_char.report_plot import STAGE_COLOURS, cluster_colour, spread_plot
from consistent_char.report_plot import escape as _e
from consistent_char.rundir import RunDirectory, write_text_atomic

__all__ = ["REPORT_FILE", "SAMPLES_DIR", "build_report"]

logger = logging.getLogger(__name__)

REPORT_FILE = "report.html"
#: A ToyWorld evaluation of the run (`consistent_char.eval.run.EVALUATION_FILE`).
EVALUATION_FILE = "evaluation.json"
#: Sample images of the final identity, relative to the run directory (PNG files, optionally a
#: ``story.json`` with their prompts as written by `consistent_char.story.illustrate`).
SAMPLES_DIR = "samples"
STAGES = ("generate", "embed", "cluster", "refine")


def build_report(
    run_dir: str | os.PathLike[str],
    *,
    thumbnail_size: int = 128,
    max_images_per_iteration: int | None = None,
) -> Path:
    """Writes ``report.html`` into a run directory and returns its path.

    Args:
        run_dir: A run directory written by `IterativeIdentityExtractor.extract`.
        thumbnail_size: Longest side, in pixels, of the embedded thumbnails.
        max_images_per_iteration: Show at most this many images per iteration (all by default);
            the cluster table always counts all of them.

    Returns:
        The path of the written report.

    Raises:
        FileNotFoundError: `run_dir` holds no run (no ``state.json``).

    Example:
        >>> from consistent_char.report import build_report
        >>> path = build_report("runs/demo")  # doctest: +SKIP
        >>> path.name  # doctest: +SKIP
        'report.html'
    """
    run = RunDirectory(run_dir)
    if not run.exists():
        raise FileNotFoundError(f"{run.root} is not a run directory: no state.json in it")
    data = _read_run(run)
    page = _render(run, data, thumbnail_size, max_images_per_iteration)
    path = run.root / REPORT_FILE
    write_text_atomic(path, page)
    logger.info("wrote %s", path)
    return path


# ---------------------------------------------------------------------------------------- reading


@dataclass
class _Iteration:
    index: int
    record: dict[str, Any]
    images: list[Path]
    clusters: dict[str, Any] | None


@dataclass
class _Run:
    state: dict[str, Any]
    config: dict[str, Any]
    identity: dict[str, Any] | None
    iterations: list[_Iteration] = field(default_factory=list)
    samples: list[tuple[Path, str]] = field(default_factory=list)
    evaluation: dict[str, Any] | None = None


def _read_run(run: RunDirectory) -> _Run:
    state = json.loads(run.state_path.read_text())
    config: dict[str, Any] = {}
    if run.config_path.is_file():
        config = yaml.safe_load(run.config_path.read_text()) or {}
    identity = None
    info = run.identity_dir / "identity.json"
    if info.is_file():
        identity = json.loads(info.read_text())
    records = {int(r["iteration"]): r for r in state.get("history", [])}
    # Iterations on disk beyond the history (a cut run) are shown with what they have.
    on_disk = {
        int(p.name[5:])
        for p in run.root.glob("iter_[0-9][0-9][0-9]")
        if p.is_dir() and p.name[5:].isdigit()
    }
    iterations = []
    for i in sorted(set(records) | on_disk):
        images = sorted((run.iter_dir(i) / "images").glob("*.png"))
        clusters_path = run.iter_dir(i) / "clusters.json"
        clusters = json.loads(clusters_path.read_text()) if clusters_path.is_file() else None
        iterations.append(_Iteration(i, records.get(i, {"iteration": i}), images, clusters))
    evaluation = None
    path = run.root / EVALUATION_FILE
    if path.is_file():
        try:
            evaluation = json.loads(path.read_text())
        except ValueError:
            logger.warning("ignoring malformed %s", path)
    return _Run(state, config, identity, iterations, _find_samples(run.root), evaluation)


def _find_samples(root: Path) -> list[tuple[Path, str]]:
    out: list[tuple[Path, str]] = []
    for folder in (root / SAMPLES_DIR, root / "identity" / "samples"):
        if not folder.is_dir():
            continue
        captions: dict[str, str] = {}
        story = folder / "story.json"
        if story.is_file():
            try:
                for item in json.loads(story.read_text()).get("images", []):
                    captions[str(item["file"])] = str(item.get("prompt", ""))
            except (ValueError, KeyError, TypeError, AttributeError):
                logger.warning("ignoring malformed %s", story)
        for path in sorted(folder.glob("*.png")):
            if path.name != "contact_sheet.png":
                out.append((path, captions.get(path.name, "")))
    return out


# ------------------------------------------------------------------------------------- rendering


_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto;
       max-width: 1160px; padding: 0 16px; color: #222; background: #fff; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; margin-top: 32px; }
h3 { font-size: 15px; margin: 16px 0 6px; }
.muted { color: #666; } code { background: #f3f3f3; padding: 0 3px; border-radius: 3px; }
table { border-collapse: collapse; margin: 8px 0; } td, th { padding: 3px 10px;
        border-bottom: 1px solid #e4e4e4; text-align: right; } th { background: #fafafa; }
td.l, th.l { text-align: left; }
.swatch { display: inline-block; width: 12px; height: 12px; border-radius: 2px;
          vertical-align: -1px; }
.chosen-row { background: #fff7d6; font-weight: 600; }
.grid { display: flex; flex-wrap: wrap; gap: 4px; margin: 4px 0 10px; }
.grid a { display: block; line-height: 0; }
.grid img { width: 84px; height: 84px; object-fit: cover; border: 3px solid #ccc;
            border-radius: 3px; image-rendering: auto; }
.grid img.tiny { image-rendering: pixelated; }
.grid.chosen img { border-width: 5px; box-shadow: 0 0 0 2px #222; }
.group { margin-bottom: 6px; } .group-label { font-size: 13px; }
.samples { display: flex; flex-wrap: wrap; gap: 12px; }
.samples figure { margin: 0; width: 200px; } .samples img { width: 200px; border-radius: 4px; }
.samples figcaption { font-size: 12px; color: #444; }
.bar { display: flex; height: 12px; min-width: 2px; } .bar span { display: block; height: 12px; }
.badge { display: inline-block; padding: 1px 6px; border-radius: 9px; font-size: 12px;
         background: #e8f3e8; color: #245b24; } .badge.warn { background: #fdecea; color: #8a1c12; }
svg text { font: 11px system-ui, sans-serif; fill: #333; }
"""


def _render(run: RunDirectory, data: _Run, thumb: int, max_images: int | None) -> str:
    state, cfg = data.state, data.config
    prompt = str(state.get("prompt", ""))
    token = (data.identity or {}).get("token") or (cfg.get("refiner") or {}).get("token", "")
    finished = bool(state.get("finished"))
    converged = bool(state.get("converged"))
    if converged:
        status = '<span class="badge">converged</span>'
    elif finished:
        conv = cfg.get("convergence") or {}
        history = [IterationRecord.from_dict(r) for r in state.get("history") or []]
        why = final_stop_reason(history, conv.get("patience"), conv.get("max_saturation_rise"))
        status = f'<span class="badge warn">stopped: {html.escape(why)}</span>'
    else:
        status = '<span class="badge warn">unfinished</span>'
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>consistent_char run: {_e(prompt)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{_e(prompt)}</h1>",
        f'<p class="muted">run <code>{_e(str(run.root))}</code> · model '
        f"<code>{_e(str(cfg.get('model', '?')))}</code> · token <code>{_e(str(token))}</code>"
        f" · {len(data.iterations)} iteration(s) {status}</p>",
        _settings(cfg),
        "<h2>Spread per iteration</h2>",
        '<p class="muted">Mean pairwise distance of the iteration\'s image embeddings; the run '
        "stops when it falls below the threshold.</p>",
        _spread_section(data.iterations, cfg),
        "<h2>Time per stage</h2>",
        _times_table(data.iterations),
    ]
    if data.evaluation is not None:
        parts.append(_evaluation(data.evaluation))
    if data.samples:
        parts += ["<h2>Final identity: samples</h2>", _samples(run.root, data.samples)]
    d_min_c = cfg.get("d_min_c")
    for it in reversed(data.iterations):  # newest first: the end of the run matters most
        parts.append(_iteration_section(run.root, it, d_min_c, thumb, max_images))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _settings(cfg: dict[str, Any]) -> str:
    if not cfg:
        return ""
    conv = cfg.get("convergence") or {}
    threshold = (
        f"d_conv = {conv['d_conv']}"
        if conv.get("d_conv") is not None
        else f"{conv.get('d_conv_relative')} × the first spread"
    )
    items = [
        ("N (images per iteration)", cfg.get("num_images")),
        ("d_size_c", cfg.get("d_size_c")),
        ("d_min_c", cfg.get("d_min_c")),
        ("max_iterations", cfg.get("max_iterations")),
        ("convergence threshold", threshold),
        ("embedder", (cfg.get("embedder") or {}).get("kind")),
        ("refiner", (cfg.get("refiner") or {}).get("mode")),
        ("refiner steps", (cfg.get("refiner") or {}).get("steps")),
        ("seed", cfg.get("seed")),
    ]
    cells = "".join(
        f'<tr><th class="l">{_e(k)}</th><td class="l">{_e(str(v))}</td></tr>'
        for k, v in items
        if v is not None
    )
    return f"<details><summary>Settings</summary><table>{cells}</table></details>"


def _spread_section(iterations: Sequence[_Iteration], cfg: dict[str, Any]) -> str:
    points = [
        (it.index, float(it.record["spread"]), _opt_float(it.record.get("threshold")))
        for it in iterations
        if it.record.get("spread") is not None
    ]
    if not points:
        return '<p class="muted">No iteration has been measured yet.</p>'
    return spread_plot(points, cfg.get("convergence") or {})


def _times_table(iterations: Sequence[_Iteration]) -> str:
    rows = []
    totals = dict.fromkeys(STAGES, 0.0)
    longest = max(
        (sum(float(v) for v in (it.record.get("seconds") or {}).values()) for it in iterations),
        default=0.0,
    )
    for it in iterations:
        seconds = {k: float(v) for k, v in (it.record.get("seconds") or {}).items()}
        total = sum(seconds.values())
        for k in STAGES:
            totals[k] += seconds.get(k, 0.0)
        cells = "".join(f"<td>{_seconds(seconds[k]) if k in seconds else '–'}</td>" for k in STAGES)
        bar = "".join(
            f'<span style="width:{160 * seconds.get(k, 0.0) / longest:.1f}px;'
            f'background:{STAGE_COLOURS[k]}" title="{k}"></span>'
            for k in STAGES
            if longest > 0
        )
        rows.append(
            f"<tr><td>{it.index}</td>{cells}<td>{_seconds(total)}</td>"
            f'<td class="l"><div class="bar">{bar}</div></td></tr>'
        )
    head = "".join(
        f'<th><span class="swatch" style="background:{STAGE_COLOURS[k]}"></span> {k}</th>'
        for k in STAGES
    )
    foot = "".join(f"<td>{_seconds(totals[k])}</td>" for k in STAGES)
    return (
        f'<table><tr><th>iteration</th>{head}<th>total</th><th class="l"></th></tr>'
        + "".join(rows)
        + f"<tr><th>all</th>{foot}<td>{_seconds(sum(totals.values()))}</td><td></td></tr>"
        + "</table>"
    )


def _evaluation(ev: dict[str, Any]) -> str:
    """The ToyWorld evaluation: scores, drift, and what each iteration kept."""

    def num(value: Any) -> str:
        return "–" if value is None else f"{float(value):.3f}"

    def ident(value: Any) -> str:
        return "–" if not value else _e(" ".join(str(v) for v in value.values()))

    identity, vanilla = ev.get("identity") or {}, ev.get("vanilla") or {}
    drift = ev.get("drift") or {}
    out = [
        "<h2>ToyWorld evaluation</h2>",
        '<p class="muted">Read by the identity probe (never used by the loop). Identity '
        "consistency: pairs of images in different scenes with all five identity attributes "
        "equal. Validity: images the probe takes for ToyWorld images.</p>",
        '<table><tr><th class="l"></th><th>identity consistency</th><th>prompt adherence</th>'
        "<th>validity</th></tr>",
    ]
    for name, score in (("with the identity", identity), ("prompt alone", vanilla)):
        out.append(
            f'<tr><td class="l">{name}</td><td>{num(score.get("identity_consistency"))}</td>'
            f"<td>{num(score.get('prompt_adherence'))}</td><td>{num(score.get('validity'))}</td></tr>"
        )
    out.append("</table>")
    out.append(
        f"<p>Drift: chosen at iteration 0 <code>{ident(drift.get('chosen'))}</code>, final "
        f"identity <code>{ident(drift.get('final'))}</code>, kept "
        f"<b>{num(drift.get('kept'))}</b> of the identity attributes.</p>"
    )
    rows = []
    for m in ev.get("per_iteration") or []:
        agreement = m.get("agreement") or {}
        scenes = m.get("scenes") or {}
        top_scene = max(scenes, key=lambda k: scenes[k]) if scenes else ""
        cells = "".join(f"<td>{num(agreement.get(a))}</td>" for a in _IDENTITY)
        rows.append(
            f"<tr><td>{m.get('iteration')}</td><td>{num(m.get('validity'))}</td>"
            f"<td>{num(m.get('confident'))}</td><td>{num(m.get('identity_share'))}</td>{cells}"
            f'<td class="l">{ident(m.get("modal"))}</td>'
            f'<td class="l">{_e(top_scene)} {num(scenes.get(top_scene))}</td></tr>'
        )
    head = "".join(f"<th>{a}</th>" for a in _IDENTITY)
    out.append(
        "<h3>Per iteration</h3>"
        '<p class="muted">Confident: every identity attribute read with probability ≥ 0.9. '
        "Character and the attribute columns: the fraction of the iteration's images that "
        "match the character chosen at iteration 0.</p>"
        "<table><tr><th>iteration</th><th>validity</th><th>confident</th><th>character</th>"
        f'{head}<th class="l">modal identity</th><th class="l">most common scene</th></tr>'
        + "".join(rows)
        + "</table>"
    )
    return "\n".join(out)


_IDENTITY = ("shape", "color", "hat", "hat_color", "eyes")


def _samples(root: Path, samples: Sequence[tuple[Path, str]]) -> str:
    figures = []
    for path, caption in samples:
        src = _thumbnail(path, 400)
        figures.append(
            f'<figure><a href="{_e(_rel(path, root))}"><img src="{src}" alt="{_e(caption)}">'
            f"</a><figcaption>{_e(caption)}</figcaption></figure>"
        )
    return f'<div class="samples">{"".join(figures)}</div>'


def _iteration_section(
    root: Path, it: _Iteration, d_min_c: int | None, thumb: int, max_images: int | None
) -> str:
    parts = [f'<section id="iter-{it.index}"><h2>Iteration {it.index}</h2>']
    parts += _iteration_facts(it.record)

    labels: list[int] | None = None
    chosen: int | None = None
    if it.clusters is not None:
        labels = [int(v) for v in it.clusters.get("labels", [])]
        chosen = it.clusters.get("chosen")
        sizes = [int(v) for v in it.clusters.get("sizes", [])]
        # JSON has no NaN: an empty cluster's cohesion (or one too small for a core) is null.
        cohesions = [math.nan if v is None else float(v) for v in it.clusters.get("cohesions", [])]
        parts.append(_cluster_table(sizes, cohesions, chosen, d_min_c))
        core = it.clusters.get("core")
        if core is not None:
            parts.append(
                f"<p>Learned from the chosen cluster's densest {len(core)} images (its core, "
                "`core_size`); the cohesion column is each cluster's core tightness.</p>"
            )
    if labels is not None and len(labels) != len(it.images):
        labels = None  # images of a cut generation step: show them without clusters

    shown = it.images if max_images is None else it.images[:max_images]
    if not shown:
        parts.append('<p class="muted">No images on disk for this iteration.</p>')
    elif labels is None:
        parts.append(_grid(root, shown, None, False, thumb))
    else:
        groups: dict[int, list[Path]] = {}
        for path, label in zip(it.images, labels, strict=True):
            if path in shown:
                groups.setdefault(label, []).append(path)
        order = sorted(groups, key=lambda c: (c != chosen, c))
        for c in order:
            mark = " ★ chosen" if c == chosen else ""
            parts.append(
                f'<div class="group"><div class="group-label"><span class="swatch" '
                f'style="background:{cluster_colour(c)}"></span> cluster {c}{mark} '
                f"({len(groups[c])} image(s))</div>"
                + _grid(root, groups[c], c, c == chosen, thumb)
                + "</div>"
            )
    if len(shown) < len(it.images):
        parts.append(f'<p class="muted">{len(it.images) - len(shown)} more image(s) not shown.</p>')
    parts.append("</section>")
    return "\n".join(parts)


def _iteration_facts(r: dict[str, Any]) -> list[str]:
    """The iteration's prompt, spread, threshold, and whether it stopped or fell back."""
    facts = []
    if r.get("spread") is not None:
        facts.append(f"spread {float(r['spread']):.4f}")
    if r.get("threshold") is not None:
        facts.append(f"threshold {float(r['threshold']):.4f}")
    if r.get("converged"):
        facts.append('<span class="badge">converged: stopped here</span>')
    if r.get("chosen_reason") == "largest_fallback":
        facts.append('<span class="badge warn">no cluster reached d_min_c: took the largest</span>')
    parts = []
    if r.get("prompt"):
        parts.append(f"<p>prompt <code>{_e(str(r['prompt']))}</code></p>")
    if facts:
        parts.append(f"<p>{' · '.join(facts)}</p>")
    return parts


def _cluster_table(
    sizes: Sequence[int], cohesions: Sequence[float], chosen: int | None, d_min_c: int | None
) -> str:
    rows = []
    for c, size in enumerate(sizes):
        cohesion = f"{cohesions[c]:.4f}" if c < len(cohesions) and _finite(cohesions[c]) else "–"
        kept = "–" if d_min_c is None else ("yes" if size >= int(d_min_c) else "no")
        cls = ' class="chosen-row"' if c == chosen else ""
        rows.append(
            f'<tr{cls}><td class="l"><span class="swatch" style="background:'
            f'{cluster_colour(c)}"></span> {c}{" ★" if c == chosen else ""}</td>'
            f"<td>{size}</td><td>{cohesion}</td><td>{kept}</td></tr>"
        )
    return (
        '<table><tr><th class="l">cluster</th><th>size</th>'
        '<th title="mean distance to the centroid: smaller is more cohesive">cohesion</th>'
        f"<th>kept (size ≥ d_min_c)</th></tr>{''.join(rows)}</table>"
    )


def _grid(root: Path, paths: Sequence[Path], cluster: int | None, chosen: bool, thumb: int) -> str:
    colour = cluster_colour(cluster) if cluster is not None else "#ccc"
    cells = []
    for path in paths:
        src = _thumbnail(path, thumb)
        tiny = ' class="tiny"' if _is_tiny(path, thumb) else ""
        cells.append(
            f'<a href="{_e(_rel(path, root))}"><img{tiny} src="{src}" alt="{_e(path.name)}" '
            f'title="{_e(path.name)}" style="border-color:{colour}"></a>'
        )
    return f'<div class="grid{" chosen" if chosen else ""}">{"".join(cells)}</div>'


# --------------------------------------------------------------------------------------- helpers


def _thumbnail(path: Path, size: int) -> str:
    """A data URI of the image scaled to fit `size` (PNG for small images, else JPEG)."""
    try:
        with Image.open(path) as opened:
            im = opened.convert("RGB")
        buf = io.BytesIO()
        if max(im.size) > size:
            im.thumbnail((size, size), Image.Resampling.LANCZOS)
            im.save(buf, format="JPEG", quality=85)
            mime = "image/jpeg"
        else:
            im.save(buf, format="PNG")
            mime = "image/png"
    except OSError as err:
        logger.warning("cannot read %s: %s", path, err)
        return _BLANK_PNG
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


# A 1×1 grey PNG for unreadable images, so the page never has a broken image.
_BLANK_PNG = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGO4"
    "BwAAxQDEH1RzdgAAAABJRU5ErkJggg=="
)


def _is_tiny(path: Path, size: int) -> bool:
    try:
        with Image.open(path) as im:
            return max(im.size) < size // 2
    except OSError:
        return False


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _opt_float(value: Any) -> float | None:
    return float(value) if value is not None and _finite(float(value)) else None


def _finite(value: float) -> bool:
    return math.isfinite(value)


def _seconds(value: float) -> str:
    if value >= 120:
        return f"{value / 60:.1f} min"
    return f"{value:.2f} s" if value < 10 else f"{value:.1f} s"
