"""Loading an SDXL-architecture pipeline with the library's device and dtype defaults, and
checking that a pipeline has every SDXL component."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from consistent_char.errors import InputFileError, InputNotFoundError

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLPipeline

__all__ = ["check_sdxl_components", "load_sdxl_pipeline"]

logger = logging.getLogger(__name__)


def check_sdxl_components(pipeline: Any, who: str) -> None:
    """Raises a ValueError naming the first SDXL component (both text encoders, both
    tokenizers, the UNet, the VAE) that `pipeline` lacks; `who` names what needs it."""
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        if getattr(pipeline, name, None) is None:
            raise ValueError(
                f"the pipeline has no {name}: {who} needs an SDXL-architecture pipeline with "
                f"both text encoders, got {type(pipeline).__name__}"
            )


def load_sdxl_pipeline(
    id_or_local_dir: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    variant: str | None = None,
) -> StableDiffusionXLPipeline:
    """Loads a `StableDiffusionXLPipeline` with the library's device and dtype defaults.

    Args:
        id_or_local_dir: A hub id or a folder written by `save_pretrained`.
        device: ``None`` is CUDA when available, else CPU.
        dtype: ``None`` is bfloat16 on CUDA (SDXL's VAE overflows in float16), float32 on CPU.
        variant: The checkpoint variant (e.g. ``"fp16"``), if any.

    Raises:
        FileNotFoundError: A local path that does not exist or holds no ``model_index.json``,
            checked before anything loads.

    Example:
        >>> pipe = load_sdxl_pipeline("runs/toy-model", device="cpu")  # doctest: +SKIP
    """
    from diffusers import StableDiffusionXLPipeline

    source = _check_source(id_or_local_dir)
    torch_device = torch.device(
        device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    if dtype is None:
        dtype = torch.bfloat16 if torch_device.type == "cuda" else torch.float32
    logger.info("loading SDXL pipeline %s (%s on %s)", source, dtype, torch_device)
    try:
        with warnings.catch_warnings():
            # Newer diffusers renamed `torch_dtype` to `dtype`; the old name works on every
            # version this library supports.
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = StableDiffusionXLPipeline.from_pretrained(
                source, torch_dtype=dtype, variant=variant
            )
    except (OSError, ValueError) as err:
        # Missing or damaged weight files, a hub id that does not exist, no network.
        raise InputFileError(
            f"cannot load {source} as an SDXL pipeline ({' '.join(str(err).split())[:400]}); "
            "check the model id or folder, or pass --model with a local diffusers SDXL folder"
        ) from err
    pipe.to(torch_device)
    return pipe


def _check_source(id_or_local_dir: str | os.PathLike[str]) -> str:
    """A local folder must exist and hold a diffusers pipeline; anything else is a hub id."""
    text = os.fspath(id_or_local_dir)
    path = Path(text).expanduser()
    looks_local = (
        isinstance(id_or_local_dir, os.PathLike)
        or text.startswith(("/", ".", "~"))
        or text.count("/") > 1
        or path.exists()
    )
    if not looks_local:
        from consistent_char.stages import check_hub_model

        check_hub_model(text, "model_index.json")
        return text
    if not path.is_dir():
        raise InputNotFoundError(f"SDXL model folder not found: {text}")
    if not (path / "model_index.json").is_file():
        raise InputNotFoundError(
            f"{text} is not a diffusers pipeline folder: no model_index.json in it"
        )
    return str(path)
