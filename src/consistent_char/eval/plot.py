"""The paper's comparison figure, drawn with PIL alone: identity consistency (y) against prompt
adherence (x), one colour per method, its mean large and each prompt small.

Example:
    >>> image = scatter_plot([{"label": "loop", "x": 0.9, "y": 0.8, "per_prompt": []}])
    >>> image.size
    (1000, 640)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw, ImageFont

__all__ = ["PALETTE", "scatter_plot"]

#: Colour-blind-safe (Okabe–Ito) colours, one per method in order.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 114, 178),
    (230, 159, 0),
    (0, 158, 115),
    (204, 121, 167),
    (86, 180, 233),
    (213, 94, 0),
    (240, 228, 66),
    (0, 0, 0),
)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def scatter_plot(
    points: Sequence[dict[str, Any]],
    *,
    title: str = "",
    size: tuple[int, int] = (1000, 640),
    x_label: str = "prompt adherence",
    y_label: str = "identity consistency",
) -> Image.Image:
    """Draws the points on [0, 1] × [0, 1] axes with a legend.

    Args:
        points: ``{"label", "x", "y", "per_prompt": [(x, y), ...]}`` per method.
        title: Drawn above the axes.
        size: Image size in pixels.
        x_label: Horizontal axis label.
        y_label: Vertical axis label.
    """
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    # Plot area: room on the left for the y label and ticks, on the right for the legend.
    frame = _Frame(80, 50, width - 340, height - 70)
    _axes(image, frame, title, x_label, y_label)

    # Per-prompt points (small, hollow), then the means (large, filled) on top
    for i, p in enumerate(points):
        colour = PALETTE[i % len(PALETTE)]
        for px, py in p.get("per_prompt", []):
            if px is None or py is None:
                continue
            x, y = frame.to_px(float(px), float(py))
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], outline=colour, width=2)
    for i, p in enumerate(points):
        colour = PALETTE[i % len(PALETTE)]
        x, y = frame.to_px(float(p["x"]), float(p["y"]))
        draw.ellipse([x - 9, y - 9, x + 9, y + 9], fill=colour, outline="black")
    _legend(draw, frame, points, x_label, y_label)
    return image


@dataclass(frozen=True)
class _Frame:
    """The plot area in pixels."""

    left: int
    top: int
    right: int
    bottom: int
    #: Points at 0 or 1 stay whole inside the frame.
    pad: int = 12

    def to_px(self, x: float, y: float) -> tuple[float, float]:
        """Pixel position of the point ``(x, y)`` of [0, 1] × [0, 1]."""
        return (
            self.left + self.pad + x * (self.right - self.left - 2 * self.pad),
            self.bottom - self.pad - y * (self.bottom - self.top - 2 * self.pad),
        )


def _axes(image: Image.Image, frame: _Frame, title: str, x_label: str, y_label: str) -> None:
    """Grid, ticks every 0.2, the frame, the axis labels (the y label turned) and the title."""
    draw = ImageDraw.Draw(image)
    small, normal = _font(13), _font(16)
    left, top, right, bottom = frame.left, frame.top, frame.right, frame.bottom
    for k in range(11):
        v = k / 10
        x, _ = frame.to_px(v, 0)
        _, y = frame.to_px(0, v)
        grid = (225, 225, 225) if k % 2 else (200, 200, 200)
        draw.line([(x, top), (x, bottom)], fill=grid)
        draw.line([(left, y), (right, y)], fill=grid)
        if k % 2 == 0:
            draw.text((x, bottom + 6), f"{v:.1f}", fill="black", font=small, anchor="mt")
            draw.text((left - 8, y), f"{v:.1f}", fill="black", font=small, anchor="rm")
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text(((left + right) / 2, bottom + 30), x_label, fill="black", font=normal, anchor="mt")
    label = Image.new("RGBA", (bottom - top, 24), (255, 255, 255, 0))
    ImageDraw.Draw(label).text(
        ((bottom - top) / 2, 12), y_label, fill="black", font=normal, anchor="mm"
    )
    rotated = label.rotate(90, expand=True)
    image.paste(rotated, (18, top), rotated)
    if title:
        draw.text(((left + right) / 2, 18), title, fill="black", font=normal, anchor="mt")


def _legend(
    draw: ImageDraw.ImageDraw,
    frame: _Frame,
    points: Sequence[dict[str, Any]],
    x_label: str,
    y_label: str,
) -> None:
    """Right of the plot: what the marks mean, then each method's colour and mean."""
    small = _font(13)
    lx, ly = frame.right + 20, frame.top
    draw.text((lx, ly), "mean (filled), per prompt (ring)", fill="black", font=small)
    draw.text((lx, ly + 16), f"({x_label}, {y_label})", fill="black", font=small)
    for i, p in enumerate(points):
        colour = PALETTE[i % len(PALETTE)]
        y = ly + 44 + 26 * i
        draw.ellipse([lx, y, lx + 16, y + 16], fill=colour, outline="black")
        text = f"{p['label']}  ({float(p['x']):.2f}, {float(p['y']):.2f})"
        draw.text((lx + 24, y + 8), text, fill="black", font=small, anchor="lm")
