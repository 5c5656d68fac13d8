"""Builders, from configs alone (nothing is downloaded), of ToyWorld's models.

- a tiny **SDXL-architecture** pipeline: two CLIP text encoders of different widths (64 and 96,
  so an identity learned on another model is caught by its width) with their own tokenizers, a
  UNet with SDXL's ``text_time`` added conditioning and cross-attention over both encoders'
  concatenated hidden states, an ``AutoencoderKL`` with 4× downsampling (64 px ↔ 16×16×4) and
  SDXL's ``EulerDiscreteScheduler``;
- a tiny **DINOv2** (``transformers.Dinov2Model``) for 64 px images, with its image processor;
- the **identity probe** (defined in `consistent_char.toy.probe`, re-exported here): a small
  CNN with one classification head per attribute, used by evaluation only.

Example:
    >>> import tempfile
    >>> pipe = build_pipeline(tempfile.mkdtemp())  # random weights
    >>> pipe.default_sample_size * pipe.vae_scale_factor
    64
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from consistent_char.toy.captions import VOCABULARY
from consistent_char.toy.data import MAX_CAPTION_WORDS
from consistent_char.toy.probe import VALID, IdentityProbe, ProbeConfig
from consistent_char.toy.world import IMAGE_SIZE

__all__ = [
    "VALID",
    "DINO_MEAN",
    "DINO_STD",
    "IdentityProbe",
    "ProbeConfig",
    "ToyModelConfig",
    "build_dinov2",
    "build_pipeline",
    "build_scheduler",
    "build_text_encoders",
    "build_tokenizers",
    "build_unet",
    "build_vae",
    "save_dinov2",
    "word_token_table",
    "words_to_ids",
]

# ImageNet statistics, as the real DINOv2 processor uses.
DINO_MEAN = (0.485, 0.456, 0.406)
DINO_STD = (0.229, 0.224, 0.225)


@dataclass
class ToyModelConfig:
    """Sizes of the toy text-to-image model (defaults: about 5M parameters in all)."""

    image_size: int = IMAGE_SIZE
    text_width: int = 64
    text_width_2: int = 96
    text_layers: int = 3
    text_heads: int = 4
    unet_channels: tuple[int, ...] = (64, 128)
    unet_heads: tuple[int, ...] = (2, 4)
    unet_layers_per_block: int = 2
    addition_time_embed_dim: int = 32
    vae_channels: tuple[int, ...] = (32, 64, 64)
    vae_layers_per_block: int = 1
    latent_channels: int = 4

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_channels) - 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ToyModelConfig:
        kwargs: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in data.items()
        }
        return cls(**kwargs)


# ----------------------------------------------------------------------------- SDXL parts


def build_tokenizers(directory: str | os.PathLike[str]) -> tuple[Any, Any]:
    """Two CLIP tokenizers over ToyWorld's vocabulary, written to ``directory/tokenizer{,_2}``."""
    from consistent_char.tokenizers import build_clip_tokenizer

    root = Path(directory)
    return (
        build_clip_tokenizer(VOCABULARY, root / "tokenizer"),
        build_clip_tokenizer(VOCABULARY, root / "tokenizer_2"),
    )


def word_token_table(tokenizer: Any) -> torch.Tensor:
    """Word index (0 = padding, k = ``VOCABULARY[k - 1]``) → the tokenizer's id for that word."""
    table = [int(tokenizer.pad_token_id)]
    for word in VOCABULARY:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ValueError(f"{word!r} is not a single token of the toy tokenizer: {ids}")
        table.append(int(ids[0]))
    return torch.tensor(table, dtype=torch.long)


def words_to_ids(
    words: torch.Tensor, table: torch.Tensor, bos: int, eos: int, pad: int, length: int = 77
) -> torch.Tensor:
    """``(B, MAX_CAPTION_WORDS)`` word indices → ``(B, length)`` token ids, exactly as the
    pipeline's ``tokenizer(prompt, padding="max_length", max_length=77)`` gives them: captions
    stored as word indices (`consistent_char.toy.data`) are tokenized on the device, in batch."""
    b = words.shape[0]
    ids = torch.full((b, length), pad, dtype=torch.long, device=words.device)
    ids[:, 0] = bos
    ids[:, 1 : 1 + MAX_CAPTION_WORDS] = table[words]
    n = (words > 0).sum(dim=1)
    ids[torch.arange(b, device=words.device), 1 + n] = eos
    return ids


def build_text_encoders(
    tokenizer: Any, tokenizer_2: Any, config: ToyModelConfig | None = None
) -> tuple[Any, Any]:
    """``CLIPTextModel`` (width ``text_width``) and ``CLIPTextModelWithProjection``
    (width ``text_width_2``), with the tokenizers' special ids (the pooled output is read at
    the first end-of-text token, which stays right when tokens are added)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = config or ToyModelConfig()
    encoders = []
    for tok, width, cls in (
        (tokenizer, config.text_width, CLIPTextModel),
        (tokenizer_2, config.text_width_2, CLIPTextModelWithProjection),
    ):
        text_config = CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=width,
            intermediate_size=4 * width,
            projection_dim=width,
            num_hidden_layers=config.text_layers,
            num_attention_heads=config.text_heads,
            max_position_embeddings=tok.model_max_length,
            hidden_act="gelu",
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        encoders.append(cls(text_config))
    return encoders[0], encoders[1]


def build_unet(config: ToyModelConfig | None = None) -> Any:
    """An SDXL-style ``UNet2DConditionModel``: ``text_time`` added conditioning (size and crop
    ids + the second encoder's pooled projection) and cross-attention at every level."""
    from diffusers import UNet2DConditionModel

    config = config or ToyModelConfig()
    levels = len(config.unet_channels)
    return UNet2DConditionModel(
        sample_size=config.latent_size,
        in_channels=config.latent_channels,
        out_channels=config.latent_channels,
        block_out_channels=config.unet_channels,
        down_block_types=("CrossAttnDownBlock2D",) * levels,
        up_block_types=("CrossAttnUpBlock2D",) * levels,
        layers_per_block=config.unet_layers_per_block,
        attention_head_dim=config.unet_heads,
        cross_attention_dim=config.text_width + config.text_width_2,
        transformer_layers_per_block=1,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=config.addition_time_embed_dim,
        # 6 time ids (original size, crop corner, target size) + the pooled text embedding.
        projection_class_embeddings_input_dim=6 * config.addition_time_embed_dim
        + config.text_width_2,
        norm_num_groups=32,
    )


def build_vae(config: ToyModelConfig | None = None, *, scaling_factor: float = 1.0) -> Any:
    """A fully convolutional ``AutoencoderKL`` (no mid-block attention), so it trains on crops."""
    from diffusers import AutoencoderKL

    config = config or ToyModelConfig()
    levels = len(config.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=config.vae_channels,
        layers_per_block=config.vae_layers_per_block,
        latent_channels=config.latent_channels,
        norm_num_groups=32,
        sample_size=config.image_size,
        scaling_factor=scaling_factor,
        force_upcast=False,
        mid_block_add_attention=False,
    )


def build_scheduler() -> Any:
    """``EulerDiscreteScheduler`` with SDXL's configuration."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        timestep_spacing="leading",
        steps_offset=1,
        interpolation_type="linear",
        use_karras_sigmas=False,
    )


def build_pipeline(
    tokenizer_dir: str | os.PathLike[str],
    config: ToyModelConfig | None = None,
    *,
    seed: int = 0,
    scaling_factor: float = 1.0,
) -> Any:
    """A ``StableDiffusionXLPipeline`` of freshly initialised toy components.

    Args:
        tokenizer_dir: Where the two tokenizers are written (``tokenizer/``, ``tokenizer_2/``).
        config: Model sizes.
        seed: Seeds ``torch.manual_seed`` before the weights are drawn.
        scaling_factor: The VAE's latent scaling factor.
    """
    from diffusers import StableDiffusionXLPipeline

    config = config or ToyModelConfig()
    tokenizer, tokenizer_2 = build_tokenizers(tokenizer_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder, text_encoder_2 = build_text_encoders(tokenizer, tokenizer_2, config)
        unet = build_unet(config)
        vae = build_vae(config, scaling_factor=scaling_factor)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=build_scheduler(),
        # Training drops captions by zeroing both embeddings, as SDXL does: the pipeline's
        # unconditional branch is then zeros too.
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


# ----------------------------------------------------------------------------- DINOv2


def build_dinov2(
    *,
    image_size: int = IMAGE_SIZE,
    patch_size: int = 8,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
) -> Any:
    """A tiny ``transformers.Dinov2Model`` (64 px, 8 px patches: 64 tokens + CLS)."""
    from transformers import Dinov2Config, Dinov2Model

    return Dinov2Model(
        Dinov2Config(
            image_size=image_size,
            patch_size=patch_size,
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            mlp_ratio=4,
            layerscale_value=1.0,
        )
    )


def dinov2_processor_config(image_size: int = IMAGE_SIZE) -> dict[str, Any]:
    """The ``preprocessor_config.json`` of the toy DINOv2: resize to 64, ImageNet normalisation."""
    return {
        "image_processor_type": "BitImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": image_size},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(DINO_MEAN),
        "image_std": list(DINO_STD),
        "do_convert_rgb": True,
    }


def save_dinov2(model: Any, directory: str | os.PathLike[str]) -> Path:
    """Writes the model (safetensors) and its ``preprocessor_config.json``."""
    out = Path(directory)
    model.save_pretrained(str(out), safe_serialization=True)
    image_size = int(model.config.image_size)
    (out / "preprocessor_config.json").write_text(
        json.dumps(dinov2_processor_config(image_size), indent=2)
    )
    return out


def dinov2_pixels(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``(N, H, W, 3)`` uint8 (or ``[0, 1]`` NCHW floats) → normalised ``(N, 3, H, W)``, as
    the image processor does at 64 px."""
    x = images if isinstance(images, torch.Tensor) else torch.tensor(images)
    x = x.permute(0, 3, 1, 2).float() / 255.0 if x.dtype == torch.uint8 else x
    mean = torch.tensor(DINO_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(DINO_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
