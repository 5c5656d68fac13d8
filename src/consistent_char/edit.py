"""Local editing with an identity: the character drawn into a region of an existing image.

The paper's local-editing application uses Blended Latent Diffusion (Avrahami et al., 2023): at
each denoising step, the latents outside the mask are replaced by the input image's latents noised
to that step, so only the masked region is generated, and it is generated to fit its
surroundings. diffusers' `StableDiffusionXLInpaintPipeline` does exactly this when its UNet is a
plain 4-channel text-to-image UNet (not an inpainting UNet with 9 input channels), so any SDXL
model works, the toy model included. The VAE's round trip still changes pixels outside the mask a
little, so the result is composited with the input there: outside the mask the image is unchanged.

Example:
    >>> from PIL import Image
    >>> from consistent_char.edit import blended_edit, EditConfig
    >>> from consistent_char.generators.sdxl import SDXLGenerator
    >>> from consistent_char.testing import tiny_identity, tiny_sdxl_pipeline
    >>> pipe = tiny_sdxl_pipeline()
    >>> fox = tiny_identity(pipe, "<fox>")
    >>> gen = SDXLGenerator.from_pipeline(pipe, num_inference_steps=2)
    >>> scene = Image.new("RGB", (32, 32), "skyblue")
    >>> box = Image.new("L", (32, 32), 0)
    >>> box.paste(255, (8, 8, 24, 24))
    >>> edited = blended_edit(gen, [scene], [box], ["<fox> in the snow"], [0], fox)
    >>> edited[0].getpixel((0, 0)) == scene.getpixel((0, 0))
    True
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from consistent_char.config import EditConfig
from consistent_char.errors import InputFileError, InputNotFoundError, InvalidValueError
from consistent_char.identity import Identity

if TYPE_CHECKING:
    from consistent_char.generators.sdxl import SDXLGenerator

__all__ = [
    "EditConfig",
    "binary_mask",
    "blended_edit",
    "check_image",
    "composite",
    "inpainting_pipeline",
    "read_image",
]

#: Mask modes accepted: grey levels, black and white, or colour (read as grey levels).
MASK_MODES = ("L", "1", "RGB")
#: SDXL pipelines need image sides divisible by this.
SIDE_MULTIPLE = 8


def read_image(path: str | os.PathLike[str], what: str = "the image") -> Image.Image:
    """Reads an image file completely (the file is closed after).

    Raises:
        InputNotFoundError: No file at `path`.
        InputFileError: A file that is not an image PIL can read.
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{what} {path} not found")
    try:
        with Image.open(path) as opened:
            opened.load()
            return opened.copy()
    except (OSError, ValueError) as err:
        raise InputFileError(f"{what} {path} is not an image PIL can read ({err})") from None


def check_image(image: Any, what: str = "the image") -> Image.Image:
    """`image` as RGB, after checking that it is a PIL image whose sides SDXL can draw.

    Raises:
        InvalidValueError: Not a PIL image, or a side not a multiple of 8.
    """
    if not isinstance(image, Image.Image):
        raise InvalidValueError(f"{what} must be a PIL image, got {type(image).__name__}")
    w, h = image.size
    if w % SIDE_MULTIPLE or h % SIDE_MULTIPLE:
        raise InvalidValueError(
            f"{what} is {w}x{h} pixels; SDXL needs sides that are multiples of {SIDE_MULTIPLE}: "
            "crop or resize it"
        )
    return image.convert("RGB")


def binary_mask(mask: Any, size: tuple[int, int], what: str = "the mask") -> np.ndarray:
    """The region to edit as a boolean ``(height, width)`` array: `mask` binarised at 0.5.

    Args:
        mask: A PIL image of mode ``L``, ``1`` or ``RGB`` (read as grey levels); white marks the
            region to edit, black what to keep.
        size: ``(width, height)`` of the image it masks: the mask must have the same size.
        what: How error messages name the mask (the CLI passes its option).

    Raises:
        InvalidValueError: Not a PIL image, another mode, another size, or a mask that selects
            no pixel (nothing to edit) or every pixel (nothing of the image kept).
    """
    if not isinstance(mask, Image.Image):
        raise InvalidValueError(f"{what} must be a PIL image, got {type(mask).__name__}")
    if mask.mode not in MASK_MODES:
        raise InvalidValueError(
            f"{what} has mode {mask.mode}; use a black-and-white or grey-level image "
            f"(modes {', '.join(MASK_MODES)}): white marks the region to edit"
        )
    if mask.size != tuple(size):
        raise InvalidValueError(
            f"{what} is {mask.size[0]}x{mask.size[1]} pixels but the image is "
            f"{size[0]}x{size[1]}: the mask must have the image's size"
        )
    region = np.asarray(mask.convert("L"), dtype=np.uint8) >= 128
    if not region.any():
        raise InvalidValueError(
            f"{what} is empty (no pixel is white, at 0.5): there is no region to edit"
        )
    if region.all():
        raise InvalidValueError(
            f"{what} is full (every pixel is white, at 0.5): nothing of the image would be kept; "
            "to draw a whole new image use generate"
        )
    return region


def latent_block_mask(region: np.ndarray, factor: int) -> Image.Image:
    """`region` grown to whole latent pixels (``factor``×``factor`` blocks), as an ``L`` image.

    The pipeline shrinks the mask to the latents by nearest-neighbour sampling, which drops a
    masked pixel whenever its block's sampled pixel is unmasked: a thin region could vanish.
    Every block that holds a masked pixel is generated instead; the final composite still keeps
    every pixel outside `region`.
    """
    h, w = region.shape
    bh, bw = -(-h // factor), -(-w // factor)
    padded = np.zeros((bh * factor, bw * factor), dtype=bool)
    padded[:h, :w] = region
    blocks = padded.reshape(bh, factor, bw, factor).any(axis=(1, 3))
    grown = blocks.repeat(factor, axis=0).repeat(factor, axis=1)[:h, :w]
    return Image.fromarray(np.where(grown, 255, 0).astype(np.uint8))


def inpainting_pipeline(pipe: Any) -> Any:
    """diffusers' `StableDiffusionXLInpaintPipeline` on `pipe`'s components (shared, not copied).

    With a plain 4-channel UNet it blends latents each step (Blended Latent Diffusion). An
    identity applied to `pipe` is applied to it too: the encoders, tokenizers and UNet are the
    same objects.
    """
    from diffusers import StableDiffusionXLInpaintPipeline

    # Not `from_pipe`: without a dtype it casts the shared components to float32, which would
    # change a bfloat16 pipeline under its owner.
    inpaint = StableDiffusionXLInpaintPipeline(
        **pipe.components,
        # The base model's UNet is conditioned on sizes and crop; the aesthetic score is the
        # refiner's conditioning, whose time ids the base UNet does not take.
        requires_aesthetics_score=False,
        force_zeros_for_empty_prompt=pipe.config.get("force_zeros_for_empty_prompt", True),
        add_watermarker=getattr(pipe, "watermark", None) is not None,
    )
    inpaint.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return inpaint


def blended_edit(
    generator: SDXLGenerator,
    images: Sequence[Image.Image],
    masks: Sequence[Image.Image],
    prompts: Sequence[str],
    seeds: Sequence[int],
    identity: Identity | None = None,
    *,
    strength: float = 1.0,
) -> list[Image.Image]:
    """Redraws the masked region of each image from its prompt, with `identity` applied.

    Image ``j`` is ``images[j]`` with the region ``masks[j]`` marks drawn from ``prompts[j]``,
    starting from ``seeds[j]`` alone (its own CPU ``torch.Generator``), with the generator's
    settings: steps, guidance, sampler, LoRA scale, negative prompt. Its size is the input's
    (the generator's height and width do not apply). Outside the mask every pixel is the input's.

    Args:
        generator: An `SDXLGenerator`; its pipeline's components are shared, not copied.
        images: The images to edit (PIL; sides multiples of 8).
        masks: One mask per image, the same size: white (>= 0.5) is redrawn, black kept.
        prompts: One prompt per image; with an identity, write its token
            (`consistent_char.usage.prompt_with_identity`).
        seeds: One seed per image, ints in ``[0, 2**63)``.
        identity: Applied for this call only (``None``: the plain prompt).
        strength: `EditConfig.strength`: 1 redraws the region from pure noise.

    Returns:
        One RGB image per input.

    Raises:
        InvalidValueError: Lengths that differ, a bad image, mask, prompt, seed or strength.
        IdentityError: The identity does not fit the pipeline.
    """
    # 1. Check inputs
    settings = EditConfig.from_keywords({"strength": strength}, "blended_edit")
    prompt_list, seed_list = generator.check_inputs(prompts, seeds)
    if not len(images) == len(masks) == len(prompt_list):
        raise InvalidValueError(
            f"need one image and one mask per prompt: got {len(images)} images, {len(masks)} "
            f"masks and {len(prompt_list)} prompts"
        )
    rgb = [check_image(im, f"images[{j}]") for j, im in enumerate(images)]
    regions = [
        binary_mask(m, im.size, f"masks[{j}]")
        for j, (m, im) in enumerate(zip(masks, rgb, strict=True))
    ]
    if identity is not None:
        identity.check_fits(generator.pipeline)

    # 2. Draw the masked regions, batch by batch, with the identity applied
    edited: list[Image.Image] = []
    with generator.applied(identity):
        inpaint = inpainting_pipeline(generator.pipeline)
        inpaint.set_progress_bar_config(disable=not generator.show_progress)
        for batch in _batches([im.size for im in rgb], generator.batch_size or 8):
            edited += _inpaint(
                inpaint,
                generator,
                [rgb[j] for j in batch],
                [regions[j] for j in batch],
                [prompt_list[j] for j in batch],
                [seed_list[j] for j in batch],
                settings.strength,
            )

    # 3. Keep every pixel outside the mask
    return [composite(im, out, r) for im, out, r in zip(rgb, edited, regions, strict=True)]


def _batches(sizes: list[tuple[int, int]], cap: int) -> list[list[int]]:
    """Consecutive indices in batches of at most `cap` images of one size (a pipeline call
    draws one size)."""
    batches: list[list[int]] = []
    for j, size in enumerate(sizes):
        if batches and len(batches[-1]) < cap and sizes[batches[-1][0]] == size:
            batches[-1].append(j)
        else:
            batches.append([j])
    return batches


def _inpaint(
    inpaint: Any,
    generator: SDXLGenerator,
    images: list[Image.Image],
    regions: list[np.ndarray],
    prompts: list[str],
    seeds: list[int],
    strength: float,
) -> list[Image.Image]:
    """One pipeline call on images of one size."""
    width, height = images[0].size
    negative = [generator.negative_prompt] * len(prompts) if generator.negative_prompt else None
    out = inpaint(
        prompt=prompts,
        negative_prompt=negative,
        # One image per prompt: diffusers encodes image j with generator j, so image j depends
        # on its own seed only, whatever the batch.
        image=images,
        mask_image=[latent_block_mask(r, inpaint.vae_scale_factor) for r in regions],
        strength=strength,
        num_inference_steps=generator.num_inference_steps,
        guidance_scale=generator.guidance_scale,
        guidance_rescale=generator.guidance_rescale,
        height=height,
        width=width,
        generator=[torch.Generator(device="cpu").manual_seed(s) for s in seeds],
        output_type="pil",
    )
    return [im.convert("RGB") for im in out.images]


def composite(image: Image.Image, edited: Image.Image, region: np.ndarray) -> Image.Image:
    """`edited` inside `region` and `image` everywhere else (exactly: no blending)."""
    if edited.size != image.size:
        edited = edited.resize(image.size, Image.Resampling.BICUBIC)
    pixels = np.where(region[..., None], np.asarray(edited), np.asarray(image))
    return Image.fromarray(pixels.astype(np.uint8))
