"""ToyWorld's local-editing measure: an identity drawn into the region of another creature.

For each scene, ToyWorld renders images of some creature (drawn from the world's prior, never the
identity itself); the region to edit is where a creature at that place could be drawn
(`edit_region`). `blended_edit` redraws it from the identity's prompt in that scene, and the
identity probe reads the result:

- **identity_kept**: the fraction of edited images whose five identity attributes all equal the
  identity's reference attributes, the probe's majority reading of the identity drawn plainly in
  the scenes (`reference_identity`);
- **outside_unchanged**: the mean, over images, of the fraction of pixels outside the mask whose
  every channel is within 2/255 of the input.

The baseline edits the same images, masks and seeds with the plain prompt and no identity.

Example:
    >>> import consistent_char.toy as toy
    >>> gen = SDXLGenerator.from_pretrained(toy.model_dir(), **settings)  # doctest: +SKIP
    >>> probe = toy.IdentityProbe.from_pretrained(toy.probe_dir())  # doctest: +SKIP
    >>> scores = score_local_edit(gen, identity, probe, "a creature")  # doctest: +SKIP
    >>> scores["identity_kept"], scores["baseline"]["identity_kept"]  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageFilter

from consistent_char.edit import blended_edit
from consistent_char.eval.toy import Probe, render_identity_in_scenes, scene_prompts
from consistent_char.identity import Identity
from consistent_char.toy.evaluate import identity_key, majority_identity
from consistent_char.toy.world import (
    HATS,
    IDENTITY_ATTRIBUTES,
    SCENES,
    SHAPES,
    CreatureRecord,
    creature_mask,
    record_with,
    render,
    sample_record,
)

if TYPE_CHECKING:
    from consistent_char.generators.sdxl import SDXLGenerator

__all__ = [
    "EditCase",
    "edit_cases",
    "edit_region",
    "outside_unchanged",
    "reference_identity",
    "score_local_edit",
]

#: Tag of the edit images' seeds, apart from the seeds `render_identity_in_scenes` draws with.
_EDIT_SEED_TAG = 0xED17
#: A pixel counts as unchanged when every channel is within this many levels of the input.
UNCHANGED_LEVELS = 2
#: Pixels the region grows by beyond any creature's outline, so the edit has room for its edge.
REGION_MARGIN = 2


@dataclass(frozen=True)
class EditCase:
    """One image to edit: its scene, the ToyWorld record it renders, the image, the mask."""

    scene: str
    record: CreatureRecord
    image: Image.Image
    mask: Image.Image
    seed: int


def edit_region(record: CreatureRecord, *, margin: int = REGION_MARGIN) -> Image.Image:
    """Where any creature placed as in `record` could be drawn, grown by `margin` pixels.

    The union of the outlines of every body shape with every hat (the tallest and widest
    creatures) at the record's position, size and tilt: the identity fits whatever the creature
    it replaces looked like, and the region covers that creature entirely.
    """
    union = np.zeros(creature_mask(record).size[::-1], dtype=bool)
    for shape in SHAPES:
        for hat in HATS:
            hat_color = "none" if hat == "none" else "red"
            placed = record_with(record, shape=shape, hat=hat, hat_color=hat_color)
            union |= np.asarray(creature_mask(placed)) > 0
    region = Image.fromarray(np.where(union, 255, 0).astype(np.uint8))
    return region.filter(ImageFilter.MaxFilter(2 * margin + 1)) if margin else region


def edit_cases(
    scenes: Sequence[str] = SCENES,
    per_scene: int = 8,
    seed: int = 0,
    *,
    avoid: tuple[str, ...] | None = None,
) -> list[EditCase]:
    """`per_scene` ToyWorld images per scene, each with its creature's `edit_region` as mask.

    Args:
        scenes: Scene names.
        per_scene: Images per scene.
        seed: Picks the images and the edit seeds (reproducible).
        avoid: An identity tuple (`CreatureRecord.identity`) the creatures must not have, so an
            edit cannot keep an identity by keeping the input's creature.
    """
    cases: list[EditCase] = []
    for s, scene in enumerate(scenes):
        rng = np.random.default_rng([_EDIT_SEED_TAG, seed, s])
        for j in range(per_scene):
            record = sample_record(rng, scene=scene)
            while record.identity == avoid:
                record = sample_record(rng, scene=scene)
            state = np.random.SeedSequence([_EDIT_SEED_TAG, seed, s, j]).generate_state(
                1, dtype=np.uint64
            )
            cases.append(
                EditCase(scene, record, render(record), edit_region(record), int(state[0] >> 1))
            )
    return cases


def reference_identity(
    generator: SDXLGenerator,
    identity: Identity,
    probe: Probe,
    base_prompt: str,
    scenes: Sequence[str] = SCENES,
    per_scene: int = 8,
    seed: int = 0,
) -> dict[str, str]:
    """The identity's attributes: the probe's majority reading of it drawn plainly in `scenes`."""
    drawn = render_identity_in_scenes(generator, identity, base_prompt, scenes, per_scene, seed)
    return majority_identity(probe.predict([image for _, image in drawn]))


def outside_unchanged(
    image: Image.Image, edited: Image.Image, mask: Image.Image, levels: int = UNCHANGED_LEVELS
) -> float:
    """The fraction of pixels outside `mask` (< 0.5) whose every channel of `edited` is within
    `levels` of `image`."""
    outside = np.asarray(mask.convert("L")) < 128
    diff = np.abs(np.asarray(image, dtype=np.int16) - np.asarray(edited.convert("RGB"), np.int16))
    return float((diff.max(axis=-1) <= levels)[outside].mean())


def score_local_edit(
    generator: SDXLGenerator,
    identity: Identity,
    probe: Probe,
    base_prompt: str,
    scenes: Sequence[str] = SCENES,
    per_scene: int = 8,
    seed: int = 0,
    *,
    strength: float = 1.0,
    reference: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Edits the identity into `per_scene` ToyWorld images per scene, and the plain prompt into
    the same images, and scores both (see the module's docstring).

    Args:
        generator: An `SDXLGenerator` on ToyWorld's model, with the identity's settings.
        identity: The identity to edit in.
        probe: Reads the attributes back (`consistent_char.toy.IdentityProbe`).
        base_prompt: The prompt the identity was learned from, e.g. ``"a creature"``.
        scenes: Scene names (default: all five).
        per_scene: Images per scene.
        seed: Picks the images, the edit seeds and the reference images.
        strength: `consistent_char.config.EditConfig.strength`.
        reference: The identity's attributes, if known; ``None`` measures them
            (`reference_identity`, ``per_scene`` images per scene).

    Returns:
        ``{"per_scene": {scene: {"identity_kept", "outside_unchanged", "n"}}, "identity_kept",
        "outside_unchanged", "n", "reference", "baseline": {the same without identity}}``.
    """
    if reference is None:
        reference = reference_identity(
            generator, identity, probe, base_prompt, scenes, per_scene, seed
        )
    key = tuple(reference[a] for a in IDENTITY_ATTRIBUTES)
    cases = edit_cases(scenes, per_scene, seed, avoid=key)
    scores: dict[str, Any] = {}
    for name, who in (("identity", identity), ("baseline", None)):
        edited = edit_cases_with(generator, cases, who, base_prompt, strength=strength)
        kept = [identity_key(r) == key for r in probe.predict(edited)]
        unchanged = [
            outside_unchanged(c.image, e, c.mask) for c, e in zip(cases, edited, strict=True)
        ]
        scores[name] = _summary(cases, kept, unchanged)
    return {**scores["identity"], "reference": reference, "baseline": scores["baseline"]}


def edit_cases_with(
    generator: SDXLGenerator,
    cases: Sequence[EditCase],
    identity: Identity | None,
    base_prompt: str,
    *,
    strength: float = 1.0,
) -> list[Image.Image]:
    """Each case edited with the identity (or, with ``None``, the plain prompt) in its scene:
    ``<token> a creature`` + the scene's phrase, at the case's seed."""
    scenes = list(dict.fromkeys(c.scene for c in cases))
    # Only the prompts are used: each case has its own seed.
    prompts = {s: p for s, p, _ in scene_prompts(identity, base_prompt, scenes, 1)}
    return blended_edit(
        generator,
        [c.image for c in cases],
        [c.mask for c in cases],
        [prompts[c.scene] for c in cases],
        [c.seed for c in cases],
        identity,
        strength=strength,
    )


def _summary(
    cases: Sequence[EditCase], kept: Sequence[bool], unchanged: Sequence[float]
) -> dict[str, Any]:
    per_scene: dict[str, dict[str, Any]] = {}
    for scene in dict.fromkeys(c.scene for c in cases):
        idx = [i for i, c in enumerate(cases) if c.scene == scene]
        per_scene[scene] = {
            "identity_kept": float(np.mean([kept[i] for i in idx])),
            "outside_unchanged": float(np.mean([unchanged[i] for i in idx])),
            "n": len(idx),
        }
    return {
        "per_scene": per_scene,
        "identity_kept": float(np.mean(kept)),
        "outside_unchanged": float(np.mean(unchanged)),
        "n": len(cases),
    }
