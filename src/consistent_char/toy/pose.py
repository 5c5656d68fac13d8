"""ToyWorld's pose signal: where a creature stands, how large it is and how it leans.

A creature's **pose** is four numbers of its `CreatureRecord`: ``x`` (horizontal centre),
``bottom`` (where its feet are), ``scale`` and ``tilt`` (degrees about the feet). ToyWorld's
own images keep them in narrow ranges (the creature is always near the middle, upright); pose
control asks for the wider `POSE_RANGES`.

The **pose map** is the control image a ControlNet reads: a stick figure on black, drawn with
the renderer's own geometry, so it carries the pose and nothing of the identity (no shape,
colour, hat or eyes):

- a white spine from the feet to the top of the body,
- a red bar across the eye line, as wide as a round creature's eyes are apart, twice over,
- a green bar under the feet,

rotated by the tilt about the feet, as the renderer rotates the creature.

Example:
    >>> import numpy as np
    >>> from consistent_char.toy.pose import pose_map, sample_posed_record
    >>> record = sample_posed_record(np.random.default_rng(0))
    >>> pose_map(record).size
    (64, 64)
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from consistent_char.toy.world import (
    _BODY_H,
    _EYE_Y,
    _FEET_H,
    IMAGE_SIZE,
    CreatureRecord,
    sample_record,
)

__all__ = [
    "POSE",
    "POSE_RANGES",
    "POSE_TOLERANCE",
    "REFINE_THROUGH_CONTROLNET",
    "annotate",
    "pose_followed",
    "pose_map",
    "pose_of",
    "sample_pose",
    "sample_posed_record",
]

#: The pose's fields, in the order of `pose_of`'s arrays.
POSE: tuple[str, ...] = ("x", "bottom", "scale", "tilt")
#: The ranges pose control asks for (ToyWorld's own images: x 0.45-0.55, scale 0.92-1.06,
#: tilt ±8°). Wider ones put part of a leaning creature outside the frame.
POSE_RANGES: dict[str, tuple[float, float]] = {
    "x": (0.35, 0.65),
    "bottom": (0.90, 0.97),
    "scale": (0.75, 1.06),
    "tilt": (-25.0, 25.0),
}
#: How far a drawn pose may be from the asked one and still follow it, per field: a tenth
#: of the range for position, scale and feet, and 7.5° of lean (under a sixth of its range).
POSE_TOLERANCE: dict[str, float] = {"x": 0.03, "bottom": 0.02, "scale": 0.06, "tilt": 7.5}

#: The ``refiner`` settings that learn an identity through ToyWorld's pose ControlNet, each
#: training image under the pose map of the pose it stands in (see
#: `consistent_char.refiners.ti_lora.control`).
REFINE_THROUGH_CONTROLNET: dict[str, str] = {
    "controlnet": "toy",
    "control_annotator": "consistent_char.toy.pose:annotate",
}

_SUPERSAMPLE = 4
_SPINE = (255, 255, 255)
_EYES = (255, 60, 60)
_FEET = (60, 255, 60)
# The eye bar spans twice the eyes' distance (see the renderer's _EYE_DX), the feet bar the feet.
_EYE_BAR = 0.46
_FEET_BAR = 0.40


def sample_pose(rng: np.random.Generator) -> dict[str, float]:
    """A pose drawn uniformly from `POSE_RANGES`."""
    return {name: float(rng.uniform(*POSE_RANGES[name])) for name in POSE}


def sample_posed_record(
    rng: np.random.Generator, *, prior: str = "world", **fixed: Any
) -> CreatureRecord:
    """`sample_record` with the pose drawn from `POSE_RANGES` (keywords still pin fields)."""
    pose = sample_pose(rng)
    return sample_record(rng, prior=prior, **{**pose, **fixed})


def pose_of(records: Sequence[CreatureRecord | Mapping[str, float]]) -> np.ndarray:
    """The poses of records (or of ``{field: value}`` mappings) as an ``(N, 4)`` array."""
    rows = [
        [float(r[k] if isinstance(r, Mapping) else getattr(r, k)) for k in POSE] for r in records
    ]
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), len(POSE))


def pose_followed(drawn: np.ndarray, asked: np.ndarray) -> np.ndarray:
    """Per image, whether every field of the drawn pose is within `POSE_TOLERANCE` of the asked
    one (``(N, 4)`` arrays in `POSE` order → ``(N,)`` booleans)."""
    tolerance = np.asarray([POSE_TOLERANCE[k] for k in POSE])
    return np.all(np.abs(np.asarray(drawn) - np.asarray(asked)) <= tolerance, axis=1)


def pose_map(pose: CreatureRecord | Mapping[str, float], *, size: int = IMAGE_SIZE) -> Image.Image:
    """The control image of a pose (a record, or a mapping with the `POSE` fields)."""
    x, bottom, scale, tilt = pose_of([pose])[0]
    big = size * _SUPERSAMPLE
    layer = Image.new("RGB", (big, big), (0, 0, 0))
    draw = ImageDraw.Draw(layer)
    k = scale * big
    cx, feet = x * big, bottom * big
    # The renderer's body spans from a little above the feet to one body height higher.
    body_bottom = feet - _FEET_H * k * 0.6
    top = body_bottom - _BODY_H * k
    eye_y = top + _EYE_Y * _BODY_H * k
    width = max(2, round(0.035 * big))
    draw.line([(cx, feet), (cx, top)], fill=_SPINE, width=width)
    for y, half, colour in ((eye_y, _EYE_BAR / 2 * k, _EYES), (feet, _FEET_BAR / 2 * k, _FEET)):
        draw.line([(cx - half, y), (cx + half, y)], fill=colour, width=width)
    if tilt:
        layer = layer.rotate(tilt, resample=Image.Resampling.BILINEAR, center=(cx, feet))
    return layer.resize((size, size), Image.Resampling.BOX)


def annotate(images: Sequence[Image.Image]) -> list[Image.Image]:
    """The pose maps of drawn creatures, their poses read by the pose probe: ToyWorld's control
    annotator (``refiner.control_annotator: consistent_char.toy.pose:annotate``), as OpenPose
    is for a pose ControlNet on photographs."""
    poses = _pose_probe().predict_pose(list(images))
    return [pose_map(dict(zip(POSE, map(float, p), strict=True))) for p in poses]


@functools.lru_cache(maxsize=1)
def _pose_probe() -> Any:
    from consistent_char.toy import pose_probe_dir
    from consistent_char.toy.probe import IdentityProbe

    return IdentityProbe.from_pretrained(pose_probe_dir())
