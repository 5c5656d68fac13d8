"""ToyWorld's caption grammar: a caption names any subset of a creature's attributes.

::

    a [color] [shape] creature [with <eyes>] [wearing a [hat color] <hat> | with no hat] [<scene>]

"a creature" names nothing and so fits every image; the full caption pins one identity in one
scene. Every word of the grammar is in `VOCABULARY`, which the toy tokenizers hold as single
tokens.

Example:
    >>> from consistent_char.toy.world import CreatureRecord
    >>> r = CreatureRecord("round", "blue", "crown", "red", "sleepy", "forest")
    >>> caption(r, ["color", "shape"])
    'a blue round creature'
    >>> full_caption(r)
    'a blue round creature with sleepy eyes wearing a red crown in the forest'
    >>> parse_scene("<cc-0> a creature at night")
    'night'
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np

from consistent_char.toy.world import (
    ATTRIBUTES,
    COLORS,
    EYES,
    HATS,
    IDENTITY_ATTRIBUTES,
    SCENES,
    SHAPES,
    CreatureRecord,
)

__all__ = [
    "SCENE_PHRASES",
    "VOCABULARY",
    "caption",
    "full_caption",
    "parse_caption",
    "parse_scene",
    "sample_caption",
    "scene_phrase",
]

SCENE_PHRASES: dict[str, str] = {
    "forest": "in the forest",
    "beach": "on the beach",
    "night": "at night",
    "snow": "in the snow",
    "city": "in the city",
}
_EYE_PHRASES: dict[str, str] = {
    "dots": "with dot eyes",
    "big": "with big eyes",
    "sleepy": "with sleepy eyes",
    "cyclops": "with one eye",
}
_HAT_WORDS: dict[str, str] = {
    "cap": "cap",
    "crown": "crown",
    "tophat": "top hat",
    "wizard": "wizard hat",
}
_NO_HAT = "with no hat"

#: Every word the grammar uses (lower case, sorted): the toy tokenizers' vocabulary.
VOCABULARY: tuple[str, ...] = tuple(
    sorted(
        {"a", "creature", "wearing", "hat"}
        | set(SHAPES)
        | set(COLORS)
        | {w for p in (*SCENE_PHRASES.values(), *_EYE_PHRASES.values()) for w in p.split()}
        | {w for p in _HAT_WORDS.values() for w in p.split()}
        | set(_NO_HAT.split())
    )
)

assert set(SCENE_PHRASES) == set(SCENES) and set(_EYE_PHRASES) == set(EYES)
assert set(_HAT_WORDS) == set(HATS) - {"none"}


def scene_phrase(scene: str) -> str:
    """The words that put a creature in `scene`, e.g. ``"in the snow"``."""
    if scene not in SCENE_PHRASES:
        raise ValueError(f"scene must be one of {list(SCENE_PHRASES)}, got {scene!r}")
    return SCENE_PHRASES[scene]


def parse_scene(prompt: str) -> str | None:
    """The scene a prompt names (``"... in the snow"`` → ``"snow"``), or ``None``."""
    text = " ".join(prompt.lower().split())
    for scene, phrase in SCENE_PHRASES.items():
        if re.search(rf"(^|\s){re.escape(phrase)}($|\s|[.,!])", text):
            return scene
    return None


def caption(record: CreatureRecord, names: Iterable[str], *, hat_before_eyes: bool = False) -> str:
    """A caption that names exactly the attributes in `names` (keys of `ATTRIBUTES`).

    For a creature without a hat, naming ``hat`` or ``hat_color`` gives "with no hat".
    """
    named = set(names)
    unknown = named - set(ATTRIBUTES)
    if unknown:
        raise ValueError(f"unknown attributes {sorted(unknown)}; known: {list(ATTRIBUTES)}")
    words = ["a"]
    if "color" in named:
        words.append(record.color)
    if "shape" in named:
        words.append(record.shape)
    words.append("creature")
    eyes = _EYE_PHRASES[record.eyes] if "eyes" in named else ""
    hat = ""
    if named & {"hat", "hat_color"}:
        if record.hat == "none":
            hat = _NO_HAT
        else:
            color = f"{record.hat_color} " if "hat_color" in named else ""
            kind = _HAT_WORDS[record.hat] if "hat" in named else "hat"
            hat = f"wearing a {color}{kind}"
    phrases = [hat, eyes] if hat_before_eyes else [eyes, hat]
    words.extend(p for p in phrases if p)
    if "scene" in named:
        words.append(SCENE_PHRASES[record.scene])
    return " ".join(words)


def full_caption(record: CreatureRecord, *, scene: bool = True) -> str:
    """The caption naming every identity attribute (and the scene, unless ``scene=False``)."""
    return caption(record, [*IDENTITY_ATTRIBUTES, *(["scene"] if scene else [])])


def sample_caption(
    record: CreatureRecord, rng: np.random.Generator, *, p_full: float = 0.25
) -> str:
    """A training caption: with probability `p_full` the full caption, else a random subset.

    Each subset caption first draws a rate ``q ~ U(0, 1)`` and names each attribute with
    probability ``q``, so both vague ("a creature") and nearly full captions are common.
    """
    hat_first = bool(rng.random() < 0.5)
    if rng.random() < p_full:
        return caption(record, ATTRIBUTES, hat_before_eyes=hat_first)
    q = rng.random()
    keep = rng.random(len(ATTRIBUTES)) < q
    return caption(
        record, [a for a, k in zip(ATTRIBUTES, keep, strict=True) if k], hat_before_eyes=hat_first
    )


def parse_caption(prompt: str) -> dict[str, str]:
    """The attributes a grammar caption names, by name (words outside the grammar are skipped).

    ``"a red creature wearing a hat"`` names no hat type: only ``color`` is returned, and a
    ``hat`` that is not "none" is implied but not returned.
    """
    text = " " + " ".join(prompt.lower().split()) + " "
    found: dict[str, str] = {}
    scene = parse_scene(text)
    if scene is not None:
        found["scene"] = scene
    for eyes, phrase in _EYE_PHRASES.items():
        if f" {phrase} " in text:
            found["eyes"] = eyes
    if f" {_NO_HAT} " in text:
        found["hat"] = found["hat_color"] = "none"
    colors, kinds = "|".join(COLORS), "|".join([*_HAT_WORDS.values(), "hat"])
    hat = re.search(rf" wearing a (?:({colors}) )?({kinds}) ", text)
    if hat:
        color, kind = hat.group(1), hat.group(2)
        if color is not None:
            found["hat_color"] = color
        for name, word in _HAT_WORDS.items():
            if word == kind:
                found["hat"] = name
    body = re.search(r" a ((?:\w+ ){0,2})creature ", text)
    if body:
        for word in body.group(1).split():
            if word in COLORS:
                found["color"] = word
            elif word in SHAPES:
                found["shape"] = word
    return {a: found[a] for a in ATTRIBUTES if a in found}
