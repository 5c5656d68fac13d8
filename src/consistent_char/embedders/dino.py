"""`DINOEmbedder`: the CLS token of the original DINO (ViT-B/16 by default), for ablations."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

from consistent_char.embedders._preprocess import (
    ModelEmbedder,
    check_batch_size,
    resolve_source,
)

if TYPE_CHECKING:
    from transformers import ViTModel


__all__ = ["DINOEmbedder"]


class DINOEmbedder(ModelEmbedder):
    """Embeds images as the CLS token of a DINO (v1) `transformers.ViTModel`.

    The CLS token is ``last_hidden_state[:, 0]``, after the final layer norm; the ViT pooler
    (a randomly initialised dense layer in DINO checkpoints) is never used.

    Args:
        model: A loaded `ViTModel`.
        preprocess: Maps a list of RGB images to a float array of shape (B, 3, H, W).
        batch_size: Images per forward pass.

    Example:
        >>> embedder = DINOEmbedder.from_pretrained("facebook/dino-vitb16")  # doctest: +SKIP
        >>> embedder.embed(images).shape  # doctest: +SKIP
        (128, 768)
    """

    DEFAULT_MODEL_ID = "facebook/dino-vitb16"

    @classmethod
    def from_pretrained(
        cls,
        id_or_dir: str | os.PathLike[str] = DEFAULT_MODEL_ID,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        batch_size: int = 32,
    ) -> DINOEmbedder:
        """Loads a DINO ViT checkpoint from the hub or a folder written by ``save_pretrained``.

        Args:
            id_or_dir: Hub id (default ``facebook/dino-vitb16``) or local folder.
            device: Where the model runs; `None` keeps it on the CPU.
            dtype: Model dtype; `None` is float32. Embeddings are float32 either way.
            batch_size: Images per forward pass.

        Raises:
            FileNotFoundError: A local path that does not exist or holds no ``config.json``.

        Example:
            >>> embedder = DINOEmbedder.from_pretrained("facebook/dino-vits8")  # doctest: +SKIP
        """
        source, is_local = resolve_source(id_or_dir)
        check_batch_size(batch_size)
        from transformers import ViTModel

        model = ViTModel.from_pretrained(source, add_pooling_layer=False)
        return cls._loaded(
            model,
            source,
            is_local=is_local,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            what="DINO model",
        )

    @classmethod
    def from_model(
        cls,
        model: ViTModel,
        processor: Any | None = None,
        image_size: int | None = None,
        *,
        batch_size: int = 32,
    ) -> DINOEmbedder:
        """Wraps an already loaded `ViTModel`.

        Args:
            model: The model; it is put in eval mode, device and dtype are kept.
            processor: A transformers image processor, a callable images -> (B, 3, H, W) array,
                or `None` for resize + center crop + ImageNet normalisation to `image_size`.
            image_size: Crop size of the built-in preprocessing; defaults to
                ``model.config.image_size``.
            batch_size: Images per forward pass.

        Example:
            >>> from transformers import ViTConfig, ViTModel
            >>> model = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1,
            ...     num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=16))
            >>> DINOEmbedder.from_model(model).embedding_dim
            32
        """
        return cls._wrap(model, processor, image_size, batch_size)

    @property
    def embedding_dim(self) -> int:
        """D, the width of the embeddings (the model's hidden size)."""
        return int(self.model.config.hidden_size)

    def _features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The CLS embeddings of a preprocessed batch."""
        return self.model(pixel_values=pixels).last_hidden_state[:, 0]
