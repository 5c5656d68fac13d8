"""Tiny SDXL-architecture components for tests: the real classes, built from small configs.

Like diffusers' own fast tests (`get_dummy_components` in
``tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl.py``), every model is built from
a config under a fixed `torch.manual_seed`, so two calls with the same seed give bit-identical
weights (and, within one process, identical tokenizers: see `_tokenizer_dir`).
The two text encoders have different widths (32 and 48) so that code mixing up ``clip_l`` and
``clip_g`` fails loudly, as it would on full-size SDXL (768 and 1280).
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from typing import Any, Literal

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from consistent_char.identity import Identity
from consistent_char.tokenizers import build_clip_tokenizer

__all__ = [
    "TINY_WORDS",
    "tiny_clip_vision",
    "tiny_controlnet",
    "tiny_dinov2",
    "tiny_identity",
    "tiny_sdxl_pipeline",
    "tiny_vit",
]

#: Words each tiny tokenizer knows as single tokens (others split into characters).
TINY_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "in", "on", "at", "with", "and", "photo", "picture", "drawing",
    "person", "character", "creature", "cat", "dog", "fox", "robot", "girl", "boy", "man", "woman",
    "red", "green", "blue", "yellow", "white", "black", "hat", "scarf", "big", "small",
    "snow", "forest", "beach", "city", "night", "park", "street", "standing", "sitting",
    "running", "cartoon", "style", "portrait", "background",
)  # fmt: skip

TEXT_ENCODER_WIDTH = 32
TEXT_ENCODER_2_WIDTH = 48
PROJECTION_DIM = 32
ADDITION_TIME_EMBED_DIM = 8


def tiny_sdxl_pipeline(
    seed: int = 0,
    directory: str | os.PathLike[str] | None = None,
    *,
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon",
) -> StableDiffusionXLPipeline:
    """Builds a tiny, randomly initialised `StableDiffusionXLPipeline` that draws 32×32 images.

    Args:
        seed: Seeds `torch.manual_seed` for the weights; the global RNG state is restored after.
        directory: If given, the pipeline is written there with `save_pretrained` and read back with
            `StableDiffusionXLPipeline.from_pretrained`, so callers exercise the real loading path.
        prediction_type: The scheduler's prediction type (``"epsilon"`` or ``"v_prediction"``).

    Returns:
        The pipeline on CPU in float32, progress bar disabled.

    Example:
        >>> from consistent_char.testing.tiny import tiny_sdxl_pipeline
        >>> pipe = tiny_sdxl_pipeline(seed=0)
        >>> pipe("a photo of a cat", num_inference_steps=2, output_type="pil").images[0].size
        (32, 32)
    """
    tokenizer = CLIPTokenizer.from_pretrained(_tokenizer_dir())
    tokenizer_2 = CLIPTokenizer.from_pretrained(_tokenizer_dir())

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # Built in this order from one seed: the order fixes which random numbers each gets.
        unet = _tiny_unet()
        scheduler = _tiny_scheduler(prediction_type)
        vae = _tiny_vae()
        text_encoder = CLIPTextModel(_text_config(tokenizer, TEXT_ENCODER_WIDTH))
        text_encoder_2 = CLIPTextModelWithProjection(
            _text_config(tokenizer_2, TEXT_ENCODER_2_WIDTH)
        )

    pipe: Any = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
    )
    if directory is not None:
        pipe.save_pretrained(str(directory))
        pipe = StableDiffusionXLPipeline.from_pretrained(str(directory))
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_training_images(pipe: Any, n: int = 4, prompt: str = "a red cat") -> list[Any]:
    """`n` PIL images `pipe` draws for `prompt` in 2 steps, image `i` from seed `i` on the
    pipeline's device: training images for a refiner test.

    Example:
        >>> len(tiny_training_images(tiny_sdxl_pipeline(seed=0), n=2))
        2
    """
    generators = [torch.Generator(pipe.device).manual_seed(i) for i in range(n)]
    images: list[Any] = pipe(
        [prompt] * n, num_inference_steps=2, generator=generators, output_type="pil"
    ).images
    return images


def _tiny_unet() -> UNet2DConditionModel:
    """SDXL's UNet layout (text-time added embedding, both encoders' widths as cross-attention
    width) at two small blocks."""
    return UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=ADDITION_TIME_EMBED_DIM,
        transformer_layers_per_block=(1, 1),
        # SDXL: 6 size/crop ids embedded at ADDITION_TIME_EMBED_DIM each, plus the pooled text.
        projection_class_embeddings_input_dim=6 * ADDITION_TIME_EMBED_DIM + PROJECTION_DIM,
        # SDXL concatenates both encoders' hidden states.
        cross_attention_dim=TEXT_ENCODER_WIDTH + TEXT_ENCODER_2_WIDTH,
        norm_num_groups=8,
    )


def tiny_controlnet(
    pipe: Any, seed: int = 0, directory: str | os.PathLike[str] | None = None
) -> Any:
    """A ControlNet made from the tiny pipeline's UNet, whose outputs are *not* zero (a fresh
    ControlNet's are, and would not change an image), so tests can see it steer.

    Its conditioning embedding halves the control image once: the tiny VAE's factor (32 px
    images, 16 px latents). With `directory`, it is saved there and read back.
    """
    from diffusers import ControlNetModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(8, 16))
        zero_convs = [
            *net.controlnet_down_blocks,
            net.controlnet_mid_block,
            net.controlnet_cond_embedding.conv_out,
        ]
        with torch.no_grad():
            for conv in zero_convs:
                conv.weight.normal_(0.0, 0.2)
    if directory is not None:
        net.save_pretrained(str(directory))
        net = ControlNetModel.from_pretrained(str(directory))
    return net.eval()


def _tiny_scheduler(
    prediction_type: Literal["epsilon", "v_prediction"],
) -> EulerDiscreteScheduler:
    """SDXL's scheduler settings."""
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type=prediction_type,
    )


def _tiny_vae() -> AutoencoderKL:
    """A two-block VAE with SDXL's 4 latent channels (32 px images, 16 px latents)."""
    return AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )


@functools.cache
def _tokenizer_dir() -> str:
    # The BPE trainer behind build_clip_tokenizer breaks ties in its own (hash) order, so two
    # builds can number the vocabulary differently; building once per process keeps every tiny
    # pipeline of a process tokenizing alike (and seed-for-seed identical).
    directory = tempfile.mkdtemp(prefix="consistent_char_tiny_tokenizer_")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    build_clip_tokenizer(TINY_WORDS, directory)
    return directory


def _text_config(tokenizer: object, width: int) -> CLIPTextConfig:
    # Real ids from the tokenizer: transformers' CLIP pools at the first `eos_token_id` (its
    # legacy argmax rule only applies when eos_token_id == 2).
    return CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,  # type: ignore[attr-defined]
        eos_token_id=tokenizer.eos_token_id,  # type: ignore[attr-defined]
        pad_token_id=tokenizer.pad_token_id,  # type: ignore[attr-defined]
        vocab_size=len(tokenizer),  # type: ignore[arg-type]
        hidden_size=width,
        intermediate_size=2 * width,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        layer_norm_eps=1e-5,
        hidden_act="gelu",
        projection_dim=PROJECTION_DIM,
    )


def tiny_identity(
    pipe: StableDiffusionXLPipeline,
    token: str = "<tiny>",
    seed: int = 0,
    *,
    num_vectors: int = 1,
    lora_rank: int = 4,
    lora_alpha: float | None = None,
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0"),
    with_lora: bool = True,
    scale: float = 0.5,
) -> Identity:
    """A random `Identity` that fits `pipe`: right embedding widths and a LoRA matching its UNet.

    The LoRA's ``lora_B`` is random too (peft initialises it to zero), so the identity visibly
    changes images; `scale` is the standard deviation of all random values.

    Args:
        pipe: The pipeline the identity is for (widths and LoRA shapes are read from it).
        token: The identity's token.
        seed: Seeds a private `torch.Generator`; the global RNG is untouched.
        num_vectors: Rows per text encoder.
        lora_rank: LoRA rank ``r``.
        lora_alpha: LoRA alpha (defaults to `lora_rank`).
        target_modules: UNet module name suffixes the LoRA wraps.
        with_lora: False gives a textual-inversion-only identity.
        scale: Standard deviation of the random values.

    Example:
        >>> pipe = tiny_sdxl_pipeline()
        >>> identity = tiny_identity(pipe, "<fox>", seed=1)
        >>> identity.clip_l.shape, identity.clip_g.shape
        (torch.Size([1, 32]), torch.Size([1, 48]))
    """
    sdxl: Any = pipe  # diffusers registers components at run time, unseen by type checkers
    gen = torch.Generator().manual_seed(seed)
    width_l = sdxl.text_encoder.get_input_embeddings().weight.shape[1]
    width_g = sdxl.text_encoder_2.get_input_embeddings().weight.shape[1]
    clip_l = torch.randn(num_vectors, width_l, generator=gen) * scale
    clip_g = torch.randn(num_vectors, width_g, generator=gen) * scale
    lora = _random_lora(sdxl.unet, target_modules, lora_rank, gen, scale) if with_lora else None
    return Identity(
        token=token,
        clip_l=clip_l,
        clip_g=clip_g,
        lora=lora,
        lora_rank=lora_rank,
        lora_alpha=float(lora_rank if lora_alpha is None else lora_alpha),
        target_modules=list(target_modules),
        metadata={"made_by": "consistent_char.testing.tiny_identity", "seed": seed},
    )


def _random_lora(
    unet: Any, target_modules: tuple[str, ...], rank: int, gen: torch.Generator, scale: float
) -> dict[str, torch.Tensor]:
    """Random ``lora_A``/``lora_B`` weights (peft's key names) for every linear layer of `unet`
    whose name ends with one of `target_modules`."""
    lora = {}
    for name, module in unet.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if not any(name == t or name.endswith("." + t) for t in target_modules):
            continue
        a = torch.randn(rank, module.in_features, generator=gen)
        b = torch.randn(module.out_features, rank, generator=gen)
        lora[f"{name}.lora_A.weight"], lora[f"{name}.lora_B.weight"] = a * scale, b * scale
    return lora


def tiny_dinov2(
    seed: int = 0, directory: str | os.PathLike[str] | None = None, image_size: int = 28
) -> Any:
    """A tiny random `transformers.Dinov2Model` (`image_size` input, 28 by default; width 32),
    saved to and loaded from `directory` when given, for tests of the DINOv2 embedder's real
    loading path."""
    from transformers import Dinov2Config, Dinov2Model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Dinov2Model(
            Dinov2Config(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                mlp_ratio=2,
                image_size=image_size,
                patch_size=14,
            )
        ).eval()
    if directory is None:
        return model
    model.save_pretrained(str(directory))
    return Dinov2Model.from_pretrained(str(directory)).eval()


def tiny_vit(seed: int = 0) -> Any:
    """A tiny random `transformers.ViTModel` without pooler (DINOv1's architecture; 32×32
    input, width 32), for tests of `DINOEmbedder`."""
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ViTModel(config, add_pooling_layer=False).eval()


def tiny_clip_vision(seed: int = 0) -> Any:
    """A tiny random `CLIPVisionModelWithProjection` (32×32 input, width 32, projection 16), for
    tests of `CLIPImageEmbedder`."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=16,
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPVisionModelWithProjection(config).eval()
