"""`DINOv2Embedder`: the paper's image embedding, the CLS token of DINOv2 (ViT-L/14 by default)."""

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
    from transformers import Dinov2Model


__all__ = ["DINOv2Embedder"]


class DINOv2Embedder(ModelEmbedder):
    """Embeds images as the CLS token of a `transformers.Dinov2Model`.

    The CLS token is taken from ``last_hidden_state[:, 0]``, i.e. after the final layer norm, as
    in the DINOv2 paper's linear-probe features.

    Args:
        model: A loaded `Dinov2Model` (or any module whose output has ``last_hidden_state``).
        preprocess: Maps a list of RGB images to a float array of shape (B, 3, H, W).
        batch_size: Images per forward pass.

    Example:
        >>> embedder = DINOv2Embedder.from_pretrained("facebook/dinov2-large")  # doctest: +SKIP
        >>> embedder.embed(images).shape  # doctest: +SKIP
        (128, 1024)
    """

    DEFAULT_MODEL_ID = "facebook/dinov2-large"

    @classmethod
    def from_pretrained(
        cls,
        id_or_dir: str | os.PathLike[str] = DEFAULT_MODEL_ID,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        batch_size: int = 32,
    ) -> DINOv2Embedder:
        """Loads a DINOv2 checkpoint from the hub or a folder written by ``save_pretrained``.

        Args:
            id_or_dir: Hub id (default ``facebook/dinov2-large``) or local folder.
            device: Where the model runs; `None` keeps it on the CPU.
            dtype: Model dtype (e.g. ``torch.float16`` on a GPU); `None` is float32. Embeddings
                are returned as float32 either way.
            batch_size: Images per forward pass.

        Raises:
            FileNotFoundError: A local path that does not exist or holds no ``config.json``.

        Example:
            >>> embedder = DINOv2Embedder.from_pretrained(
            ...     "path/to/dinov2", device="cuda", dtype="float16"
            ... )  # doctest: +SKIP
        """
        source, is_local = resolve_source(id_or_dir)
        check_batch_size(batch_size)
        from transformers import Dinov2Model

        model = Dinov2Model.from_pretrained(source)
        return cls._loaded(
            model,
            source,
            is_local=is_local,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            what="DINOv2 model",
        )

    @classmethod
    def from_model(
        cls,
        model: Dinov2Model,
        processor: Any | None = None,
        image_size: int | None = None,
        *,
        batch_size: int = 32,
    ) -> DINOv2Embedder:
        """Wraps an already loaded model, e.g. one that is also used elsewhere.

        Args:
            model: The `Dinov2Model`; it is put in eval mode, device and dtype are kept.
            processor: A transformers image processor, a callable images -> (B, 3, H, W) array,
                or `None` for resize + center crop + ImageNet normalisation to `image_size`.
            image_size: Crop size of the built-in preprocessing; defaults to
                ``model.config.image_size``.
            batch_size: Images per forward pass.

        Example:
            >>> from transformers import Dinov2Config, Dinov2Model
            >>> model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1,
            ...     num_attention_heads=2, intermediate_size=64, image_size=28, patch_size=14))
            >>> DINOv2Embedder.from_model(model).embedding_dim
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
