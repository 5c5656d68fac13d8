"""Builds the default stages a config names: the one place that maps settings to classes."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from consistent_char.config import TOY_MODEL, ExtractorConfig, RefinerConfig
from consistent_char.errors import InputNotFoundError, InvalidValueError
from consistent_char.interfaces import (
    Clusterer,
    ConvergenceCriterion,
    Embedder,
    Generator,
    Refiner,
)

logger = logging.getLogger(__name__)

DEFAULT_EMBEDDER_MODELS = {
    "dinov2": "facebook/dinov2-large",
    "dino": "facebook/dino-vitb16",
    "clip": "openai/clip-vit-large-patch14",
}


class ModelNotFoundError(InputNotFoundError):
    """A model path or id that cannot be loaded here."""


def hub_offline() -> bool:
    """True when Hugging Face downloads are switched off (``HF_HUB_OFFLINE=1``)."""
    try:
        from huggingface_hub.constants import is_offline_mode
    except ImportError:  # older huggingface_hub
        from huggingface_hub.constants import HF_HUB_OFFLINE

        return bool(HF_HUB_OFFLINE)
    return bool(is_offline_mode())


def check_hub_model(
    repo_id: str,
    filename: str,
    *,
    instead: str = "pass --model with a local diffusers folder (or --model toy)",
) -> None:
    """Offline, a hub id must already be in the local cache: checked before anything loads, so
    the error says what to do instead of surfacing from deep inside the loader.

    Args:
        repo_id: The hub id.
        filename: A file every snapshot of such a model has (``model_index.json``).
        instead: What the user can do instead of downloading, for the message.

    Raises:
        ModelNotFoundError: `filename` of `repo_id` is not cached and downloads are off.
    """
    if not hub_offline():
        return
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename)
    except ValueError:  # not a valid repo id
        found = None
    if not isinstance(found, str):
        raise ModelNotFoundError(
            f"model {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 "
            f"forbids downloading it: download it once with network access "
            f"(huggingface-cli download {repo_id}), unset HF_HUB_OFFLINE, or {instead}"
        )


def resolve_device(device: str) -> torch.device:
    """``"auto"`` is CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InvalidValueError(
            f"device {device!r} is not a torch device; use auto, cpu, cuda or cuda:N"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidValueError(
            f"device {device!r} asked for CUDA, but torch sees no CUDA device; use --device cpu"
        )
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``"auto"`` is bfloat16 on CUDA (SDXL's VAE overflows in float16) and float32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


def resolve_model(model: str, *, kind: str = "pipeline") -> str:
    """Maps ``"toy"`` to ToyWorld's shipped weights and checks that local paths exist.

    A value that exists on disk is a local folder; one that looks like a path (starts with
    ``/``, ``.`` or ``~``, or has more than one ``/``) but does not exist is an error here,
    before anything loads. Anything else is passed on as a hub id.
    """
    if not isinstance(model, str) or not model.strip():
        raise InvalidValueError(
            f"the model must be a hub id, a local folder or 'toy', got {model!r}"
        )
    if model == TOY_MODEL:
        from consistent_char import toy

        toy_dirs = {"pipeline": toy.model_dir, "controlnet": toy.controlnet_dir}
        return str(toy_dirs.get(kind, toy.embedder_dir)())
    expanded = os.path.expanduser(model)
    if Path(expanded).exists():
        return expanded
    if model.startswith(("/", ".", "~")) or model.count("/") > 1:
        raise ModelNotFoundError(f"model folder not found: {model}")
    if kind == "pipeline":
        check_hub_model(model, "model_index.json")
    elif kind == "controlnet":
        check_hub_model(model, "config.json", instead="pass a local folder of the ControlNet")
    else:
        check_hub_model(
            model, "config.json", instead="set embedder.model to a local folder of the model"
        )
    return model


def build_refiner(settings: RefinerConfig, pipeline: Any, **overrides: Any) -> Any:
    """The default refiner on a loaded pipeline: `RefinerConfig`'s fields are
    `TextualInversionLoRARefiner`'s settings, name for name (`overrides` replace some)."""
    from consistent_char.refiners.ti_lora import TextualInversionLoRARefiner

    return TextualInversionLoRARefiner.from_config(pipeline, settings, **overrides)


def build_stages(
    config: ExtractorConfig, *, warn: bool = True
) -> tuple[Generator, Embedder, Clusterer, Refiner, ConvergenceCriterion]:
    """Loads the models and builds the five default stages of `config`.

    With `warn`, the config's `ExtractorConfig.warnings` (e.g. K = 1) are logged first; the CLI
    prints them itself.
    """
    from consistent_char.clusterers.faiss_kmeans import FaissKMeansClusterer
    from consistent_char.convergence import PairwiseDistanceCriterion
    from consistent_char.generators.sdxl import SDXLGenerator

    for warning in config.warnings() if warn else []:
        logger.warning(warning)
    device = resolve_device(config.device)
    # Cheap, and its FAISS check (clusterer.use_gpu) comes before any model loads.
    clusterer = FaissKMeansClusterer(
        niter=config.clusterer.niter,
        nredo=config.clusterer.nredo,
        spherical=config.clusterer.distance == "cosine",
        use_gpu=config.clusterer.use_gpu,
    )
    dtype = resolve_dtype(config.dtype, device)
    model = resolve_model(config.model)
    embedder_model = config.embedder.model or DEFAULT_EMBEDDER_MODELS.get(config.embedder.kind, "")
    if config.embedder.kind != "pixels":
        embedder_model = resolve_model(embedder_model, kind="embedder")

    logger.info("loading %s on %s (%s)", model, device, dtype)
    # GeneratorConfig's fields are SDXLGenerator's settings, name for name.
    generator = SDXLGenerator.from_pretrained(
        model, device=device, dtype=dtype, **config.generator.model_dump()
    )
    refiner = build_refiner(config.refiner, generator.pipeline)
    embedder = build_embedder(
        config.embedder.kind, embedder_model, device=device, batch_size=config.embedder.batch_size
    )
    criterion = PairwiseDistanceCriterion(
        d_conv=config.convergence.d_conv, d_conv_relative=config.convergence.d_conv_relative
    )
    return generator, embedder, clusterer, refiner, criterion


def build_embedder(kind: str, model: str, *, device: torch.device, batch_size: int) -> Embedder:
    """The embedder of `kind` ("dinov2", "dino", "clip", "pixels") loaded from `model`."""
    kwargs: dict[str, Any] = {"device": device, "batch_size": batch_size}
    if kind == "dinov2":
        from consistent_char.embedders.dinov2 import DINOv2Embedder

        return DINOv2Embedder.from_pretrained(model, **kwargs)
    if kind == "dino":
        from consistent_char.embedders.dino import DINOEmbedder

        return DINOEmbedder.from_pretrained(model, **kwargs)
    if kind == "clip":
        from consistent_char.embedders.clip import CLIPImageEmbedder

        return CLIPImageEmbedder.from_pretrained(model, **kwargs)
    if kind == "pixels":
        from consistent_char.embedders.pixels import PixelEmbedder

        return PixelEmbedder()
    raise InvalidValueError(f"unknown embedder kind {kind!r}; known: dinov2, dino, clip, pixels")
