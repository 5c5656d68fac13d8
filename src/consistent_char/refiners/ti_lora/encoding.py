"""The training images as SDXL latents, encoded once per `refine` (the VAE is frozen)."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

#: At most this many images per VAE encoder call when the training latents are computed...
ENCODE_BATCH = 8
#: ...and at most this many pixels (one 1024² image). The encoder's activations grow with the
#: pixels: eight 1024² images at once took an estimated 10 GiB above the weights, more than
#: a training step's activations (benchmarks/memory.py), for a once-per-refine cost.
ENCODE_PIXELS = 1024 * 1024


@torch.no_grad()
def encode_images(pipe: Any, images: list[Image.Image], height: int, width: int) -> torch.Tensor:
    """The VAE's posterior means of `images` at `height` x `width`, scaled (and shifted, for a
    VAE that names latents_mean and latents_std) as the UNet's latents are; float32."""
    vae = pipe.vae
    pixels = pipe.image_processor.preprocess(
        [im.convert("RGB") for im in images], height=height, width=width
    )
    original_dtype = vae.dtype
    # As the pipeline does for decoding: SDXL's VAE overflows in float16.
    upcast = original_dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        vae.to(torch.float32)
    per_call = _encode_batch(height, width)
    try:
        chunks = []
        for start in range(0, len(images), per_call):
            batch = pixels[start : start + per_call].to(vae.device, vae.dtype)
            # The posterior mean, not a sample: the UNet learned the distribution of clean
            # latents, and a VAE with a wide posterior (ToyWorld's: std 0.24 against a
            # latent spread of 2.7) would otherwise teach the identity a noisy look.
            chunks.append(vae.encode(batch).latent_dist.mode().float())
        latents = torch.cat(chunks)
    finally:
        if upcast:
            vae.to(original_dtype)
    config = vae.config
    mean = getattr(config, "latents_mean", None)
    std = getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, latents.shape[1], 1, 1)
        mean_t = torch.tensor(mean, device=latents.device).view(shape)
        std_t = torch.tensor(std, device=latents.device).view(shape)
        return (latents - mean_t) * config.scaling_factor / std_t
    return latents * config.scaling_factor


def _encode_batch(height: int, width: int) -> int:
    """Images per VAE encoder call at `height` x `width`: `ENCODE_BATCH`, fewer for large images
    so that a call holds at most `ENCODE_PIXELS` (never fewer than one)."""
    return max(1, min(ENCODE_BATCH, ENCODE_PIXELS // (height * width)))
