"""Writes the trained models in the layout the package ships: ``pipeline/``, ``dinov2/``,
``probe/``."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from consistent_char.toy.models import build_scheduler, save_dinov2
from recipes.toyworld.log import log
from recipes.toyworld.trainer import Trainer

_FOLDERS = ("pipeline", "dinov2", "probe")


def export(trainer: Trainer) -> dict[str, float]:
    """Writes the three folders under ``trainer.out`` (each replaced whole, through a staging
    folder, so a cut export leaves the previous one) and returns their sizes in MB."""
    t = time.perf_counter()
    out = trainer.out
    out.mkdir(parents=True, exist_ok=True)
    staging = out / ".export"
    shutil.rmtree(staging, ignore_errors=True)
    _pipeline(trainer).save_pretrained(str(staging / "pipeline"), safe_serialization=True)
    # diffusers loads fp16 UNet/VAE files back as float32 unless told otherwise, so they
    # ship in half the space; the text encoders stay float32 because transformers keeps the
    # stored dtype.
    for name in ("unet", "vae"):
        for path in (staging / "pipeline" / name).glob("*.safetensors"):
            half = {
                k: v.half() if v.is_floating_point() else v for k, v in load_file(str(path)).items()
            }
            save_file(half, str(path), metadata={"format": "pt"})
    save_dinov2(trainer.dino.float().cpu(), staging / "dinov2")
    trainer.probe.float().cpu().save_pretrained(staging / "probe")
    for name in _FOLDERS:
        target = out / name
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging / name, target)
    shutil.rmtree(staging, ignore_errors=True)
    sizes = {name: _dir_mb(out / name) for name in _FOLDERS}
    sizes["total"] = sum(sizes.values())
    trainer.seconds["export"] = time.perf_counter() - t
    log("export", f"wrote {out}: " + ", ".join(f"{k} {v:.1f} MB" for k, v in sizes.items()))
    return sizes


def _pipeline(trainer: Trainer) -> Any:
    """The SDXL pipeline of the trained VAE, text encoders and UNet, in float32 on the CPU."""
    from diffusers import StableDiffusionXLPipeline

    parts = trainer.unet_parts
    # channels_last (used on CUDA) would reach safetensors as non-contiguous tensors.
    vae = trainer.vae.float().cpu().to(memory_format=torch.contiguous_format)
    vae.register_to_config(scaling_factor=trainer.scaling_factor)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=parts["text_encoder"].float().cpu(),
        text_encoder_2=parts["text_encoder_2"].float().cpu(),
        tokenizer=parts["tokenizer"],
        tokenizer_2=parts["tokenizer_2"],
        unet=parts["unet"].float().cpu().to(memory_format=torch.contiguous_format),
        scheduler=build_scheduler(),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def _dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6
