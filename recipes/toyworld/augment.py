"""Pixel augmentations for the DINOv2 and probe stages, and the VAE round trip among them."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from recipes.toyworld.loop import autocast


def to01(images_uint8: torch.Tensor) -> torch.Tensor:
    """``(B, H, W, 3)`` uint8 → ``(B, 3, H, W)`` float in ``[0, 1]``."""
    return images_uint8.permute(0, 3, 1, 2).float().div_(255.0)


def augment(
    x: torch.Tensor,
    gen: torch.Generator,
    *,
    max_shift: float = 0.1,
    scale: tuple[float, float] = (0.87, 1.15),
    flip: bool = True,
) -> torch.Tensor:
    """Random affine (scale, shift, flip), brightness, blur and noise on ``[0, 1]`` images; no
    hue change (colour is identity)."""
    b, device = x.shape[0], x.device

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return torch.rand(b, *shape, generator=gen, device=device) * (hi - lo) + lo

    s = 1.0 / u(*scale)
    sign = torch.where(u(0, 1) < 0.5, -1.0, 1.0) if flip else torch.ones(b, device=device)
    theta = torch.zeros(b, 2, 3, device=device)
    theta[:, 0, 0] = s * sign
    theta[:, 1, 1] = s
    theta[:, 0, 2] = u(-max_shift, max_shift)
    theta[:, 1, 2] = u(-max_shift, max_shift)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    x = x * u(0.85, 1.15, 1, 1, 1) + u(-0.06, 0.06, 1, 1, 1)
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    x = torch.where(u(0, 1, 1, 1, 1) < 0.3, blurred, x)
    noise = torch.randn(x.shape, generator=gen, device=device) * 0.03
    x = x + noise * (u(0, 1, 1, 1, 1) < 0.3)
    return x.clamp_(0.0, 1.0)


def jitter_saturation(x: torch.Tensor, gen: torch.Generator, lo: float, hi: float) -> torch.Tensor:
    """Scales each ``[0, 1]`` image's saturation by a factor drawn from ``[lo, hi]`` (its
    distance from its own grey, per pixel): hue kept, colour strength varied as drawn images
    vary it (a drawn scene is often more saturated than its render)."""
    b = x.shape[0]
    factor = torch.rand(b, 1, 1, 1, generator=gen, device=x.device) * (hi - lo) + lo
    grey = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(
        1, keepdim=True
    )
    return (grey + factor * (x - grey)).clamp_(0.0, 1.0)


@torch.no_grad()
def vae_round_trip(
    vae: Any, x01: torch.Tensor, device: torch.device, bf16: bool = False
) -> torch.Tensor:
    """Encodes and decodes ``[0, 1]`` images: what a generated image's pixels look like."""
    with autocast(device, bf16):
        z = vae.encode(x01 * 2 - 1).latent_dist.mode()
        out = vae.decode(z).sample
    return ((out.float().clamp(-1, 1) + 1) / 2).to(x01.dtype)


def with_round_trip(
    vae: Any | None,
    x01: torch.Tensor,
    fraction: float,
    device: torch.device,
    bf16: bool,
) -> torch.Tensor:
    """`x01` with its first `fraction` sent through the VAE, so that DINOv2 and the probe also
    learn from images with a generated image's pixels."""
    if vae is None or fraction <= 0:
        return x01
    n = int(round(x01.shape[0] * fraction))
    if n == 0:
        return x01
    x01 = x01.clone()
    x01[:n] = vae_round_trip(vae, x01[:n], device, bf16)
    return x01
