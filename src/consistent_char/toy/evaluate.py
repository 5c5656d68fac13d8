"""ToyWorld's measures, read off images by the identity probe (never used by the loop).

- `probe_accuracy`: the probe against ground truth on fresh renders;
- `controllability`: images generated from fully specified prompts, attribute by attribute;
- `diversity`: how many distinct identities one vague prompt yields, and how often the most
  frequent one;
- `model_peaks`: for each prompt that names one attribute, how often the model draws its most
  frequent identity, against the world's own share (`consistent_char.toy.prior.peaks`);
- `validity`: the fraction of images the probe takes for ToyWorld images;
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

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from itertools import combinations
from typing import Any

import numpy as np
import torch
from PIL import Image

from consistent_char.toy.captions import caption, full_caption
from consistent_char.toy.models import IdentityProbe
from consistent_char.toy.prior import peaks
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
    "model_peaks",
    "one_attribute_prompts",
    "probe_accuracy",
    "prompt_adherence",
    "validity",
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
    """Fraction of `n` fresh renders (seed `seed`, identities drawn uniformly) on which the probe
    reads each attribute right."""
    rng = np.random.default_rng([seed, 17])
    records = [sample_record(rng, prior="uniform") for _ in range(n)]
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
    ``"mean"`` (over attributes), ``"all"`` (images right on every attribute) and, with a
    probe that has a validity head, ``"valid"`` (`validity`)."""
    rng = np.random.default_rng([seed, 29])
    records = [sample_record(rng, prior="uniform") for _ in range(n_images)]
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
    if getattr(probe, "valid_head", None) is not None:
        result["valid"] = validity(probe, images)
    return result


def validity(probe: IdentityProbe, images: Sequence[Image.Image], threshold: float = 0.5) -> float:
    """The fraction of `images` whose validity probability (`IdentityProbe.predict_validity`)
    is at least `threshold`: images the probe takes for ToyWorld images."""
    if len(images) == 0:
        raise ValueError("validity needs at least one image")
    return float((probe.predict_validity(images) >= threshold).mean())


def identity_key(record: Mapping[str, str]) -> tuple[str, ...]:
    """The identity attributes of a probe record, in `IDENTITY_ATTRIBUTES` order: two images
    show the same creature when their keys are equal."""
    return tuple(record[a] for a in IDENTITY_ATTRIBUTES)


def majority_identity(records: Sequence[Mapping[str, str]]) -> dict[str, str]:
    """The identity read most often (all five attributes together) among probe records: an
    identity's reference attributes, from images of it."""
    if not records:
        raise ValueError("no records to take the identity's attributes from")
    key, _ = Counter(identity_key(r) for r in records).most_common(1)[0]
    return dict(zip(IDENTITY_ATTRIBUTES, key, strict=True))


def identity_kept(records: Sequence[Mapping[str, str]], reference: Mapping[str, str]) -> float:
    """The fraction of probe records whose five identity attributes all equal `reference`'s."""
    if not records:
        return float("nan")
    key = identity_key(reference)
    return float(np.mean([identity_key(r) == key for r in records]))


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
    identities among them, ``"top_share"`` is the fraction of the most frequent one
    (``"top_identity"``), ``"distinct_values"`` the distinct values of each attribute."""
    images = generate(
        pipe,
        [prompt] * n,
        [seed * 1_000_003 + 500_000 + j for j in range(n)],
        guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps,
        batch_size=batch_size,
    )
    records = probe.predict(images)
    top, count = _most_frequent(records)
    return {
        "prompt": prompt,
        "n": n,
        "distinct_identities": distinct_identities(records),
        "top_identity": list(top),
        "top_share": count / n,
        "distinct_values": {a: len({r[a] for r in records}) for a in ATTRIBUTES},
    }


def _most_frequent(records: Sequence[Mapping[str, str]]) -> tuple[tuple[str, ...], int]:
    counts: dict[tuple[str, ...], int] = {}
    for r in records:
        key = identity_key(r)
        counts[key] = counts.get(key, 0) + 1
    top = max(counts, key=lambda k: counts[k])
    return top, counts[top]


def one_attribute_prompts() -> dict[str, dict[str, str]]:
    """Every prompt that names exactly one identity attribute value, with what it names:
    ``{"a red creature": {"color": "red"}, "a creature with no hat": {"hat": "none"}, ...}``
    (``hat_color="none"`` reads "with no hat", the same prompt as ``hat="none"``)."""
    out: dict[str, dict[str, str]] = {}
    for entry in peaks().values():
        fixed = entry["fixed"]
        if len(fixed) != 1:
            continue
        ((name, _),) = fixed.items()
        top = dict(zip(IDENTITY_ATTRIBUTES, entry["top_identity"], strict=True))
        record = CreatureRecord(**top, scene=SCENES[0])
        out.setdefault(caption(record, [name]), fixed)
    return out


def model_peaks(
    pipe: Any,
    probe: IdentityProbe,
    n_per_prompt: int = 64,
    seed: int = 0,
    *,
    guidance_scale: float = 7.5,
    num_inference_steps: int = 30,
    batch_size: int = 64,
) -> dict[str, Any]:
    """How peaked the model's draws are for each one-attribute prompt, against the world's.

    For each prompt of `one_attribute_prompts`, `n_per_prompt` images are drawn and read by the
    probe; the share of the most frequent identity is set against the world's share of its own
    most likely identity for the same condition (`consistent_char.toy.prior.peaks`).

    Returns:
        ``{"prompts": {prompt: {"fixed", "model_top", "model_share", "world_top",
        "world_share", "ratio"}}, "max_ratio", "min_ratio"}``; ``ratio`` is model over world.
    """
    world = {tuple(sorted(e["fixed"].items())): e for e in peaks().values()}
    out: dict[str, Any] = {}
    for p, (prompt, fixed) in enumerate(one_attribute_prompts().items()):
        images = generate(
            pipe,
            [prompt] * n_per_prompt,
            [seed * 1_000_003 + 700_000 + 1_000 * p + j for j in range(n_per_prompt)],
            guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps,
            batch_size=batch_size,
        )
        top, count = _most_frequent(probe.predict(images))
        ref = world[tuple(sorted(fixed.items()))]
        share = count / n_per_prompt
        out[prompt] = {
            "fixed": fixed,
            "model_top": list(top),
            "model_share": share,
            "world_top": ref["top_identity"],
            "world_share": ref["top_share"],
            "ratio": share / ref["top_share"],
        }
    ratios = [v["ratio"] for v in out.values()]
    return {"prompts": out, "max_ratio": max(ratios), "min_ratio": min(ratios)}


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
