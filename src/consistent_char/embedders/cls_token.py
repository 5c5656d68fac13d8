"""`ClsTokenEmbedder`: the CLS token of a vision transformer, what `DINOv2Embedder` (the paper's
embedding) and `DINOEmbedder` (DINO v1, for ablations) both embed with."""

from __future__ import annotations

import os
from typing import Any, ClassVar

import torch
from typing_extensions import Self

from consistent_char.embedders._preprocess import (
    BATCH_SIZE,
    ModelEmbedder,
    check_batch_size,
    resolve_source,
)

__all__ = ["ClsTokenEmbedder"]


class ClsTokenEmbedder(ModelEmbedder):
    """Embeds images as the CLS token of a transformers vision transformer.

    The CLS token is ``last_hidden_state[:, 0]``, i.e. after the final layer norm, as in the
    DINO and DINOv2 papers' linear-probe features; no pooler layer is used.

    A model family is a subclass naming its default checkpoint (`DEFAULT_MODEL_ID`), what it is
    called in messages (`MODEL_NAME`) and how its checkpoints load (`_load_model`).

    Args:
        model: A loaded model whose output has ``last_hidden_state``.
        preprocess: Maps a list of RGB images to a float array of shape (B, 3, H, W).
        batch_size: Images per forward pass.
    """

    #: The hub id `from_pretrained` loads by default.
    DEFAULT_MODEL_ID: ClassVar[str]
    #: The model family, as messages name it (e.g. "DINOv2 model").
    MODEL_NAME: ClassVar[str]

    @classmethod
    def _load_model(cls, source: str) -> Any:  # pragma: no cover - each family defines its own
        """The model of the checkpoint at `source` (hub id or local folder)."""
        raise NotImplementedError

    @classmethod
    def from_pretrained(
        cls,
        id_or_dir: str | os.PathLike[str] | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        batch_size: int = BATCH_SIZE,
    ) -> Self:
        """Loads a checkpoint from the hub or a folder written by ``save_pretrained``.

        Preprocessing comes from the checkpoint's ``preprocessor_config.json``. A local folder
        without one falls back to resize + center crop + ImageNet normalisation at the model
        config's ``image_size``, with a logged warning: that size need not be the one the model
        was evaluated at (``facebook/dinov2-*`` configs say 518, their processors crop 224), and
        it changes the embeddings.

        Args:
            id_or_dir: Hub id or local folder (default: the class's `DEFAULT_MODEL_ID`).
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
        source, is_local = resolve_source(cls.DEFAULT_MODEL_ID if id_or_dir is None else id_or_dir)
        check_batch_size(batch_size)
        return cls._loaded(
            cls._load_model(source),
            source,
            is_local=is_local,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            what=cls.MODEL_NAME,
        )

    @classmethod
    def from_model(
        cls,
        model: Any,
        processor: Any | None = None,
        image_size: int | None = None,
        *,
        batch_size: int = BATCH_SIZE,
    ) -> Self:
        """Wraps an already loaded model, e.g. one that is also used elsewhere.

        Args:
            model: The model; it is put in eval mode, device and dtype are kept.
            processor: A transformers image processor, a callable images -> (B, 3, H, W) array,
                or `None` for resize + center crop + ImageNet normalisation to `image_size`.
            image_size: Crop size of the built-in preprocessing; defaults to
                ``model.config.image_size``.
            batch_size: Images per forward pass.

        Example:
            >>> from transformers import Dinov2Config, Dinov2Model
            >>> from consistent_char.embedders import DINOv2Embedder
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
