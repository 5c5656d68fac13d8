"""`PixelEmbedder`: downsampled raw pixels, a model-free baseline for ablations."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from consistent_char.embedders._preprocess import check_images

__all__ = ["PixelEmbedder"]


@dataclass(frozen=True)
class PixelEmbedder:
    """Embeds an image as its pixels, box-downsampled to ``size`` x ``size`` and flattened.

    Values are in [0, 1]. No model, no download: the baseline that shows what a learned
    embedding adds (pixels mostly measure colour and layout, not identity).

    Args:
        size: Side of the downsampled square image.
        grayscale: One channel instead of three.

    Example:
        >>> from PIL import Image
        >>> PixelEmbedder(size=4).embed([Image.new("RGB", (32, 32), "red")]).shape
        (1, 48)
    """

    size: int = 16
    grayscale: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"size must be an integer >= 1, got {self.size!r}")

    @property
    def embedding_dim(self) -> int:
        """D = size * size * channels."""
        return self.size * self.size * (1 if self.grayscale else 3)

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Returns float32 pixels of shape (len(images), D)."""
        out = np.empty((len(images), self.embedding_dim), dtype=np.float32)
        for i, image in enumerate(check_images(images)):
            if self.grayscale:
                image = image.convert("L")
            small = image.resize((self.size, self.size), resample=Image.Resampling.BOX)
            out[i] = np.asarray(small, dtype=np.float32).reshape(-1) / 255.0
        return out
