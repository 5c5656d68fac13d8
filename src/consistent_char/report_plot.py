"""The report's inline SVG plot of the spread per iteration, and the report's colours."""

from __future__ import annotations

import colorsys
import html
import math
from collections.abc import Sequence
from typing import Any

__all__ = ["STAGE_COLOURS", "cluster_colour", "escape", "fmt", "spread_plot"]

# Tableau-10: distinguishable on screen and in print; more clusters cycle through hues.
_PALETTE = (
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
    "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac",
)  # fmt: skip
STAGE_COLOURS = {"generate": "#4e79a7", "embed": "#f28e2b", "cluster": "#59a14f",
                 "refine": "#e15759"}  # fmt: skip


def cluster_colour(index: int) -> str:
    """The colour of cluster `index` in the report (hex RGB)."""
    if index < len(_PALETTE):
        return _PALETTE[index]
    hue = (index * 0.618033988749895) % 1.0  # golden-ratio steps spread hues evenly
    r, g, b = _hsv_to_rgb(hue, 0.55, 0.85)
    return f"#{r:02x}{g:02x}{b:02x}"


def escape(text: str) -> str:
    """`text` escaped for HTML text and attribute values."""
    return html.escape(text, quote=True)


def fmt(value: float) -> str:
    """A number in three significant digits."""
    return f"{value:.3g}"


def spread_plot(points: Sequence[tuple[int, float, float | None]], conv: dict[str, Any]) -> str:
    """An SVG plot of the spread per iteration against the convergence threshold.

    Args:
        points: ``(iteration, spread, threshold or None)`` per measured iteration, at least one.
        conv: The run config's ``convergence`` section (names the threshold in the legend).
    """
    w, h = 640, 260
    left, right, top, bottom = 56, 150, 16, 40
    pw, ph = w - left - right, h - top - bottom
    xs = [p[0] for p in points]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    values = [p[1] for p in points] + [p[2] for p in points if p[2] is not None]
    y1 = _nice_ceiling(max(values) * 1.05 if max(values) > 0 else 1.0)

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + ph - (y / y1) * ph

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
        f'viewBox="0 0 {w} {h}" role="img" aria-label="spread per iteration">',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fcfcfc" stroke="#ccc"/>',
    ]
    for k in range(5):  # y grid and labels
        v = y1 * k / 4
        y = sy(v)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{fmt(v)}</text>')
    step = max(1, math.ceil((x1 - x0) / 10))
    for x in range(x0, x1 + 1, step):
        out.append(f'<text x="{sx(x):.1f}" y="{top + ph + 16}" text-anchor="middle">{x}</text>')
    out.append(f'<text x="{left + pw / 2:.1f}" y="{h - 6}" text-anchor="middle">iteration</text>')
    thresholds = [(x, t) for x, _, t in points if t is not None]
    if thresholds:
        if len(thresholds) == 1:  # a single point still needs a visible line
            thresholds = [(x0, thresholds[0][1]), (x1, thresholds[0][1])]
        line = " ".join(f"{sx(x):.1f},{sy(t):.1f}" for x, t in thresholds)
        out.append(
            f'<polyline points="{line}" fill="none" stroke="#e15759" stroke-width="2" '
            'stroke-dasharray="6 4"/>'
        )
    line = " ".join(f"{sx(x):.1f},{sy(s):.1f}" for x, s, _ in points)
    out.append(f'<polyline points="{line}" fill="none" stroke="#4e79a7" stroke-width="2.5"/>')
    for x, s, t in points:
        below = t is not None and s < t
        fill = "#59a14f" if below else "#4e79a7"
        out.append(
            f'<circle cx="{sx(x):.1f}" cy="{sy(s):.1f}" r="4" fill="{fill}">'
            f"<title>iteration {x}: spread {s:.4f}"
            + (f", threshold {t:.4f}" if t is not None else "")
            + "</title></circle>"
        )
    out += _legend(left + pw + 12, top, conv) + ["</svg>"]
    return "\n".join(out)


def _legend(lx: float, top: float, conv: dict[str, Any]) -> list[str]:
    """The plot's legend, naming the threshold the run converges against."""
    label = (
        f"d_conv = {conv['d_conv']}"
        if conv.get("d_conv") is not None
        else (
            f"{conv['d_conv_relative']} × first spread"
            if conv.get("d_conv_relative") is not None
            else "threshold"
        )
    )
    return [
        f'<line x1="{lx}" y1="{top + 10}" x2="{lx + 24}" y2="{top + 10}" stroke="#4e79a7" '
        'stroke-width="2.5"/>',
        f'<text x="{lx + 30}" y="{top + 14}">spread</text>',
        f'<line x1="{lx}" y1="{top + 30}" x2="{lx + 24}" y2="{top + 30}" stroke="#e15759" '
        'stroke-width="2" stroke-dasharray="6 4"/>',
        f'<text x="{lx + 30}" y="{top + 34}">threshold</text>',
        f'<text x="{lx}" y="{top + 52}" class="muted">({escape(label)})</text>',
    ]


def _nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 × 10^k that is at least `value` (round axis ends)."""
    exponent = math.floor(math.log10(value))
    for m in (1.0, 2.0, 2.5, 5.0, 10.0):
        if m * 10**exponent >= value:
            return m * 10**exponent
    return 10.0 ** (exponent + 1)


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h, s, v)
    return int(r * 255), int(g * 255), int(b * 255)
