"""ToyWorld's renderer: cartoon creatures with ground-truth attributes, drawn with PIL.

A creature has **identity attributes** (body shape, body colour, hat, hat colour, eye style) and
sits in a **context** (a background scene, a position and a size). Every image comes with its
`CreatureRecord`, and the record alone determines the image, so `render(record)` is a pure
function and `render_creature(rng)` is deterministic given the generator.

The values are chosen to stay apart at 64×64: saturated colours far from each other and from the
backgrounds, silhouettes that differ in outline, a black outline around body and hat.

Example:
    >>> import numpy as np
    >>> from consistent_char.toy.world import render_creature
    >>> image, record = render_creature(np.random.default_rng(0))
    >>> image.size, record.scene in SCENES
    ((64, 64), True)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = [
    "ATTRIBUTES",
    "COLORS",
    "CONTEXT_ATTRIBUTES",
    "EYES",
    "HATS",
    "HAT_COLORS",
    "IDENTITY_ATTRIBUTES",
    "IMAGE_SIZE",
    "SCENES",
    "SHAPES",
    "CreatureRecord",
    "num_identities",
    "render",
    "render_creature",
    "sample_record",
]

IMAGE_SIZE = 64
# Drawn at 4× and reduced with a box filter: clean anti-aliased edges at 64 px.
_SUPERSAMPLE = 4
_BACKGROUND_VARIANTS = 12

SHAPES: tuple[str, ...] = ("round", "square", "triangle", "diamond", "tall")
COLORS: tuple[str, ...] = ("red", "yellow", "green", "blue", "purple", "pink")
HATS: tuple[str, ...] = ("none", "cap", "crown", "tophat", "wizard")
# "none" is the hat colour of a creature without a hat.
HAT_COLORS: tuple[str, ...] = ("none", *COLORS)
EYES: tuple[str, ...] = ("dots", "big", "sleepy", "cyclops")
SCENES: tuple[str, ...] = ("forest", "beach", "night", "snow", "city")

IDENTITY_ATTRIBUTES: tuple[str, ...] = ("shape", "color", "hat", "hat_color", "eyes")
CONTEXT_ATTRIBUTES: tuple[str, ...] = ("scene",)
#: Every classified attribute and its values, in a fixed order (the probe's class indices).
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": COLORS,
    "hat": HATS,
    "hat_color": HAT_COLORS,
    "eyes": EYES,
    "scene": SCENES,
}

_RGB: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 35),
    "yellow": (250, 215, 20),
    "green": (30, 185, 60),
    "blue": (35, 85, 245),
    "purple": (145, 45, 205),
    "pink": (255, 125, 205),
}
_OUTLINE = (20, 20, 20)

# Body size as a fraction of the image side (width, height) at scale 1.
_BODY_WH: dict[str, tuple[float, float]] = {
    "round": (0.46, 0.46),
    "square": (0.42, 0.42),
    "triangle": (0.52, 0.48),
    "diamond": (0.50, 0.52),
    "tall": (0.30, 0.52),
}
_SCALE_RANGE = (0.88, 1.12)
_X_RANGE = (0.34, 0.66)
_BOTTOM_RANGE = (0.86, 0.94)


def num_identities() -> int:
    """The number of distinct identities (a creature without a hat has no hat colour)."""
    return len(SHAPES) * len(COLORS) * len(EYES) * (1 + (len(HATS) - 1) * len(COLORS))


@dataclass(frozen=True)
class CreatureRecord:
    """The ground truth of one image: it determines the image completely.

    Attributes:
        shape, color, hat, hat_color, eyes: Identity attributes (values in `ATTRIBUTES`);
            ``hat_color`` is ``"none"`` exactly when ``hat`` is ``"none"``.
        scene: The background, one of `SCENES`.
        x: Horizontal centre of the creature, as a fraction of the width.
        bottom: Vertical position of its feet, as a fraction of the height.
        scale: Size multiplier of body and hat.
        background: Which variant of the scene's background is drawn (trees, stars, ...).
    """

    shape: str
    color: str
    hat: str
    hat_color: str
    eyes: str
    scene: str
    x: float = 0.5
    bottom: float = 0.88
    scale: float = 1.0
    background: int = 0

    def __post_init__(self) -> None:
        for name, values in ATTRIBUTES.items():
            value = getattr(self, name)
            if value not in values:
                raise ValueError(f"{name} must be one of {list(values)}, got {value!r}")
        if (self.hat == "none") != (self.hat_color == "none"):
            raise ValueError(
                f"hat_color must be 'none' exactly when hat is 'none', got hat={self.hat!r}, "
                f"hat_color={self.hat_color!r}"
            )

    @property
    def identity(self) -> tuple[str, ...]:
        """The identity attributes as a tuple (equal tuples: the same character)."""
        return tuple(getattr(self, a) for a in IDENTITY_ATTRIBUTES)

    def attributes(self) -> dict[str, str]:
        """Identity and context attributes by name (the probe's targets)."""
        return {a: getattr(self, a) for a in ATTRIBUTES}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CreatureRecord:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def sample_record(rng: np.random.Generator, **fixed: Any) -> CreatureRecord:
    """Draws a uniformly random identity and context; keyword arguments pin attributes.

    Hat types are uniform (a fifth of the creatures have none). Pinning ``hat="none"`` forces
    ``hat_color="none"`` and the reverse; pinning another hat colour draws a hat.
    """
    unknown = set(fixed) - {f.name for f in fields(CreatureRecord)}
    if unknown:
        raise ValueError(f"unknown attributes {sorted(unknown)}; known: {list(ATTRIBUTES)}")
    # Every value is drawn, always in the same order, so pinning one attribute leaves the
    # others' draws unchanged.
    drawn: dict[str, Any] = {
        "shape": SHAPES[int(rng.integers(len(SHAPES)))],
        "color": COLORS[int(rng.integers(len(COLORS)))],
        "hat": HATS[int(rng.integers(len(HATS)))],
        "hat_color": COLORS[int(rng.integers(len(COLORS)))],
        "eyes": EYES[int(rng.integers(len(EYES)))],
        "scene": SCENES[int(rng.integers(len(SCENES)))],
        "x": float(rng.uniform(*_X_RANGE)),
        "bottom": float(rng.uniform(*_BOTTOM_RANGE)),
        "scale": float(rng.uniform(*_SCALE_RANGE)),
        "background": int(rng.integers(_BACKGROUND_VARIANTS)),
    }
    some_hat = HATS[1 + int(rng.integers(len(HATS) - 1))]
    drawn.update(fixed)
    if "hat" not in fixed and fixed.get("hat_color", "none") != "none" and drawn["hat"] == "none":
        drawn["hat"] = some_hat
    if drawn["hat"] == "none" or fixed.get("hat_color") == "none":
        drawn["hat"] = drawn["hat_color"] = "none"
    return CreatureRecord(**drawn)


def render_creature(
    rng: np.random.Generator, *, size: int = IMAGE_SIZE, **fixed: Any
) -> tuple[Image.Image, CreatureRecord]:
    """Draws a random record (see `sample_record`) and renders it."""
    record = sample_record(rng, **fixed)
    return render(record, size=size), record


def render(record: CreatureRecord, *, size: int = IMAGE_SIZE) -> Image.Image:
    """Renders `record` as a ``size``×``size`` RGB image (a pure function of the record)."""
    big = size * _SUPERSAMPLE
    image = _background(record.scene, record.background, big).copy()
    draw = ImageDraw.Draw(image)
    _draw_creature(draw, record, big)
    return image.resize((size, size), Image.Resampling.BOX)


# ----------------------------------------------------------------------------- backgrounds


@lru_cache(maxsize=len(SCENES) * _BACKGROUND_VARIANTS * 2)
def _background(scene: str, variant: int, size: int) -> Image.Image:
    rng = np.random.default_rng([SCENES.index(scene), variant, 7])
    image = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(image)
    s = size

    def u(lo: float, hi: float) -> float:
        return float(rng.uniform(lo, hi)) * s

    if scene == "forest":
        draw.rectangle([0, 0, s, s], fill=(150, 205, 160))
        draw.rectangle([0, int(0.70 * s), s, s], fill=(50, 120, 40))
        for _ in range(int(rng.integers(4, 7))):
            cx, base, w, h = u(0, 1), u(0.66, 0.74), u(0.12, 0.2), u(0.35, 0.6)
            draw.rectangle([cx - 0.02 * s, base - 0.1 * s, cx + 0.02 * s, base], fill=(95, 60, 30))
            for k in range(3):
                top = base - h + k * h * 0.25
                bot = base - 0.08 * s - (2 - k) * h * 0.12
                draw.polygon(
                    [(cx, top), (cx - w * (0.6 + 0.2 * k), bot), (cx + w * (0.6 + 0.2 * k), bot)],
                    fill=(20, 95 + 10 * k, 35),
                )
    elif scene == "beach":
        draw.rectangle([0, 0, s, s], fill=(120, 200, 250))
        horizon = u(0.45, 0.52)
        draw.rectangle([0, horizon, s, s], fill=(20, 110, 190))
        shore = u(0.64, 0.7)
        draw.rectangle([0, shore, s, s], fill=(240, 215, 150))
        for k in range(3):
            y = horizon + (shore - horizon) * (k + 1) / 4
            x0 = u(0, 0.6)
            draw.line([x0, y, x0 + 0.25 * s, y], fill=(230, 245, 255), width=max(1, s // 80))
        sx, sy, r = u(0.1, 0.9), u(0.08, 0.2), 0.08 * s
        draw.ellipse([sx - r, sy - r, sx + r, sy + r], fill=(255, 235, 90))
    elif scene == "night":
        draw.rectangle([0, 0, s, s], fill=(12, 16, 48))
        draw.rectangle([0, int(0.74 * s), s, s], fill=(25, 35, 45))
        for _ in range(int(rng.integers(18, 28))):
            x, y, r = u(0, 1), u(0, 0.7), max(1.0, float(rng.uniform(0.004, 0.01)) * s)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=(240, 240, 200))
        mx, my, r = u(0.12, 0.88), u(0.08, 0.22), 0.08 * s
        draw.ellipse([mx - r, my - r, mx + r, my + r], fill=(250, 245, 190))
        draw.ellipse([mx - 0.5 * r, my - 1.1 * r, mx + 1.5 * r, my + 0.9 * r], fill=(12, 16, 48))
    elif scene == "snow":
        draw.rectangle([0, 0, s, s], fill=(200, 215, 235))
        ground = u(0.66, 0.72)
        draw.rectangle([0, ground, s, s], fill=(250, 252, 255))
        for _ in range(3):
            cx, r = u(0, 1), u(0.15, 0.3)
            draw.ellipse([cx - r, ground - 0.3 * r, cx + r, ground + 0.3 * r], fill=(250, 252, 255))
        for _ in range(int(rng.integers(25, 40))):
            x, y, r = u(0, 1), u(0, 0.95), max(1.0, float(rng.uniform(0.006, 0.012)) * s)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=(255, 255, 255))
    elif scene == "city":
        draw.rectangle([0, 0, s, s], fill=(165, 165, 175))
        x = -u(0, 0.1)
        while x < s:
            w, h = u(0.14, 0.24), u(0.3, 0.6)
            top = 0.74 * s - h
            shade = int(rng.integers(60, 95))
            draw.rectangle([x, top, x + w - 0.01 * s, 0.74 * s], fill=(shade, shade, shade + 10))
            for wy in np.arange(top + 0.04 * s, 0.7 * s, 0.07 * s):
                for wx in np.arange(x + 0.03 * s, x + w - 0.04 * s, 0.06 * s):
                    if rng.random() < 0.6:
                        draw.rectangle(
                            [wx, wy, wx + 0.025 * s, wy + 0.03 * s], fill=(250, 225, 110)
                        )
            x += w
        draw.rectangle([0, int(0.74 * s), s, s], fill=(70, 70, 75))
        for k in range(4):
            lx = (k + float(rng.uniform(0, 0.5))) * s / 4
            draw.rectangle([lx, 0.86 * s, lx + 0.1 * s, 0.875 * s], fill=(235, 235, 235))
    else:  # pragma: no cover - guarded by CreatureRecord
        raise ValueError(scene)
    # Soften the sharp background a touch, so the creature's crisp outline stands out.
    return image.filter(ImageFilter.BoxBlur(max(1, size // 128)))


# ----------------------------------------------------------------------------- creature


def _draw_creature(draw: ImageDraw.ImageDraw, record: CreatureRecord, s: int) -> None:
    k = record.scale * s
    bw, bh = (_BODY_WH[record.shape][0] * k, _BODY_WH[record.shape][1] * k)
    cx, bottom = record.x * s, record.bottom * s
    line = max(2, round(0.018 * s))
    fill = _RGB[record.color]

    # Feet first, so the body overlaps them.
    foot_w, foot_h = 0.09 * k, 0.05 * k
    feet_top = bottom - foot_h
    for side in (-1, 1):
        fx = cx + side * 0.22 * k
        draw.ellipse(
            [fx - foot_w / 2, feet_top - foot_h * 0.4, fx + foot_w / 2, bottom], fill=_OUTLINE
        )
    body_bottom = feet_top + foot_h * 0.2
    top = body_bottom - bh
    left, right = cx - bw / 2, cx + bw / 2
    if record.shape == "round":
        draw.ellipse([left, top, right, body_bottom], fill=fill, outline=_OUTLINE, width=line)
        hat_base, hat_span = top + 0.04 * k, bw * 0.72
    elif record.shape == "square":
        draw.rounded_rectangle(
            [left, top, right, body_bottom],
            radius=0.03 * k,
            fill=fill,
            outline=_OUTLINE,
            width=line,
        )
        hat_base, hat_span = top + line / 2, bw * 0.85
    elif record.shape == "triangle":
        draw.polygon(
            [(cx, top), (left, body_bottom), (right, body_bottom)],
            fill=fill,
            outline=_OUTLINE,
            width=line,
        )
        hat_base, hat_span = top + 0.12 * k, bw * 0.42
    elif record.shape == "diamond":
        mid = top + bh * 0.5
        draw.polygon(
            [(cx, top), (right, mid), (cx, body_bottom), (left, mid)],
            fill=fill,
            outline=_OUTLINE,
            width=line,
        )
        hat_base, hat_span = top + 0.11 * k, bw * 0.42
    else:  # tall
        draw.rounded_rectangle(
            [left, top, right, body_bottom],
            radius=bw * 0.45,
            fill=fill,
            outline=_OUTLINE,
            width=line,
        )
        hat_base, hat_span = top + 0.03 * k, bw * 0.9

    eye_y = top + bh * (0.62 if record.shape in ("triangle", "diamond") else 0.42)
    _draw_eyes(draw, record.eyes, cx, eye_y, k, line)
    if record.hat != "none":
        _draw_hat(draw, record.hat, _RGB[record.hat_color], cx, hat_base, hat_span, k, line)


def _draw_eyes(
    draw: ImageDraw.ImageDraw, style: str, cx: float, cy: float, k: float, line: int
) -> None:
    white = (255, 255, 255)
    if style == "cyclops":
        r = 0.085 * k
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=white, outline=_OUTLINE, width=line)
        p = 0.04 * k
        draw.ellipse([cx - p, cy - p, cx + p, cy + p], fill=_OUTLINE)
        return
    dx = 0.075 * k
    for ex in (cx - dx, cx + dx):
        if style == "dots":
            r = 0.028 * k
            draw.ellipse([ex - r, cy - r, ex + r, cy + r], fill=_OUTLINE)
        elif style == "big":
            r = 0.058 * k
            draw.ellipse([ex - r, cy - r, ex + r, cy + r], fill=white, outline=_OUTLINE, width=line)
            p = 0.026 * k
            draw.ellipse([ex - p, cy - p + 0.01 * k, ex + p, cy + p + 0.01 * k], fill=_OUTLINE)
        else:  # sleepy: closed lids, a thick downward arc
            w, h = 0.05 * k, 0.03 * k
            draw.arc(
                [ex - w, cy - h, ex + w, cy + h],
                start=10,
                end=170,
                fill=_OUTLINE,
                width=max(line, round(0.022 * k)),
            )


def _draw_hat(
    draw: ImageDraw.ImageDraw,
    hat: str,
    fill: tuple[int, int, int],
    cx: float,
    base: float,
    span: float,
    k: float,
    line: int,
) -> None:
    o: dict[str, Any] = {"fill": fill, "outline": _OUTLINE, "width": line}
    if hat == "cap":
        w = max(span, 0.24 * k) / 2
        draw.chord([cx - w, base - 1.4 * w * 0.7, cx + w, base + 1.4 * w * 0.7], 180, 360, **o)
        draw.rectangle([cx, base - 0.035 * k, cx + w * 1.9, base], **o)
    elif hat == "crown":
        w, h = max(span, 0.24 * k) / 2, 0.14 * k
        pts = [(cx - w, base), (cx - w, base - h)]
        for i in range(1, 7):
            pts.append((cx - w + i * w / 3, base - (h * 0.45 if i % 2 else h)))
        pts.append((cx + w, base))
        draw.polygon(pts, **o)
    elif hat == "tophat":
        w, h = max(span * 0.75, 0.17 * k) / 2, 0.2 * k
        brim = w + 0.06 * k
        draw.rectangle([cx - w, base - h, cx + w, base - 0.02 * k], **o)
        draw.rectangle([cx - brim, base - 0.035 * k, cx + brim, base], **o)
    elif hat == "wizard":
        w, h = max(span, 0.24 * k) / 2, 0.25 * k
        draw.polygon([(cx - w, base), (cx + w * 0.2, base - h), (cx + w, base)], **o)
    else:  # pragma: no cover - guarded by CreatureRecord
        raise ValueError(hat)


def record_with(record: CreatureRecord, **changes: Any) -> CreatureRecord:
    """A copy of `record` with some fields changed (validated)."""
    return replace(record, **changes)
