"""`CLIPImageEmbedder`: CLIP's projected image embedding, an alternative to DINO features."""

from __future__ import annotations

import os
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from consistent_char.embedders._preprocess import (
    BATCH_SIZE,
    CLIP_MEAN,
    CLIP_STD,
    ModelEmbedder,
    ResizeCropNormalize,
    check_batch_size,
    resolve_source,
)

if TYPE_CHECKING:
    from transformers import CLIPVisionModelWithProjection


__all__ = ["CLIPImageEmbedder"]

# CLIP's own transform: shortest edge to the crop size, center crop, CLIP mean and std.
_clip_fallback = partial(ResizeCropNormalize, mean=CLIP_MEAN, std=CLIP_STD, resize_ratio=1.0)


class CLIPImageEmbedder(ModelEmbedder):
    """Embeds images with the CLIP image tower: ``image_embeds`` of
    `transformers.CLIPVisionModelWithProjection` (projected, not normalised).

    Args:
        model: A loaded `CLIPVisionModelWithProjection`.
        preprocess: Maps a list of RGB images to a float array of shape (B, 3, H, W).
        batch_size: Images per forward pass.

    Example:
        >>> embedder = CLIPImageEmbedder.from_pretrained()  # doctest: +SKIP
        >>> embedder.embed(images).shape  # doctest: +SKIP
        (128, 768)
    """

    DEFAULT_MODEL_ID = "openai/clip-vit-large-patch14"
    fallback_preprocess = _clip_fallback

    @classmethod
    def from_pretrained(
        cls,
        id_or_dir: str | os.PathLike[str] = DEFAULT_MODEL_ID,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        batch_size: int = BATCH_SIZE,
    ) -> CLIPImageEmbedder:
        """Loads the vision tower and projection of a CLIP checkpoint (a full `CLIPModel`
        checkpoint works too: only its vision half is read).

        Args:
            id_or_dir: Hub id (default ``openai/clip-vit-large-patch14``) or local folder.
            device: Where the model runs; `None` keeps it on the CPU.
            dtype: Model dtype; `None` is float32. Embeddings are float32 either way.
            batch_size: Images per forward pass.

        Raises:
            FileNotFoundError: A local path that does not exist or holds no ``config.json``.

        Example:
            >>> embedder = CLIPImageEmbedder.from_pretrained(
            ...     "openai/clip-vit-base-patch32"
            ... )  # doctest: +SKIP
        """
        source, is_local = resolve_source(id_or_dir)
        check_batch_size(batch_size)
        from transformers import AutoConfig, CLIPConfig, CLIPVisionModelWithProjection

        config: Any = AutoConfig.from_pretrained(source)
        if isinstance(config, CLIPConfig):
            # A full CLIP checkpoint: its projection width is a top-level field that the vision
            # sub-config may lack, and the projection would then be re-initialised at 512.
            vision_config: Any = config.vision_config
            vision_config.projection_dim = config.projection_dim
            config = vision_config
        model = CLIPVisionModelWithProjection.from_pretrained(source, config=config)
        return cls._loaded(
            model,
            source,
            is_local=is_local,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            what="CLIP model",
        )

    @classmethod
    def from_model(
        cls,
        model: CLIPVisionModelWithProjection,
        processor: Any | None = None,
        image_size: int | None = None,
        *,
        batch_size: int = BATCH_SIZE,
    ) -> CLIPImageEmbedder:
        """Wraps an already loaded `CLIPVisionModelWithProjection`.

        Args:
            model: The model; it is put in eval mode, device and dtype are kept.
            processor: A transformers image processor (or `CLIPProcessor`), a callable
                images -> (B, 3, H, W) array, or `None` for CLIP's resize + center crop +
                normalisation to `image_size`.
            image_size: Crop size of the built-in preprocessing; defaults to
                ``model.config.image_size``.
            batch_size: Images per forward pass.

        Example:
            >>> from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
            >>> model = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32,
            ...     intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            ...     image_size=32, patch_size=16, projection_dim=16))
            >>> CLIPImageEmbedder.from_model(model).embedding_dim
            16
        """
        return cls._wrap(model, processor, image_size, batch_size)

    @property
    def embedding_dim(self) -> int:
        """D, the width of the embeddings (the projection dimension)."""
        return int(self.model.config.projection_dim)

    def _features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The projected image embeddings of a preprocessed batch."""
        return self.model(pixel_values=pixels).image_embeds
