"""Rendered training sets for ToyWorld, drawn in parallel and reproducible from a seed.

A set holds ``2 × n_pairs`` images: images ``2i`` and ``2i + 1`` show the same creature in two
independently drawn contexts (scene, position, size, background variant). The pairs are what
the DINOv2 stage learns invariance from; the other stages use the images one by one. Each image
comes with its attribute indices and `captions_per_image` random grammar captions, stored as
word indices (0 is padding, ``k`` is ``VOCABULARY[k - 1]``).

The creatures are drawn from a prior (`consistent_char.toy.prior`): the world's own (what the
text-to-image model learns, peaks included) or uniform over identities (what the probe and the
DINOv2 learn from, so that every identity is seen often). A probe set also holds **invalid**
images, `invalid_fraction` of them: creatures whose eyes are missing or faint, whose hat is
faint, that are blurred, or two creatures blended into one. These are what a loop that trains on
its own images drifts into, and the probe learns to tell them from the world's images.

Chunk ``c`` of a set is drawn from ``np.random.default_rng([*seed, c])`` alone, so the result does
not depend on the number of worker processes.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from consistent_char.toy.captions import VOCABULARY, sample_caption
from consistent_char.toy.world import (
    ATTRIBUTES,
    IDENTITY_ATTRIBUTES,
    IMAGE_SIZE,
    CreatureRecord,
    record_with,
    render,
    sample_record,
)

__all__ = [
    "INVALID_KINDS",
    "MAX_CAPTION_WORDS",
    "RenderedSet",
    "degrade",
    "encode_words",
    "render_set",
]

#: How an invalid image is made from a record (see `degrade`).
INVALID_KINDS: tuple[str, ...] = ("no_eyes", "faint_eyes", "faint_hat", "blur", "blend")

MAX_CAPTION_WORDS = 16
_CHUNK_PAIRS = 500
_WORD_INDEX = {w: i + 1 for i, w in enumerate(VOCABULARY)}
_ATTRIBUTE_NAMES = tuple(ATTRIBUTES)


@dataclass
class RenderedSet:
    """Images, ground truth and captions of a rendered set.

    Attributes:
        images: ``(N, 64, 64, 3)`` uint8.
        labels: ``(N, 6)`` int64 class indices, columns in `ATTRIBUTES` order (for an invalid
            image, those of the record it was made from).
        captions: ``(N, M, MAX_CAPTION_WORDS)`` uint8 word indices.
        valid: ``(N,)`` bool: False for the invalid images of a probe set.
    """

    images: np.ndarray
    labels: np.ndarray
    captions: np.ndarray
    valid: np.ndarray

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def records(self) -> list[dict[str, str]]:
        """The attribute values of each image, by name."""
        return [
            {a: ATTRIBUTES[a][int(v)] for a, v in zip(_ATTRIBUTE_NAMES, row, strict=True)}
            for row in self.labels
        ]


def encode_words(text: str) -> np.ndarray:
    """A grammar caption → its ``(MAX_CAPTION_WORDS,)`` uint8 word indices."""
    words = text.split()
    if len(words) > MAX_CAPTION_WORDS:
        raise ValueError(f"caption has {len(words)} words, at most {MAX_CAPTION_WORDS}: {text!r}")
    out = np.zeros(MAX_CAPTION_WORDS, np.uint8)
    for i, w in enumerate(words):
        if w not in _WORD_INDEX:
            raise ValueError(f"{w!r} is not in the toy vocabulary")
        out[i] = _WORD_INDEX[w]
    return out


def degrade(record: CreatureRecord, rng: np.random.Generator, kind: str, size: int) -> Image.Image:
    """An image of `record` that is not a ToyWorld image: `kind` is one of `INVALID_KINDS`.

    ``no_eyes`` and ``faint_eyes`` draw the creature without eyes or with eyes blended 15-45%
    into it; ``faint_hat`` blends a hat 15-45% into a hatless creature; ``blur`` blurs the whole
    image (radius 1.2-2.5 px at 64 px); ``blend`` mixes the creature 30-70% with another one.
    """
    from consistent_char.toy.world import render_without_eyes

    if kind == "no_eyes":
        return render_without_eyes(record, size=size)
    if kind == "faint_eyes":
        return Image.blend(
            render_without_eyes(record, size=size),
            render(record, size=size),
            rng.uniform(0.15, 0.45),
        )
    if kind == "faint_hat":
        hat = record if record.hat != "none" else record_with(record, hat="crown", hat_color="red")
        bare = record_with(hat, hat="none", hat_color="none")
        return Image.blend(render(bare, size=size), render(hat, size=size), rng.uniform(0.15, 0.45))
    if kind == "blur":
        radius = rng.uniform(1.2, 2.5) * size / IMAGE_SIZE
        return render(record, size=size).filter(ImageFilter.GaussianBlur(radius))
    if kind == "blend":
        other = sample_record(
            rng, prior="uniform", scene=record.scene, background=record.background
        )
        return Image.blend(
            render(record, size=size), render(other, size=size), rng.uniform(0.3, 0.7)
        )
    raise ValueError(f"kind must be one of {INVALID_KINDS}, got {kind!r}")


def _render_chunk(
    args: tuple[tuple[int, ...], int, int, int, int, str, float],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    seed, chunk, n_pairs, captions_per_image, size, prior, invalid_fraction = args
    rng = np.random.default_rng([*seed, chunk])
    images = np.empty((2 * n_pairs, size, size, 3), np.uint8)
    labels = np.empty((2 * n_pairs, len(_ATTRIBUTE_NAMES)), np.int64)
    captions = np.zeros((2 * n_pairs, captions_per_image, MAX_CAPTION_WORDS), np.uint8)
    valid = np.ones(2 * n_pairs, bool)
    for p in range(n_pairs):
        first = sample_record(rng, prior=prior)
        identity = {a: getattr(first, a) for a in IDENTITY_ATTRIBUTES}
        second = sample_record(rng, prior=prior, **identity)
        for j, record in enumerate((first, second)):
            i = 2 * p + j
            if invalid_fraction > 0 and rng.random() < invalid_fraction:
                kind = INVALID_KINDS[int(rng.integers(len(INVALID_KINDS)))]
                images[i] = np.asarray(degrade(record, rng, kind, size))
                valid[i] = False
            else:
                images[i] = np.asarray(render(record, size=size))
            labels[i] = _label_row(record)
            for m in range(captions_per_image):
                captions[i, m] = encode_words(sample_caption(record, rng))
    return images, labels, captions, valid


def _label_row(record: CreatureRecord) -> list[int]:
    return [ATTRIBUTES[a].index(getattr(record, a)) for a in _ATTRIBUTE_NAMES]


def _start_method() -> str:
    # fork is fastest and works from any __main__ (a notebook, stdin), but a forked child of a
    # process that has initialised CUDA cannot be trusted: then spawn.
    torch = sys.modules.get("torch")
    cuda_ready = torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda_ready or "fork" not in multiprocessing.get_all_start_methods():
        return "spawn"
    return "fork"


def render_set(
    n_pairs: int,
    *,
    seed: int | Sequence[int],
    captions_per_image: int = 8,
    workers: int | None = None,
    size: int = IMAGE_SIZE,
    prior: str = "world",
    invalid_fraction: float = 0.0,
) -> RenderedSet:
    """Renders ``2 × n_pairs`` images (see the module docstring) with `workers` processes.

    Args:
        n_pairs: Number of creatures; each is drawn twice.
        seed: The set's seed, an int or a tuple of ints (training and held-out sets use
            different seeds).
        captions_per_image: Random captions stored per image.
        workers: Processes (default: all CPUs); 1 renders in this process.
        size: Image side in pixels.
        prior: ``"world"`` or ``"uniform"`` (see `consistent_char.toy.prior`).
        invalid_fraction: The fraction of images replaced by invalid ones (`degrade`).
    """
    if not 0.0 <= invalid_fraction < 1.0:
        raise ValueError(f"invalid_fraction must be in [0, 1), got {invalid_fraction}")
    chunks = []
    start = 0
    while start < n_pairs:
        chunks.append(min(_CHUNK_PAIRS, n_pairs - start))
        start += _CHUNK_PAIRS
    key = (seed,) if isinstance(seed, int) else tuple(int(s) for s in seed)
    jobs = [
        (key, c, n, captions_per_image, size, prior, invalid_fraction) for c, n in enumerate(chunks)
    ]
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    if workers == 1:
        parts = [_render_chunk(job) for job in jobs]
    else:
        context = multiprocessing.get_context(_start_method())
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            parts = list(pool.map(_render_chunk, jobs))
    if not parts:
        empty = np.zeros((0, size, size, 3), np.uint8)
        return RenderedSet(
            empty,
            np.zeros((0, len(_ATTRIBUTE_NAMES)), np.int64),
            np.zeros((0, captions_per_image, MAX_CAPTION_WORDS), np.uint8),
            np.zeros(0, bool),
        )
    return RenderedSet(
        images=np.concatenate([p[0] for p in parts]),
        labels=np.concatenate([p[1] for p in parts]),
        captions=np.concatenate([p[2] for p in parts]),
        valid=np.concatenate([p[3] for p in parts]),
    )
