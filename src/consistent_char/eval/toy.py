"""ToyWorld scoring: draw an identity (or a plain prompt) in every scene, read it back with the
identity probe, and measure identity consistency and prompt adherence.

The measures are those of ``DESIGN.md`` ("Measures"), computed by `consistent_char.toy.evaluate`:

- **identity consistency**: the fraction of image pairs *drawn in different scenes* whose five
  identity attributes (shape, colour, hat, hat colour, eyes) all agree, by the probe;
- **prompt adherence**: the fraction of images whose probe scene is the scene the prompt asked for.

Example:
    >>> import consistent_char.toy as toy
    >>> from consistent_char.generators.sdxl import SDXLGenerator
    >>> gen = SDXLGenerator.from_pretrained(toy.model_dir())  # doctest: +SKIP
    >>> probe = toy.IdentityProbe.from_pretrained(toy.probe_dir())  # doctest: +SKIP
    >>> drawn = render_identity_in_scenes(gen, identity, "a creature")  # doctest: +SKIP
    >>> score_toy(drawn, probe)["identity_consistency"]  # doctest: +SKIP
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import Any, Protocol

import numpy as np
from PIL import Image

from consistent_char.identity import Identity
from consistent_char.interfaces import Generator
from consistent_char.toy.captions import parse_caption, scene_phrase
from consistent_char.toy.evaluate import (
    distinct_identities,
    identity_consistency,
    prompt_adherence,
)
from consistent_char.toy.world import IDENTITY_ATTRIBUTES, SCENES
from consistent_char.usage import prompt_with_identity

__all__ = [
    "Probe",
    "ScenePrompt",
    "render_identity_in_scenes",
    "scene_prompts",
    "scene_seed",
    "score_records",
    "score_toy",
]

#: Tag mixed into evaluation seeds so they never coincide with the loop's own image seeds
#: (`extractor.image_seed` hashes ``[seed, iteration, index]``): an identity is judged on images
#: it was not trained on.
_EVAL_SEED_TAG = 0xE7A1


class Probe(Protocol):
    """Reads attributes back from images (`consistent_char.toy.IdentityProbe` is one)."""

    def predict(self, images: Sequence[Image.Image]) -> list[dict[str, str]]:
        """One ``{attribute: value}`` record per image, with every identity attribute and
        ``"scene"``."""
        ...


#: ``(scene, prompt, seed)``: one image to draw.
ScenePrompt = tuple[str, str, int]


def scene_seed(seed: int, scene_index: int, index: int) -> int:
    """The seed of image `index` in scene number `scene_index`: distinct for every image (so no
    two scenes share starting noise, which would inflate consistency) and reproducible."""
    state = np.random.SeedSequence([_EVAL_SEED_TAG, seed, scene_index, index]).generate_state(
        1, dtype=np.uint64
    )
    return int(state[0] >> np.uint64(1))


def scene_prompts(
    identity: Identity | None,
    base_prompt: str,
    scenes: Sequence[str] = SCENES,
    seeds_per_scene: int = 8,
    seed: int = 0,
) -> list[ScenePrompt]:
    """The prompts and seeds `render_identity_in_scenes` draws, scene by scene.

    With an identity the prompt is ``prompt_with_identity(identity, f"{base_prompt} {phrase}")``
    (the run's identity prompt template, e.g. ``"<cc-char> a creature in the snow"``); without,
    it is ``f"{base_prompt} {phrase}"``.
    """
    base = " ".join(base_prompt.split())
    if not base:
        raise ValueError(f"base_prompt must be a non-empty string, got {base_prompt!r}")
    if seeds_per_scene < 1:
        raise ValueError(f"seeds_per_scene must be at least 1, got {seeds_per_scene}")
    scenes = list(scenes)
    if not scenes:
        raise ValueError("scenes is empty: need at least one scene")
    jobs: list[ScenePrompt] = []
    for s, scene in enumerate(scenes):
        text = f"{base} {scene_phrase(scene)}"
        prompt = prompt_with_identity(identity, text) if identity is not None else text
        jobs += [(scene, prompt, scene_seed(seed, s, j)) for j in range(seeds_per_scene)]
    return jobs


def render_identity_in_scenes(
    generator: Generator,
    identity: Identity | None,
    base_prompt: str,
    scenes: Sequence[str] = SCENES,
    seeds_per_scene: int = 8,
    seed: int = 0,
) -> list[tuple[str, Image.Image]]:
    """Draws `identity` (or, with ``None``, the plain prompt) `seeds_per_scene` times in each scene.

    Args:
        generator: Any `Generator` (the default `SDXLGenerator` on ToyWorld's model).
        identity: A learned identity, applied for this call only; ``None`` draws the vanilla
            prompt, the baseline without identity.
        base_prompt: The prompt the identity was learned from, e.g. ``"a creature"``.
        scenes: ToyWorld scene names (default: all five).
        seeds_per_scene: Images per scene.
        seed: Picks the images; image ``j`` of scene ``s`` uses ``scene_seed(seed, s, j)``.

    Returns:
        ``(scene, image)`` pairs, scene by scene, in the order of `scene_prompts`.

    Example:
        >>> from consistent_char.generators.sdxl import SDXLGenerator
        >>> from consistent_char.testing import tiny_sdxl_pipeline
        >>> gen = SDXLGenerator.from_pipeline(tiny_sdxl_pipeline(), num_inference_steps=2)
        >>> drawn = render_identity_in_scenes(gen, None, "a creature", ["snow", "city"], 2)
        >>> [scene for scene, _ in drawn]
        ['snow', 'snow', 'city', 'city']
    """
    jobs = scene_prompts(identity, base_prompt, scenes, seeds_per_scene, seed)
    images = generator.generate([p for _, p, _ in jobs], [s for _, _, s in jobs], identity)
    if len(images) != len(jobs):
        raise RuntimeError(f"generator returned {len(images)} images for {len(jobs)} prompts")
    return [(job[0], image.convert("RGB")) for job, image in zip(jobs, images, strict=True)]


def score_records(
    records: Sequence[Mapping[str, str]],
    scenes: Sequence[str],
    *,
    base_prompt: str | None = None,
) -> dict[str, Any]:
    """ToyWorld's measures on probe records of images drawn in `scenes`.

    Args:
        records: One probe record per image (identity attributes and ``"scene"``).
        scenes: The scene each image's prompt asked for.
        base_prompt: If given, the identity attributes it names (``"a red creature"`` names
            ``color``; ``"wearing a hat"`` says the hat is not "none") are checked too:
            ``"base_prompt_adherence"``.

    Returns:
        ``identity_consistency`` (pairs across different scenes whose identity attributes all
        agree), ``prompt_adherence`` (images whose scene matches), ``n_images``,
        ``attribute_agreement`` (per identity attribute, the fraction of those pairs on which it
        agrees), ``distinct_identities`` and, with `base_prompt`, ``base_prompt_adherence``:
        the fraction of images whose probe agrees with every identity attribute the base prompt
        names (``None`` when it names none).
    """
    if len(records) != len(scenes):
        raise ValueError(f"got {len(records)} records but {len(scenes)} scenes")
    if len(set(scenes)) < 2:
        raise ValueError(
            "identity consistency counts pairs drawn in different scenes: need at least 2 scenes, "
            f"got {sorted(set(scenes))}"
        )
    agree = dict.fromkeys(IDENTITY_ATTRIBUTES, 0)
    pairs = 0
    for i, j in combinations(range(len(records)), 2):
        if scenes[i] == scenes[j]:
            continue
        pairs += 1
        for a in IDENTITY_ATTRIBUTES:
            agree[a] += records[i][a] == records[j][a]
    result: dict[str, Any] = {
        "identity_consistency": identity_consistency(records, scenes),
        "prompt_adherence": prompt_adherence(records, scenes),
        "n_images": len(records),
        "attribute_agreement": {a: agree[a] / pairs for a in IDENTITY_ATTRIBUTES},
        "distinct_identities": distinct_identities(records),
    }
    if base_prompt is not None:
        checks = _base_prompt_checks(base_prompt)
        result["base_prompt_adherence"] = (
            float(np.mean([all((r[a] == v) == eq for a, v, eq in checks) for r in records]))
            if checks
            else None
        )
    return result


def _base_prompt_checks(prompt: str) -> list[tuple[str, str, bool]]:
    """``(attribute, value, equal)`` per identity attribute the prompt names: the record's
    attribute must equal (or, with ``equal`` False, differ from) the value."""
    named = {a: v for a, v in parse_caption(prompt).items() if a in IDENTITY_ATTRIBUTES}
    checks = [(a, v, True) for a, v in named.items()]
    # "wearing a hat" (or "a red hat") names no hat type, but it does say there is one.
    if "hat" not in named and re.search(r"\bwearing an? ", prompt.lower()):
        checks.append(("hat", "none", False))
    return checks


def score_toy(
    images_with_scenes: Sequence[tuple[str, Image.Image]],
    probe: Probe,
    *,
    base_prompt: str | None = None,
) -> dict[str, Any]:
    """Reads `(scene, image)` pairs with the probe and scores them (see `score_records`).

    Example:
        >>> probe = toy.IdentityProbe.from_pretrained(toy.probe_dir())  # doctest: +SKIP
        >>> drawn = render_identity_in_scenes(gen, identity, "a creature")  # doctest: +SKIP
        >>> sorted(score_toy(drawn, probe))  # doctest: +SKIP
        ['attribute_agreement', 'distinct_identities', 'identity_consistency', 'n_images', ...]
    """
    scenes = [scene for scene, _ in images_with_scenes]
    records = probe.predict([image for _, image in images_with_scenes])
    if len(records) != len(scenes):
        raise RuntimeError(f"probe returned {len(records)} records for {len(scenes)} images")
    return score_records(records, scenes, base_prompt=base_prompt)
