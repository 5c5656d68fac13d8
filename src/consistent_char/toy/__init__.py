"""ToyWorld: an offline world with ground truth, shipped inside the package.

Cartoon creatures drawn procedurally (`render_creature`), captions from a small grammar
(`full_caption`, `sample_caption`), a tiny SDXL-architecture text-to-image model trained on them
(`model_dir`), a tiny DINOv2 (`embedder_dir`) and an identity probe (`probe_dir`,
`IdentityProbe`) that reads every attribute back from an image.

The weights are package data under ``consistent_char/toy/weights/``, reproduced from a seed by
the training recipe in the repository, ``python -m recipes.toyworld.train --out DIR`` (run from
the repository root; the recipe is not installed with the package).

Example:
    >>> import consistent_char.toy as toy
    >>> from diffusers import StableDiffusionXLPipeline
    >>> pipe = StableDiffusionXLPipeline.from_pretrained(toy.model_dir())  # doctest: +SKIP
    >>> image = pipe("a red round creature in the snow").images[0]  # doctest: +SKIP
    >>> toy.IdentityProbe.from_pretrained(toy.probe_dir()).predict([image])  # doctest: +SKIP
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

from consistent_char.toy.captions import (
    SCENE_PHRASES,
    VOCABULARY,
    caption,
    full_caption,
    parse_caption,
    parse_scene,
    sample_caption,
    scene_phrase,
)
from consistent_char.toy.world import (
    ATTRIBUTES,
    CONTEXT_ATTRIBUTES,
    IDENTITY_ATTRIBUTES,
    IMAGE_SIZE,
    SCENES,
    CreatureRecord,
    render,
    render_creature,
    sample_record,
)

if TYPE_CHECKING:
    from consistent_char.toy.models import IdentityProbe

__all__ = [
    "ATTRIBUTES",
    "CONTEXT_ATTRIBUTES",
    "IDENTITY_ATTRIBUTES",
    "IMAGE_SIZE",
    "SCENES",
    "SCENE_PHRASES",
    "CONTROLNET_COMMAND",
    "TRAIN_COMMAND",
    "VOCABULARY",
    "CreatureRecord",
    "IdentityProbe",
    "ToyWeightsMissingError",
    "caption",
    "controlnet_dir",
    "embedder_dir",
    "full_caption",
    "model_dir",
    "parse_caption",
    "parse_scene",
    "pose_probe_dir",
    "probe_dir",
    "render",
    "render_creature",
    "sample_caption",
    "sample_record",
    "scene_phrase",
    "weights_dir",
]

#: The training recipe's command line, run from the repository root.
TRAIN_COMMAND = "python -m recipes.toyworld.train --out src/consistent_char/toy/weights"
#: The pose ControlNet's and pose probe's recipe (it starts from the trained pipeline).
CONTROLNET_COMMAND = (
    "python -m recipes.toyworld.controlnet --weights src/consistent_char/toy/weights"
)


class ToyWeightsMissingError(FileNotFoundError):
    """ToyWorld's trained weights are not where the package expects them."""


def weights_dir() -> Path:
    """``consistent_char/toy/weights``: where the trained ToyWorld models live."""
    return Path(__file__).resolve().parent / "weights"


def _existing(name: str, marker: str, command: str = TRAIN_COMMAND, hours: float = 4) -> Path:
    path = weights_dir() / name
    if not (path / marker).is_file():
        raise ToyWeightsMissingError(
            f"ToyWorld's {name!r} weights are missing: {path / marker} does not exist. "
            f"Train them with `{command}` from the repository root (about {hours:g} hours on "
            "2 CPU cores), or reinstall a package that ships them."
        )
    return path


def model_dir() -> Path:
    """The toy SDXL pipeline, for ``StableDiffusionXLPipeline.from_pretrained``."""
    return _existing("pipeline", "model_index.json")


def embedder_dir() -> Path:
    """The toy DINOv2, for ``Dinov2Model.from_pretrained`` / ``AutoImageProcessor``."""
    return _existing("dinov2", "config.json")


def probe_dir() -> Path:
    """The identity probe, for `IdentityProbe.from_pretrained`."""
    return _existing("probe", "config.json")


def controlnet_dir() -> Path:
    """The pose ControlNet for the toy pipeline, for ``ControlNetModel.from_pretrained``; its
    control images are `consistent_char.toy.pose.pose_map`."""
    return _existing("controlnet", "config.json", CONTROLNET_COMMAND, 1.5)


def pose_probe_dir() -> Path:
    """The pose probe (an `IdentityProbe` with a pose head, trained on creatures in wide poses),
    for `IdentityProbe.from_pretrained`."""
    return _existing("pose_probe", "config.json", CONTROLNET_COMMAND, 1.5)


def __getattr__(name: str) -> Any:
    # torch is imported only when the probe is asked for: the renderer stays light (it runs in
    # worker processes).
    if name == "IdentityProbe":
        return import_module("consistent_char.toy.models").IdentityProbe
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
