"""ToyWorld's renderer: cartoon creatures with ground-truth attributes, drawn with PIL.

A creature has **identity attributes** (body shape, body colour, hat, hat colour, eye style) and
sits in a **context** (a background scene, a position, a size, a small tilt and a small shade of
its colours). Every image comes with its `CreatureRecord`, and the record alone determines the
image, so `render(record)` is a pure function.

The drawing is made for a 64 px model whose latents are 16×16 (one latent pixel is 4×4 image
pixels): the creature fills most of the frame, every eye is at least 2×2 latent pixels and has a
pupil, hats are large, eyes and hat sit at the same place whatever the body shape, and the
backgrounds are smooth, so the denoising loss is not spent on background detail. Values are far
apart: saturated colours distinct from the backgrounds, outlines that differ, a black outline
around body and hat.

Which identity an image shows is drawn from the world's prior (`consistent_char.toy.prior`):
a few popular archetypes and a long tail.

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
    "creature_mask",
    "num_identities",
    "record_with",
    "render",
    "render_creature",
    "render_without_eyes",
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
_WHITE = (255, 255, 255)
_LID = (70, 70, 80)

# Geometry in fractions of the image side, at scale 1. Every body has the same height, so the
# hat (on the body's top) and the eyes (a fixed distance below it) do not depend on the shape.
_BODY_H = 0.50
_BODY_W: dict[str, float] = {
    "round": 0.62,
    "square": 0.58,
    "triangle": 0.70,  # point down: the wide side is the head
    "diamond": 0.66,
    "tall": 0.44,
}
_FEET_H = 0.05
_EYE_Y = 0.36  # of the body height, from its top
_EYE_DX = 0.115
_HAT_W = 0.40
_SCALE_RANGE = (0.92, 1.06)
_X_RANGE = (0.45, 0.55)
_BOTTOM_RANGE = (0.95, 0.97)
_TILT_RANGE = (-8.0, 8.0)  # degrees, about the feet
_SHADE_RANGE = (-1.0, 1.0)  # colours × (1 + 0.08 · shade)


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
        background: Which variant of the scene's background is drawn.
        tilt: Rotation of the whole creature about its feet, in degrees.
        shade: Brightens (> 0) or darkens (< 0) body and hat colours by up to 8%.
    """

    shape: str
    color: str
    hat: str
    hat_color: str
    eyes: str
    scene: str
    x: float = 0.5
    bottom: float = 0.96
    scale: float = 1.0
    background: int = 0
    tilt: float = 0.0
    shade: float = 0.0

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


def sample_record(
    rng: np.random.Generator, *, prior: str = "world", **fixed: Any
) -> CreatureRecord:
    """Draws an identity from `prior` and a uniformly random context; keywords pin attributes.

    Args:
        rng: The random source; the same number of values is drawn whatever is pinned, so
            pinning one attribute leaves the other draws unchanged.
        prior: ``"world"`` (ToyWorld's popularity weights, `consistent_char.toy.prior`) or
            ``"uniform"`` (every identity equally likely).
        **fixed: Attribute values to keep (identity and context fields of `CreatureRecord`).
            The identity is drawn among those that match the pinned identity attributes, so
            ``hat_color="red"`` implies a hat and ``hat="none"`` implies no hat colour.
    """
    from consistent_char.toy.prior import sample_identity

    unknown = set(fixed) - {f.name for f in fields(CreatureRecord)}
    if unknown:
        raise ValueError(f"unknown attributes {sorted(unknown)}; known: {list(ATTRIBUTES)}")
    for name in ATTRIBUTES:
        if name in fixed and fixed[name] not in ATTRIBUTES[name]:
            raise ValueError(f"{name} must be one of {list(ATTRIBUTES[name])}, got {fixed[name]!r}")
    pinned = {a: fixed[a] for a in IDENTITY_ATTRIBUTES if a in fixed}
    identity = dict(zip(IDENTITY_ATTRIBUTES, sample_identity(rng, prior, **pinned), strict=True))
    drawn: dict[str, Any] = {
        **identity,
        "scene": SCENES[int(rng.integers(len(SCENES)))],
        "x": float(rng.uniform(*_X_RANGE)),
        "bottom": float(rng.uniform(*_BOTTOM_RANGE)),
        "scale": float(rng.uniform(*_SCALE_RANGE)),
        "background": int(rng.integers(_BACKGROUND_VARIANTS)),
        "tilt": float(rng.uniform(*_TILT_RANGE)),
        "shade": float(rng.uniform(*_SHADE_RANGE)),
    }
    drawn.update({k: v for k, v in fixed.items() if k not in IDENTITY_ATTRIBUTES})
    return CreatureRecord(**drawn)


def render_creature(
    rng: np.random.Generator, *, size: int = IMAGE_SIZE, prior: str = "world", **fixed: Any
) -> tuple[Image.Image, CreatureRecord]:
    """Draws a random record (see `sample_record`) and renders it."""
    record = sample_record(rng, prior=prior, **fixed)
    return render(record, size=size), record


def render(record: CreatureRecord, *, size: int = IMAGE_SIZE) -> Image.Image:
    """Renders `record` as a ``size``×``size`` RGB image (a pure function of the record)."""
    return _render(record, size, eyes=True)


def render_without_eyes(record: CreatureRecord, *, size: int = IMAGE_SIZE) -> Image.Image:
    """`render` with the eyes left out: not a ToyWorld image (every creature has eyes), but
    what a faded identity looks like; the probe learns to call it invalid."""
    return _render(record, size, eyes=False)


def creature_mask(record: CreatureRecord, *, size: int = IMAGE_SIZE) -> Image.Image:
    """Where `render(record)` draws the creature (body, feet, eyes, hat): an ``L`` image, 255 on
    every pixel the creature covers even in part, 0 on the background alone."""
    big = size * _SUPERSAMPLE
    alpha = _creature_layer(record, big, eyes=True).getchannel("A")
    return alpha.resize((size, size), Image.Resampling.BOX).point(lambda v: 255 if v else 0)


def _render(record: CreatureRecord, size: int, *, eyes: bool) -> Image.Image:
    big = size * _SUPERSAMPLE
    image = _background(record.scene, record.background, big).convert("RGBA")
    image.alpha_composite(_creature_layer(record, big, eyes=eyes))
    return image.convert("RGB").resize((size, size), Image.Resampling.BOX)


def _creature_layer(record: CreatureRecord, big: int, *, eyes: bool) -> Image.Image:
    """The creature alone on a transparent ``big``×``big`` layer, tilted."""
    layer = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    _draw_creature(ImageDraw.Draw(layer), record, big, eyes=eyes)
    if record.tilt:
        # Nearest-neighbour at 4x: the box filter below smooths the steps, at a fifth of the
        # cost of a bicubic rotation.
        feet = (record.x * big, record.bottom * big)
        layer = layer.rotate(record.tilt, resample=Image.Resampling.NEAREST, center=feet)
    return layer


def record_with(record: CreatureRecord, **changes: Any) -> CreatureRecord:
    """A copy of `record` with some fields changed (validated)."""
    return replace(record, **changes)


# ----------------------------------------------------------------------------- backgrounds


@lru_cache(maxsize=len(SCENES) * _BACKGROUND_VARIANTS * 2)
def _background(scene: str, variant: int, size: int) -> Image.Image:
    """A smooth scene: sky, ground and a few large shapes, blurred to low frequencies."""
    rng = np.random.default_rng([SCENES.index(scene), variant, 7])
    image = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(image)
    s = size

    def u(lo: float, hi: float) -> float:
        return float(rng.uniform(lo, hi)) * s

    if scene == "forest":
        draw.rectangle([0, 0, s, s], fill=(170, 215, 175))
        ground = u(0.66, 0.72)
        for _ in range(int(rng.integers(2, 4))):
            cx, w, h = u(0, 1), u(0.18, 0.28), u(0.45, 0.6)
            draw.polygon([(cx, ground - h), (cx - w, ground), (cx + w, ground)], fill=(25, 100, 45))
        draw.rectangle([0, ground, s, s], fill=(60, 125, 50))
    elif scene == "beach":
        draw.rectangle([0, 0, s, s], fill=(135, 205, 250))
        horizon, shore = u(0.42, 0.5), u(0.62, 0.68)
        draw.rectangle([0, horizon, s, s], fill=(25, 110, 185))
        draw.rectangle([0, shore, s, s], fill=(240, 215, 150))
        sx, sy, r = u(0.1, 0.9), u(0.08, 0.16), 0.08 * s
        draw.ellipse([sx - r, sy - r, sx + r, sy + r], fill=(255, 235, 120))
    elif scene == "night":
        draw.rectangle([0, 0, s, s], fill=(15, 20, 55))
        mx, my, r = u(0.12, 0.88), u(0.1, 0.2), 0.1 * s
        draw.ellipse([mx - r, my - r, mx + r, my + r], fill=(245, 240, 195))
        draw.rectangle([0, u(0.72, 0.76), s, s], fill=(30, 38, 50))
    elif scene == "snow":
        draw.rectangle([0, 0, s, s], fill=(195, 210, 232))
        ground = u(0.62, 0.7)
        for _ in range(2):
            cx, r = u(0, 1), u(0.25, 0.4)
            draw.ellipse(
                [cx - r, ground - 0.35 * r, cx + r, ground + 0.35 * r], fill=(250, 252, 255)
            )
        draw.rectangle([0, ground, s, s], fill=(250, 252, 255))
    elif scene == "city":
        draw.rectangle([0, 0, s, s], fill=(175, 175, 185))
        x = -u(0, 0.15)
        while x < s:
            w, h = u(0.22, 0.34), u(0.3, 0.55)
            shade = int(rng.integers(70, 100))
            draw.rectangle(
                [x, 0.74 * s - h, x + w - 0.03 * s, 0.74 * s], fill=(shade, shade, shade + 12)
            )
            x += w
        draw.rectangle([0, int(0.74 * s), s, s], fill=(75, 75, 80))
    else:  # pragma: no cover - guarded by CreatureRecord
        raise ValueError(scene)
    return image.filter(ImageFilter.GaussianBlur(size / 48))


# ----------------------------------------------------------------------------- creature


def _shaded(rgb: tuple[int, int, int], shade: float) -> tuple[int, int, int]:
    f = 1.0 + 0.08 * shade
    r, g, b = (int(min(255, max(0, round(c * f)))) for c in rgb)
    return (r, g, b)


def _draw_creature(
    draw: ImageDraw.ImageDraw, record: CreatureRecord, s: int, *, eyes: bool = True
) -> None:
    k = record.scale * s
    bw, bh = _BODY_W[record.shape] * k, _BODY_H * k
    cx, bottom = record.x * s, record.bottom * s
    line = max(2, round(0.02 * s))
    fill = _shaded(_RGB[record.color], record.shade)

    # Feet first, so the body overlaps them.
    foot_w, foot_h = 0.12 * k, _FEET_H * k
    body_bottom = bottom - foot_h * 0.6
    for side in (-1, 1):
        fx = cx + side * 0.14 * k
        draw.ellipse([fx - foot_w / 2, bottom - foot_h, fx + foot_w / 2, bottom], fill=_OUTLINE)
    top = body_bottom - bh
    left, right = cx - bw / 2, cx + bw / 2
    body: dict[str, Any] = {"fill": fill, "outline": _OUTLINE, "width": line}
    if record.shape == "round":
        draw.ellipse([left, top, right, body_bottom], **body)
    elif record.shape == "square":
        draw.rounded_rectangle([left, top, right, body_bottom], radius=0.05 * k, **body)
    elif record.shape == "triangle":
        draw.polygon([(left, top), (right, top), (cx, body_bottom)], **body)
    elif record.shape == "diamond":
        mid = top + bh * 0.5
        draw.polygon([(cx, top), (right, mid), (cx, body_bottom), (left, mid)], **body)
    else:  # tall
        draw.rounded_rectangle([left, top, right, body_bottom], radius=bw * 0.45, **body)

    if eyes:
        _draw_eyes(draw, record.eyes, cx, top + _EYE_Y * bh, k, line)
    if record.hat != "none":
        hat_fill = _shaded(_RGB[record.hat_color], record.shade)
        _draw_hat(draw, record.hat, hat_fill, cx, top + 0.02 * k, k, line)


def _draw_eyes(
    draw: ImageDraw.ImageDraw, style: str, cx: float, cy: float, k: float, line: int
) -> None:
    def disc(x: float, y: float, r: float, fill: tuple[int, int, int], outline: bool) -> None:
        box = [x - r, y - r, x + r, y + r]
        if outline:
            draw.ellipse(box, fill=fill, outline=_OUTLINE, width=line)
        else:
            draw.ellipse(box, fill=fill)

    if style == "cyclops":
        disc(cx, cy, 0.13 * k, _WHITE, True)
        disc(cx, cy + 0.01 * k, 0.06 * k, _OUTLINE, False)
        return
    for ex in (cx - _EYE_DX * k, cx + _EYE_DX * k):
        if style == "dots":
            # Solid black eyes with a white glint as the pupil's highlight.
            disc(ex, cy, 0.07 * k, _OUTLINE, False)
            disc(ex + 0.022 * k, cy - 0.022 * k, 0.024 * k, _WHITE, False)
        elif style == "big":
            disc(ex, cy, 0.095 * k, _WHITE, True)
            disc(ex, cy + 0.012 * k, 0.045 * k, _OUTLINE, False)
        else:  # sleepy: a heavy lid over the upper half, the pupil below it
            r = 0.085 * k
            disc(ex, cy, r, _WHITE, True)
            disc(ex, cy + 0.035 * k, 0.038 * k, _OUTLINE, False)
            draw.chord(
                [ex - r, cy - r, ex + r, cy + r], 180, 360, fill=_LID, outline=_OUTLINE, width=line
            )
            draw.line([ex - r, cy, ex + r, cy], fill=_OUTLINE, width=line)


def _draw_hat(
    draw: ImageDraw.ImageDraw,
    hat: str,
    fill: tuple[int, int, int],
    cx: float,
    base: float,
    k: float,
    line: int,
) -> None:
    o: dict[str, Any] = {"fill": fill, "outline": _OUTLINE, "width": line}
    w = _HAT_W * k / 2
    if hat == "cap":
        h = 0.2 * k
        draw.chord([cx - w, base - h, cx + w, base + h], 180, 360, **o)
        draw.rectangle([cx - 0.1 * w, base - 0.05 * k, cx + w * 1.6, base], **o)
    elif hat == "crown":
        h = 0.17 * k
        pts = [(cx - w, base), (cx - w, base - h)]
        for i in range(1, 7):
            pts.append((cx - w + i * w / 3, base - (h * 0.4 if i % 2 else h)))
        pts.append((cx + w, base))
        draw.polygon(pts, **o)
    elif hat == "tophat":
        h, crown_w = 0.24 * k, w * 0.7
        draw.rectangle([cx - crown_w, base - h, cx + crown_w, base - 0.03 * k], **o)
        draw.rectangle([cx - w * 1.05, base - 0.05 * k, cx + w * 1.05, base], **o)
    elif hat == "wizard":
        h = 0.3 * k
        draw.polygon([(cx - w, base), (cx + w * 0.15, base - h), (cx + w, base)], **o)
    else:  # pragma: no cover - guarded by CreatureRecord
        raise ValueError(hat)
