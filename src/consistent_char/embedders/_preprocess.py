"""What the model-backed embedders share: input checks, model sources, preprocessing, batching.

Preprocessing comes from the checkpoint's own `preprocessor_config.json` when it has one (through
`AutoImageProcessor`, on its PIL backend when torchvision is missing), else from
`ResizeCropNormalize`: a pure numpy/PIL resize, center crop and normalisation.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from typing_extensions import Self

from consistent_char.config import EmbedderConfig

logger = logging.getLogger(__name__)

#: Images per forward pass unless told otherwise: the config's ``embedder.batch_size`` default.
BATCH_SIZE: int = EmbedderConfig.model_fields["batch_size"].default

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSOR_CONFIG = "preprocessor_config.json"

#: Turns a batch of RGB images into a float array of shape (B, 3, H, W).
Preprocess = Callable[[Sequence[Image.Image]], np.ndarray]


def check_images(images: Sequence[Image.Image]) -> list[Image.Image]:
    """Returns `images` as a list of RGB images; raises `TypeError` naming the first bad item."""
    if isinstance(images, Image.Image):
        raise TypeError("embed() takes a sequence of PIL images, got a single PIL image")
    out = []
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise TypeError(f"images[{i}] must be a PIL.Image.Image, got {type(image).__name__}")
        out.append(image if image.mode == "RGB" else image.convert("RGB"))
    return out


@dataclass(frozen=True)
class ResizeCropNormalize:
    """Resize the shortest edge to ``size * resize_ratio``, center crop ``size``, normalise.

    The fallback when a checkpoint ships no preprocessor config. The defaults are the ImageNet
    evaluation transform used by DINO and DINOv2 (resize 256, crop 224, scaled to `size`).

    Example:
        >>> from PIL import Image
        >>> pre = ResizeCropNormalize(size=28)
        >>> pre([Image.new("RGB", (40, 30))]).shape
        (1, 3, 28, 28)
    """

    size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize_ratio: float = 256 / 224
    resample: Image.Resampling = Image.Resampling.BICUBIC

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"size must be a positive number of pixels, got {self.size}")
        if self.resize_ratio < 1.0:
            raise ValueError(
                f"resize_ratio must be >= 1 (crop inside the resize), got {self.resize_ratio}"
            )

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        mean = np.asarray(self.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.std, dtype=np.float32)[:, None, None]
        out = np.empty((len(images), 3, self.size, self.size), dtype=np.float32)
        short = max(self.size, round(self.size * self.resize_ratio))
        for i, image in enumerate(check_images(images)):
            new_w, new_h = _shortest_edge_size(*image.size, short)
            image = image.resize((new_w, new_h), resample=self.resample)
            left, top = (new_w - self.size) // 2, (new_h - self.size) // 2
            image = image.crop((left, top, left + self.size, top + self.size))
            pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
            out[i] = (pixels - mean) / std
        return out


def _shortest_edge_size(width: int, height: int, short: int) -> tuple[int, int]:
    """The size with the shortest edge at `short` and the aspect kept, the long edge truncated
    to whole pixels as transformers' and torchvision's resize do: rounding instead would shift
    the resampling grid, and the crop, by a pixel at some aspect ratios."""
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


class HFImageProcessor:
    """Adapts a transformers image processor to `Preprocess` (numpy ``pixel_values`` out)."""

    def __init__(self, processor: Any) -> None:
        self.processor = getattr(processor, "image_processor", processor)

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        out = self.processor(images=check_images(images), return_tensors="np")
        return np.asarray(out["pixel_values"], dtype=np.float32)

    def __repr__(self) -> str:
        return f"HFImageProcessor({type(self.processor).__name__})"


def as_preprocess(
    processor: Any | None, *, image_size: int | None, fallback: Callable[[int], Preprocess]
) -> Preprocess:
    """Builds the preprocessing for `from_model`: a transformers processor is wrapped, any other
    callable is used as it is, and `None` gives `fallback(image_size)`."""
    if processor is None:
        if image_size is None:
            raise ValueError(
                "image_size is needed for the built-in preprocessing when no processor is given "
                "and the model config has no image_size"
            )
        return fallback(int(image_size))
    from transformers.image_processing_base import ImageProcessingMixin

    inner = getattr(processor, "image_processor", processor)
    if isinstance(inner, ImageProcessingMixin):
        return HFImageProcessor(inner)
    if callable(processor):
        return processor  # type: ignore[no-any-return]
    raise TypeError(
        "processor must be a transformers image processor, a callable mapping images to a "
        f"(B, 3, H, W) array, or None; got {type(processor).__name__}"
    )


def resolve_source(id_or_dir: str | os.PathLike[str]) -> tuple[str, bool]:
    """Returns ``(source, is_local)``; a path that looks local but does not exist is an error.

    Anything given as a `PathLike`, starting with ``/``, ``.`` or ``~``, or with more than one
    ``/`` is a local path; otherwise an existing folder wins over a hub id of the same name.
    """
    text = os.fspath(id_or_dir)
    if not text:
        raise ValueError("model id or directory must be a non-empty string")
    path = Path(text).expanduser()
    looks_local = (
        isinstance(id_or_dir, os.PathLike)
        or text.startswith(("/", ".", "~"))
        or text.count("/") > 1
        or "\\" in text
    )
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} is a folder but has no config.json: expected a model saved with "
                "save_pretrained()"
            )
        return str(path), True
    if path.exists():
        raise NotADirectoryError(f"{path} is a file; expected a model folder or a hub id")
    if looks_local:
        raise FileNotFoundError(
            f"model directory {text!r} does not exist (looked for {path.absolute()})"
        )
    return text, False


def load_preprocess(source: str, *, is_local: bool, fallback: Preprocess, what: str) -> Preprocess:
    """The checkpoint's own image processor when it has one, else `fallback`.

    A local folder without ``preprocessor_config.json`` gets `fallback` with a warning naming the
    folder and the size used: the fallback's size comes from the model config, which need not be
    the size the checkpoint was evaluated at (DINOv2's configs say 518, its processor crops 224),
    and the embeddings depend on it.
    """
    if is_local and not (Path(source) / PREPROCESSOR_CONFIG).is_file():
        size = getattr(fallback, "size", None)
        logger.warning(
            "%s has no %s: preprocessing with the built-in resize + center crop to %s pixels "
            "(the model config's image_size), which changes the embeddings if the model expects "
            "another size; save the model's image processor in that folder to use its own",
            source,
            PREPROCESSOR_CONFIG,
            size if size is not None else "?",
        )
        return fallback
    from transformers import AutoImageProcessor

    kwargs: dict[str, Any] = {}
    # transformers 5 prefers torchvision processors and warns when it falls back to PIL; asking for
    # PIL directly is the same computation without the warning. transformers 4 has no `backend`.
    if _transformers_major() >= 5 and importlib.util.find_spec("torchvision") is None:
        kwargs["backend"] = "pil"
    try:
        processor = AutoImageProcessor.from_pretrained(source, **kwargs)
    except OSError as err:
        if is_local:
            raise
        logger.warning(
            "no image processor found for %s %s (%s); using %r", what, source, err, fallback
        )
        return fallback
    return HFImageProcessor(processor)


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """Accepts a `torch.dtype`, a name such as ``"float16"``, or `None`."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(
            f"dtype must be a floating torch dtype such as 'float32', 'float16' or 'bfloat16', "
            f"got {dtype!r}"
        )
    return resolved


def config_image_size(model: Any) -> int | None:
    """``model.config.image_size`` as one int (a square size), or `None` when it has none."""
    size = getattr(getattr(model, "config", None), "image_size", None)
    if isinstance(size, list | tuple):
        if len(set(size)) != 1:
            raise ValueError(f"only square image sizes are supported, the model config has {size}")
        size = size[0]
    return None if size is None else int(size)


def check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return batch_size


def embed_batches(
    images: Sequence[Image.Image],
    *,
    preprocess: Preprocess,
    forward: Callable[[torch.Tensor], torch.Tensor],
    parameter: torch.Tensor,
    batch_size: int,
    dim: int,
) -> np.ndarray:
    """Runs `forward` over `images` in batches; returns float32 numpy of shape (N, dim).

    `parameter` is any parameter of the model: inputs are moved to its device and dtype.
    """
    images = check_images(images)
    if not images:
        return np.zeros((0, dim), dtype=np.float32)
    rows = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            pixels = torch.from_numpy(
                np.ascontiguousarray(preprocess(images[start : start + batch_size]))
            )
            pixels = pixels.to(device=parameter.device, dtype=parameter.dtype)
            rows.append(forward(pixels).float().cpu().numpy())
    out = np.concatenate(rows, axis=0).astype(np.float32, copy=False)
    if out.shape != (len(images), dim):
        raise RuntimeError(f"expected embeddings of shape {(len(images), dim)}, got {out.shape}")
    return out


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


class ModelEmbedder:
    """What the transformers-backed embedders share: construction, wrapping a loaded model, the
    end of loading one, batched embedding, device, dtype, moving, and a readable repr.

    Each embedder says in its own file how it loads its model (`from_pretrained`), which output
    is the embedding (`_features`) and how wide it is (`embedding_dim`).
    """

    #: Builds the preprocessing, ``fallback(image_size=...)``, used when a checkpoint brings no
    #: processor config and none is given: resize, center crop, ImageNet normalisation.
    fallback_preprocess: Callable[..., Preprocess] = ResizeCropNormalize

    def __init__(self, model: Any, preprocess: Preprocess, *, batch_size: int = BATCH_SIZE) -> None:
        self.model = model
        self.preprocess = preprocess
        self.batch_size = check_batch_size(batch_size)

    @property
    def embedding_dim(self) -> int:  # pragma: no cover - each embedder defines its own
        raise NotImplementedError

    def _features(self, pixels: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """The embedding rows of a preprocessed batch; each embedder defines its own."""
        raise NotImplementedError

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Returns the embeddings of `images` as float32, shape (len(images), D)."""
        return embed_batches(
            images,
            preprocess=self.preprocess,
            forward=self._features,
            parameter=next(self.model.parameters()),
            batch_size=self.batch_size,
            dim=self.embedding_dim,
        )

    @classmethod
    def _wrap(
        cls, model: Any, processor: Any | None, image_size: int | None, batch_size: int
    ) -> Self:
        """`from_model`: eval mode, device and dtype kept, preprocessing from `processor` or
        the fallback at `image_size` (default: the model config's)."""
        if image_size is None:
            image_size = config_image_size(model)
        preprocess = as_preprocess(
            processor, image_size=image_size, fallback=cls.fallback_preprocess
        )
        model.eval()
        return cls(model, preprocess, batch_size=batch_size)

    @classmethod
    def _loaded(
        cls,
        model: Any,
        source: str,
        *,
        is_local: bool,
        device: torch.device | str | None,
        dtype: torch.dtype | str | None,
        batch_size: int,
        what: str,
    ) -> Self:
        """The end of `from_pretrained`: device and dtype (float32 by default), eval mode, and the
        checkpoint's own preprocessing, or the fallback at the model's image size."""
        model.to(device=device, dtype=resolve_dtype(dtype) or torch.float32)
        model.eval()
        fallback = as_preprocess(
            None, image_size=config_image_size(model), fallback=cls.fallback_preprocess
        )
        preprocess = load_preprocess(source, is_local=is_local, fallback=fallback, what=what)
        logger.info("loaded %s from %s (%s, %s)", cls.__name__, source, model.device, model.dtype)
        return cls(model, preprocess, batch_size=batch_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | str | None = None
    ) -> Self:
        """Moves the model; returns `self`."""
        self.model.to(device=device, dtype=resolve_dtype(dtype))
        return self

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(D={self.embedding_dim}, device={self.device}, "
            f"dtype={self.dtype}, batch_size={self.batch_size}, preprocess={self.preprocess!r})"
        )
