"""The checks of what `refine` is given: images, captions, seed, prior images, training size.

They run before anything is installed on the pipeline, so a bad input leaves it untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral
from typing import Any

from PIL import Image

from consistent_char.identity import Identity
from consistent_char.refiners.ti_lora.settings import RefinerSettings
from consistent_char.refiners.ti_lora.state import check_tokens_free, token_names

MAX_SEED = 2**63


def check_inputs(
    pipe: Any,
    identity: Identity | None,
    token: str,
    images: Sequence[Image.Image],
    captions: Sequence[str],
    seed: int,
    settings: RefinerSettings,
) -> tuple[list[Image.Image], list[str]]:
    """The images and captions as lists, after checking them, the seed, the warm-start identity
    (it must fit the pipeline) and that the identity's tokens are new to the pipeline."""
    if isinstance(seed, bool) or not isinstance(seed, Integral) or not 0 <= int(seed) < MAX_SEED:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    images = list(images)
    if not images:
        raise ValueError("images is empty: refine needs at least one training image")
    for j, im in enumerate(images):
        if not isinstance(im, Image.Image):
            raise ValueError(f"images[{j}] must be a PIL.Image.Image, got {type(im).__name__}")
    if isinstance(captions, str):
        raise ValueError("captions must be a sequence of strings (one per image), got a str")
    captions = list(captions)
    if len(captions) != len(images):
        raise ValueError(
            f"need one caption per image: got {len(images)} images and {len(captions)} captions"
        )
    for j, caption in enumerate(captions):
        if not isinstance(caption, str) or token not in caption:
            raise ValueError(
                f"captions[{j}] must contain the identity's token {token!r}, got {caption!r}"
            )
    if identity is not None:
        identity.check_fits(pipe)
    names = identity.tokens if identity else token_names(token, settings.num_vectors)
    check_tokens_free(pipe, names)
    return images, captions


def training_size(
    pipe: Any, images: list[Image.Image], height: int | None, width: int | None
) -> tuple[int, int]:
    """The training size: `height` and `width`, or the first image's; a multiple of the VAE's
    downscaling factor."""
    height = height or images[0].height
    width = width or images[0].width
    factor = pipe.vae_scale_factor
    if height % factor or width % factor:
        raise ValueError(
            f"training size {height}x{width} is not a multiple of the VAE's factor {factor}: "
            "pass height= and width= to the refiner"
        )
    return height, width


def check_prior(
    token: str,
    images: Sequence[Image.Image] | None,
    captions: Sequence[str] | None,
    weight: float,
) -> tuple[list[Image.Image], list[str]]:
    """The prior images and captions to train on: none when the weight is 0 or none are given."""
    if weight == 0 or not images:
        return [], []
    if captions is None or len(captions) != len(images):
        raise ValueError(
            f"got {len(images)} prior images but "
            f"{'no' if captions is None else len(captions)} prior captions"
        )
    for caption in captions:
        if not isinstance(caption, str) or token in caption.split():
            raise ValueError(
                f"a prior caption must be text without the identity's token {token!r}, "
                f"got {caption!r}"
            )
    return [im.convert("RGB") for im in images], list(captions)
