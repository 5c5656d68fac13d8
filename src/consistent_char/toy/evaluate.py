"""ToyWorld's measures, read off images by the identity probe (never used by the loop).

- `probe_accuracy`: the probe against ground truth on fresh renders;
- `controllability`: images generated from fully specified prompts, attribute by attribute;
- `diversity`: how many distinct identities one vague prompt yields;
- `identity_consistency` and `prompt_adherence`, as ``DESIGN.md`` ("Measures") defines them, on
  probe records of images drawn in several contexts.

Example:
    >>> import consistent_char.toy as toy
    >>> from diffusers import StableDiffusionXLPipeline
    >>> pipe = StableDiffusionXLPipeline.from_pretrained(toy.model_dir())  # doctest: +SKIP
    >>> probe = toy.IdentityProbe.from_pretrained(toy.probe_dir())  # doctest: +SKIP
    >>> controllability(pipe, probe, n_images=256)["mean"]  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from itertools import combinations
from typing import Any

import numpy as np
import torch
from PIL import Image

from consistent_char.toy.captions import full_caption
from consistent_char.toy.models import IdentityProbe
from consistent_char.toy.world import (
    ATTRIBUTES,
    COLORS,
    EYES,
    HAT_COLORS,
    HATS,
    IDENTITY_ATTRIBUTES,
    SCENES,
    SHAPES,
    CreatureRecord,
    record_with,
    render,
    sample_record,
)

__all__ = [
    "controllability",
    "distinct_identities",
    "diversity",
    "embedding_sensitivity",
    "generate",
    "identity_consistency",
    "identity_key",
    "probe_accuracy",
    "prompt_adherence",
]


def generate(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    guidance_scale: float = 7.5,
    num_inference_steps: int = 30,
    batch_size: int = 64,
) -> list[Image.Image]:
    """Draws one image per prompt with a plain ``StableDiffusionXLPipeline`` call.

    Image ``j`` uses a CPU ``torch.Generator`` seeded with ``seeds[j]``, so results do not depend
    on the batch size or the device the noise would otherwise be drawn on.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    pipe.set_progress_bar_config(disable=True)
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        generators = [
            torch.Generator("cpu").manual_seed(int(s)) for s in seeds[start : start + batch_size]
        ]
        out = pipe(
            prompt=chunk,
            generator=generators,
            guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps,
            output_type="pil",
        )
        images.extend(out.images)
    return images


def probe_accuracy(probe: IdentityProbe, n: int = 2000, seed: int = 12345) -> dict[str, float]:
    """Fraction of `n` fresh renders (seed `seed`) on which the probe reads each attribute right."""
    rng = np.random.default_rng([seed, 17])
    records = [sample_record(rng) for _ in range(n)]
    predictions = probe.predict([render(r) for r in records])
    return {
        a: float(
            np.mean([p[a] == getattr(r, a) for p, r in zip(predictions, records, strict=True)])
        )
        for a in ATTRIBUTES
    }


def controllability(
    pipe: Any,
    probe: IdentityProbe,
    n_images: int = 256,
    seed: int = 0,
    *,
    guidance_scale: float = 7.5,
    num_inference_steps: int = 30,
    batch_size: int = 64,
) -> dict[str, float]:
    """Generates from `n_images` fully specified prompts (identity + scene, drawn uniformly) and
    returns, per attribute, the fraction of images where the probe agrees with the prompt, plus
    ``"mean"`` (over attributes) and ``"all"`` (images right on every attribute)."""
    rng = np.random.default_rng([seed, 29])
    records = [sample_record(rng) for _ in range(n_images)]
    prompts = [full_caption(r) for r in records]
    images = generate(
        pipe,
        prompts,
        [seed * 1_000_003 + j for j in range(n_images)],
        guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps,
        batch_size=batch_size,
    )
    predictions = probe.predict(images)
    hits = {
        a: np.array([p[a] == getattr(r, a) for p, r in zip(predictions, records, strict=True)])
        for a in ATTRIBUTES
    }
    result = {a: float(h.mean()) for a, h in hits.items()}
    result["mean"] = float(np.mean([result[a] for a in ATTRIBUTES]))
    result["all"] = float(np.logical_and.reduce(list(hits.values())).mean())
    return result


def identity_key(record: Mapping[str, str]) -> tuple[str, ...]:
    """The identity attributes of a probe record, in `IDENTITY_ATTRIBUTES` order: two images
    show the same creature when their keys are equal."""
    return tuple(record[a] for a in IDENTITY_ATTRIBUTES)


def distinct_identities(records: Sequence[Mapping[str, str]]) -> int:
    """Number of distinct identity-attribute tuples among probe records."""
    return len({identity_key(r) for r in records})


def diversity(
    pipe: Any,
    probe: IdentityProbe,
    prompt: str = "a creature",
    n: int = 128,
    seed: int = 0,
    *,
    guidance_scale: float = 7.5,
    num_inference_steps: int = 30,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Draws `n` images of one prompt; ``"distinct_identities"`` counts the probe's distinct
    identities among them, ``"distinct_values"`` the distinct values of each attribute."""
    images = generate(
        pipe,
        [prompt] * n,
        [seed * 1_000_003 + 500_000 + j for j in range(n)],
        guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps,
        batch_size=batch_size,
    )
    records = probe.predict(images)
    return {
        "prompt": prompt,
        "n": n,
        "distinct_identities": distinct_identities(records),
        "distinct_values": {a: len({r[a] for r in records}) for a in ATTRIBUTES},
    }


def identity_consistency(
    records: Sequence[Mapping[str, str]], contexts: Sequence[str] | None = None
) -> float:
    """Fraction of image pairs whose identity attributes all agree.

    Args:
        records: Probe records, one per image.
        contexts: The context prompt (or scene) each image was drawn with; when given, only
            pairs from different contexts count, as ``DESIGN.md`` defines the measure.
    """
    if contexts is not None and len(contexts) != len(records):
        raise ValueError(f"got {len(records)} records but {len(contexts)} contexts")
    keys = [identity_key(r) for r in records]  # once per image, not once per pair
    agree = total = 0
    for i, j in combinations(range(len(records)), 2):
        if contexts is not None and contexts[i] == contexts[j]:
            continue
        total += 1
        agree += keys[i] == keys[j]
    if total == 0:
        raise ValueError("identity consistency needs at least one pair of images")
    return agree / total


def prompt_adherence(records: Sequence[Mapping[str, str]], scenes: Sequence[str | None]) -> float:
    """Fraction of images whose probe scene matches the scene their prompt asked for."""
    if len(scenes) != len(records):
        raise ValueError(f"got {len(records)} records but {len(scenes)} scenes")
    if not records:
        raise ValueError("prompt adherence needs at least one image")
    return float(np.mean([r["scene"] == s for r, s in zip(records, scenes, strict=True)]))


def embedding_sensitivity(
    embedder: Any,
    n: int = 200,
    seed: int = 4321,
    *,
    draw: Callable[[Sequence[CreatureRecord]], Sequence[Image.Image]] | None = None,
) -> dict[str, float]:
    """How far an embedder moves when one thing about a render changes: mean L2 distance
    between the embeddings of `n` random renders and the same renders with one change.

    Changes: ``shape``, ``color``, ``eyes`` and ``scene`` (another value of that attribute, all
    else kept), ``hat`` (another type, a hat where there was none or none where there was one;
    the hat colour is kept where both have a hat), ``context`` (the same identity in a newly
    drawn scene, position and size) and ``everything`` (an independent creature). For the loop
    to find identities, identity changes must move the embedding further than ``context`` does.

    `draw` turns the `n` records of each set into images (default: `render`). A generator
    drawing each record's caption with the same seed for the same position in every set
    measures the embedder on generated images instead.
    """
    rng = np.random.default_rng(seed)
    base = [sample_record(rng) for _ in range(n)]

    def embed(records: Sequence[CreatureRecord]) -> np.ndarray:
        images = draw(records) if draw is not None else [render(r) for r in records]
        return np.asarray(embedder.embed(images), dtype=np.float64)

    def another(value: str, values: Sequence[str]) -> str:
        return str(rng.choice([v for v in values if v != value]))

    def another_hat(record: CreatureRecord) -> CreatureRecord:
        hat = another(record.hat, HATS)
        if hat == "none":
            return record_with(record, hat="none", hat_color="none")
        color = record.hat_color if record.hat_color != "none" else another("none", HAT_COLORS)
        return record_with(record, hat=hat, hat_color=color)

    changed = {
        name: [record_with(r, **{name: another(getattr(r, name), values)}) for r in base]
        for name, values in (
            ("shape", SHAPES),
            ("color", COLORS),
            ("eyes", EYES),
            ("scene", SCENES),
        )
    }
    changed["context"] = [
        sample_record(rng, **{a: getattr(r, a) for a in IDENTITY_ATTRIBUTES}) for r in base
    ]
    changed["everything"] = [sample_record(rng) for _ in base]
    # Drawn last, so the other changes draw the same random values as before it was added.
    changed["hat"] = [another_hat(r) for r in base]
    reference = embed(base)
    return {
        name: float(np.linalg.norm(embed(records) - reference, axis=1).mean())
        for name, records in changed.items()
    }
