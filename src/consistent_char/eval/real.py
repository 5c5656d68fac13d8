"""Measures for real (SDXL-class) models, where no probe knows the ground truth.

- **CLIP-T**: the cosine similarity of CLIP's projected image and text embeddings, image against
  the prompt it was drawn from *without* the identity's token (CLIP does not know the token).
  Papers that follow The Chosen One report it; ×100 gives the usual "CLIP score" scale.
- **CLIP-I**: the mean cosine similarity of CLIP's projected image embeddings over all pairs of
  images of one subject, the image-image CLIP measure of ConsiStory and later papers.
- **Identity similarity**: the mean cosine similarity of DINOv2 CLS embeddings over all pairs of
  images of one subject (across settings and seeds); with `dreamsim` installed, the same with
  DreamSim embeddings (DreamSim's distance is 1 − this cosine).

Prompts come from a prompt-set file shaped like the ConsiStory+ benchmark: subjects × settings.

Example:
    >>> prompt_set = PromptSet.from_file("prompts.yaml")  # doctest: +SKIP
    >>> clip = CLIPScorer.from_pretrained("openai/clip-vit-large-patch14")  # doctest: +SKIP
    >>> dino = DINOv2Embedder.from_pretrained("facebook/dinov2-large")  # doctest: +SKIP
    >>> evaluate_prompt_set(generator, prompt_set, clip=clip, dino=dino)["mean"]  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from consistent_char.embedders._preprocess import (
    BATCH_SIZE,
    CLIP_MEAN,
    CLIP_STD,
    Preprocess,
    ResizeCropNormalize,
    as_preprocess,
    check_batch_size,
    embed_batches,
    load_preprocess,
    resolve_dtype,
    resolve_source,
)
from consistent_char.identity import Identity
from consistent_char.interfaces import Embedder, Generator
from consistent_char.usage import prompt_with_identity

__all__ = [
    "CLIPScorer",
    "DreamSimEmbedder",
    "PromptSet",
    "Subject",
    "dreamsim_available",
    "evaluate_prompt_set",
    "identity_similarity",
    "mean_scores",
    "score_images",
]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------ the prompt set


@dataclass
class Subject:
    """One subject of a prompt set and the settings it is drawn in."""

    name: str
    settings: list[str]


@dataclass
class PromptSet:
    """Subjects × settings, the shape of the ConsiStory+ benchmark.

    A file (YAML or JSON) looks like::

        template: "{subject} {setting}"      # optional, this is the default
        settings:                            # shared by every subject
          - reading a book in a library
          - on a beach at sunset
        subjects:
          - a watercolor fox with a scarf
          - subject: an old sailor with a grey beard
            settings: [at the helm of a ship, in a harbour tavern]   # replaces the shared list

    Attributes:
        subjects: The subjects, each with its settings.
        template: How a subject and a setting make a prompt; holds ``{subject}`` and
            ``{setting}``.
    """

    subjects: list[Subject]
    template: str = "{subject} {setting}"

    def __post_init__(self) -> None:
        if not self.subjects:
            raise ValueError("a prompt set needs at least one subject")
        for placeholder in ("{subject}", "{setting}"):
            if placeholder not in self.template:
                raise ValueError(f"template must contain {placeholder}, got {self.template!r}")
        names = [s.name for s in self.subjects]
        if len(set(names)) != len(names):
            raise ValueError(f"subjects must be distinct, got {names}")
        for s in self.subjects:
            if not s.settings:
                raise ValueError(f"subject {s.name!r} has no settings")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> PromptSet:
        """Builds a prompt set from the file's mapping (see the class docstring)."""
        known = {"template", "settings", "subjects"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown prompt-set keys {unknown}; known: {sorted(known)}")
        shared = _strings(data.get("settings", []), "settings")
        subjects: list[Subject] = []
        for k, item in enumerate(data.get("subjects") or []):
            if isinstance(item, str):
                subjects.append(Subject(item.strip(), list(shared)))
            elif isinstance(item, Mapping) and isinstance(item.get("subject"), str):
                extra = sorted(set(item) - {"subject", "settings"})
                if extra:
                    raise ValueError(f"subjects[{k}]: unknown keys {extra}")
                own = item.get("settings")
                settings = _strings(own, f"subjects[{k}].settings") if own else list(shared)
                subjects.append(Subject(item["subject"].strip(), settings))
            else:
                raise ValueError(
                    f"subjects[{k}] must be a string or a mapping with 'subject' (and optional "
                    f"'settings'), got {item!r}"
                )
        return cls(subjects, str(data.get("template", "{subject} {setting}")))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> PromptSet:
        """Reads a YAML or JSON prompt-set file."""
        from consistent_char.config import load_mapping

        return cls.from_mapping(load_mapping(path))

    def prompts(self, subject: Subject) -> list[tuple[str, str]]:
        """``(setting, prompt)`` for every setting of `subject`."""
        return [
            (s, " ".join(self.template.format(subject=subject.name, setting=s).split()))
            for s in subject.settings
        ]


def _strings(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError(f"{where} must be a list of non-empty strings, got {value!r}")
    return [v.strip() for v in value]


# ----------------------------------------------------------------------------- CLIP-T


def _clip_preprocess(size: int) -> Preprocess:
    # CLIP's own transform: shortest edge to the crop size, centre crop, CLIP mean and std.
    return ResizeCropNormalize(size, mean=CLIP_MEAN, std=CLIP_STD, resize_ratio=1.0)


class CLIPScorer:
    """CLIP-T with a `transformers.CLIPModel`: cosine of projected image and text embeddings.

    Args:
        model: A loaded `CLIPModel` (eval mode; device and dtype are kept).
        tokenizer: Its tokenizer (prompts are truncated to the model's text length).
        preprocess: Maps RGB images to a ``(B, 3, H, W)`` float array.
        batch_size: Images or prompts per forward pass.

    Example:
        >>> clip = CLIPScorer.from_pretrained("openai/clip-vit-base-patch32")  # doctest: +SKIP
        >>> clip.scores(images, ["a fox in the snow"] * len(images))  # doctest: +SKIP
    """

    DEFAULT_MODEL_ID = "openai/clip-vit-large-patch14"

    def __init__(
        self, model: Any, tokenizer: Any, preprocess: Preprocess, *, batch_size: int = BATCH_SIZE
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.batch_size = check_batch_size(batch_size)

    @classmethod
    def from_pretrained(
        cls,
        id_or_dir: str | os.PathLike[str] = DEFAULT_MODEL_ID,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        batch_size: int = BATCH_SIZE,
    ) -> CLIPScorer:
        """Loads a CLIP checkpoint (hub id or folder with ``config.json``, the tokenizer files
        and, optionally, ``preprocessor_config.json``).

        Raises:
            FileNotFoundError: A local path that does not exist or holds no ``config.json``.
        """
        source, is_local = resolve_source(id_or_dir)
        check_batch_size(batch_size)
        from transformers import AutoTokenizer, CLIPModel

        model: Any = CLIPModel.from_pretrained(source)
        model.to(device=device, dtype=resolve_dtype(dtype) or torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(source)
        size = int(model.config.vision_config.image_size)
        preprocess = load_preprocess(
            source,
            is_local=is_local,
            fallback=as_preprocess(None, image_size=size, fallback=_clip_preprocess),
            what="CLIP model",
        )
        logger.info("loaded CLIP scorer from %s", source)
        return cls(model, tokenizer, preprocess, batch_size=batch_size)

    @property
    def dim(self) -> int:
        """The width of the joint embedding space (``projection_dim``)."""
        return int(self.model.config.projection_dim)

    def image_embeddings(self, images: Sequence[Image.Image]) -> np.ndarray:
        """L2-normalised projected image embeddings, float32 ``(N, dim)``."""
        m = self.model

        def forward(pixels: torch.Tensor) -> torch.Tensor:
            # vision_model + visual_projection: get_image_features' return type changed
            # between transformers 4 (a tensor) and 5 (a model output).
            return m.visual_projection(m.vision_model(pixel_values=pixels).pooler_output)

        out = embed_batches(
            images,
            preprocess=self.preprocess,
            forward=forward,
            parameter=next(m.parameters()),
            batch_size=self.batch_size,
            dim=self.dim,
        )
        return _normalise(out)

    @torch.inference_mode()
    def text_embeddings(self, prompts: Sequence[str]) -> np.ndarray:
        """L2-normalised projected text embeddings, float32 ``(N, dim)``."""
        m = self.model
        device = next(m.parameters()).device
        max_length = int(m.config.text_config.max_position_embeddings)
        rows = []
        for start in range(0, len(prompts), self.batch_size):
            tokens = self.tokenizer(
                list(prompts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            out = m.text_model(
                input_ids=tokens["input_ids"].to(device),
                attention_mask=tokens["attention_mask"].to(device),
            )
            rows.append(m.text_projection(out.pooler_output).float().cpu().numpy())
        if not rows:
            return np.zeros((0, self.dim), dtype=np.float32)
        return _normalise(np.concatenate(rows).astype(np.float32))

    def scores(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> np.ndarray:
        """CLIP-T of each image against its prompt: cosine similarities in [-1, 1], ``(N,)``."""
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        image = self.image_embeddings(images)
        text = self.text_embeddings(prompts)
        return np.sum(image * text, axis=1).astype(np.float32)


# ------------------------------------------------------------------ identity similarity


def identity_similarity(embeddings: np.ndarray) -> float:
    """Mean cosine similarity over all pairs of distinct images (rows of `embeddings`)."""
    x = _normalise(np.asarray(embeddings, dtype=np.float64))
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"identity similarity needs at least 2 images, got {n}")
    gram = x @ x.T
    return float((gram.sum() - np.trace(gram)) / (n * (n - 1)))


def dreamsim_available() -> bool:
    """True when the optional `dreamsim` package can be imported."""
    return importlib.util.find_spec("dreamsim") is not None


@dataclass
class DreamSimEmbedder:
    """DreamSim embeddings (``pip install dreamsim``); cosine of two is 1 − DreamSim distance.

    Build it with `from_pretrained`, which downloads DreamSim's weights on first use.
    """

    model: Any
    preprocess: Any
    device: str = "cpu"
    batch_size: int = 16

    @classmethod
    def from_pretrained(
        cls, *, device: str = "cpu", cache_dir: str | None = None
    ) -> DreamSimEmbedder:
        """Loads DreamSim (ensemble model) with its own preprocessing.

        Raises:
            ImportError: `dreamsim` is not installed.
        """
        if not dreamsim_available():
            raise ImportError("DreamSim is not installed: pip install dreamsim")
        from dreamsim import dreamsim

        kwargs: dict[str, Any] = {"pretrained": True, "device": device}
        if cache_dir is not None:
            kwargs["cache_dir"] = cache_dir
        model, preprocess = dreamsim(**kwargs)
        return cls(model, preprocess, device)

    @torch.inference_mode()
    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """DreamSim embeddings, float32 ``(N, D)``."""
        rows = []
        for start in range(0, len(images), self.batch_size):
            batch = torch.cat(
                [
                    self.preprocess(im.convert("RGB"))
                    for im in images[start : start + self.batch_size]
                ]
            ).to(self.device)
            rows.append(self.model.embed(batch).float().cpu().numpy())
        return np.concatenate(rows).astype(np.float32)


# ---------------------------------------------------------------------------- scoring


def score_images(
    drawn: Mapping[str, Sequence[tuple[str, Image.Image]]],
    *,
    clip: CLIPScorer,
    dino: Embedder,
    dreamsim: Embedder | None = None,
) -> dict[str, Any]:
    """Scores images already drawn, subject by subject.

    Args:
        drawn: ``{subject: [(prompt without the identity's token, image), ...]}``.
        clip: Scores each image against its prompt (CLIP-T).
        dino: Embeds images for the identity similarity (DINOv2 in the papers).
        dreamsim: A second identity embedder (`DreamSimEmbedder`), if any.

    Returns:
        ``{"subjects": {subject: {"clip_t", "clip_i", "dino_similarity", "dreamsim_similarity",
        "n_images"}}, "mean": {"clip_t", "clip_i", "dino_similarity", "dreamsim_similarity"}}``
        with ``dreamsim_similarity`` ``None`` without `dreamsim`. Means are over subjects.
    """
    subjects: dict[str, dict[str, Any]] = {}
    for subject, pairs in drawn.items():
        prompts = [p for p, _ in pairs]
        images = [im.convert("RGB") for _, im in pairs]
        image = clip.image_embeddings(images)
        subjects[subject] = {
            "clip_t": float(np.mean(np.sum(image * clip.text_embeddings(prompts), axis=1))),
            "clip_i": identity_similarity(image),
            "dino_similarity": identity_similarity(dino.embed(images)),
            "dreamsim_similarity": identity_similarity(dreamsim.embed(images))
            if dreamsim is not None
            else None,
            "n_images": len(images),
        }
    return {"subjects": subjects, "mean": mean_scores(subjects.values())}


#: The scores `score_images` gives each subject, and their means.
SCORES = ("clip_t", "clip_i", "dino_similarity", "dreamsim_similarity")


def mean_scores(subjects: Iterable[Mapping[str, Any]]) -> dict[str, float | None]:
    """The mean of each of `SCORES` over `subjects` (None where no subject has it)."""
    rows = list(subjects)
    mean: dict[str, float | None] = {}
    for key in SCORES:
        values = [s[key] for s in rows if s.get(key) is not None]
        mean[key] = float(np.mean(values)) if values else None
    return mean


def evaluate_prompt_set(
    generator: Generator,
    prompt_set: PromptSet,
    *,
    clip: CLIPScorer,
    dino: Embedder,
    identities: Mapping[str, Identity] | None = None,
    dreamsim: Embedder | None = None,
    seeds_per_setting: int = 1,
    seed: int = 0,
    vanilla: bool = False,
) -> dict[str, Any]:
    """Draws every subject in every setting and scores CLIP-T, CLIP-I and identity similarity.

    Args:
        generator: Draws the images (e.g. `SDXLGenerator` on SDXL).
        prompt_set: Subjects × settings.
        clip: CLIP-T scorer.
        dino: Identity embedder (`DINOv2Embedder`).
        identities: ``{subject: identity}``: those subjects are drawn with their identity,
            prompt ``prompt_with_identity(identity, prompt)``; the others with the plain prompt.
            CLIP-T always compares with the plain prompt.
        dreamsim: Optional second identity embedder.
        seeds_per_setting: Images per setting (at most 1000); image ``j`` of the ``n``-th
            (subject, setting) pair, counted over the whole prompt set, has seed
            ``seed + 1000 * n + j``.
        seed: The first seed.
        vanilla: Also draw each subject that has an identity without it, with the same
            prompts and seeds: the base model's own images, the baseline the identity is
            compared with.

    Returns:
        `score_images`' result plus ``"with_identity"``: the subjects drawn with an identity;
        with `vanilla`, ``"vanilla"``: `score_images`' result on the baseline images, and
        ``"mean_with_identity"``: the means over the same subjects drawn with their identity.
    """
    if not 1 <= seeds_per_setting <= 1000:
        raise ValueError(f"seeds_per_setting must be in [1, 1000], got {seeds_per_setting}")
    identities = dict(identities or {})
    unknown = sorted(set(identities) - {s.name for s in prompt_set.subjects})
    if unknown:
        raise ValueError(f"identities for subjects not in the prompt set: {unknown}")
    drawn: dict[str, list[tuple[str, Image.Image]]] = {}
    baseline: dict[str, list[tuple[str, Image.Image]]] = {}
    n = 0  # (subject, setting) pairs so far: every image of the set gets its own seed
    for subject in prompt_set.subjects:
        identity = identities.get(subject.name)
        jobs = []
        for _, prompt in prompt_set.prompts(subject):
            jobs += [(prompt, seed + 1000 * n + j) for j in range(seeds_per_setting)]
            n += 1
        prompts = [
            prompt_with_identity(identity, p) if identity is not None else p for p, _ in jobs
        ]
        images = generator.generate(prompts, [s for _, s in jobs], identity)
        drawn[subject.name] = [(p, im) for (p, _), im in zip(jobs, images, strict=True)]
        if vanilla and identity is not None:
            plain = generator.generate([p for p, _ in jobs], [s for _, s in jobs], None)
            baseline[subject.name] = [(p, im) for (p, _), im in zip(jobs, plain, strict=True)]
    result = score_images(drawn, clip=clip, dino=dino, dreamsim=dreamsim)
    result["with_identity"] = sorted(identities)
    result["seeds_per_setting"] = seeds_per_setting
    if vanilla and baseline:
        result["vanilla"] = score_images(baseline, clip=clip, dino=dino, dreamsim=dreamsim)
        result["mean_with_identity"] = mean_scores(result["subjects"][n] for n in baseline)
    return result


def _normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)
