"""`DINOEmbedder`: the CLS token of the original DINO (ViT-B/16 by default), for ablations."""

from __future__ import annotations

from typing import Any

from consistent_char.embedders.cls_token import ClsTokenEmbedder

__all__ = ["DINOEmbedder"]


class DINOEmbedder(ClsTokenEmbedder):
    """Embeds images as the CLS token of a DINO (v1) `transformers.ViTModel` (`ClsTokenEmbedder`).

    The ViT pooler (a randomly initialised dense layer in DINO checkpoints) is not loaded.

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
    MODEL_NAME = "DINO model"

    @classmethod
    def _load_model(cls, source: str) -> Any:
        from transformers import ViTModel

        return ViTModel.from_pretrained(source, add_pooling_layer=False)
