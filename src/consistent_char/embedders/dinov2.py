"""`DINOv2Embedder`: the paper's image embedding, the CLS token of DINOv2 (ViT-L/14 by default)."""

from __future__ import annotations

from typing import Any

from consistent_char.embedders.cls_token import ClsTokenEmbedder

__all__ = ["DINOv2Embedder"]


class DINOv2Embedder(ClsTokenEmbedder):
    """Embeds images as the CLS token of a `transformers.Dinov2Model` (`ClsTokenEmbedder`).

    Preprocessing is the checkpoint's own (resize 256, center crop 224 for the hub's DINOv2). A
    local folder without ``preprocessor_config.json`` falls back to resize + center crop at the
    config's ``image_size`` (518 for the hub's configs), which gives other embeddings: a warning
    names the folder and the size used. Save the processor next to the model to avoid it.

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
    MODEL_NAME = "DINOv2 model"

    @classmethod
    def _load_model(cls, source: str) -> Any:
        from transformers import Dinov2Model

        return Dinov2Model.from_pretrained(source)
