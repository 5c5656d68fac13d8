"""ToyWorld's prior over identities: a few popular, fully featured archetypes and a long tail.

A real text-to-image model's prior is peaked: "a watercolor fox with a scarf" gives many
near-duplicates of a few looks, and the paper's clustering relies on that. ToyWorld's prior is
built the same way, and its weights are the world's documented ground truth:

- `ARCHETYPES` (12 identities, every one with clear eyes and 10 of them with a hat) share
  `ARCHETYPE_MASS` of the probability, archetype ``k`` (from 1) in proportion to
  ``1 / (k + ARCHETYPE_OFFSET)`` (a Zipf law with a flattened head, so that the first few are
  about equally popular);
- every other identity is in the tail, in a fixed random order (seeded by `TAIL_SEED`), the
  ``j``-th in proportion to ``1 / j ** TAIL_EXPONENT``.

A prompt's creature is drawn from the identities that match what the prompt names, by these
weights (`conditional`): "a creature" draws from all of them and stays diverse, while naming one
attribute leaves a peaked draw, since every attribute value has an archetype (`peaks` measures
both).

Example:
    >>> import numpy as np
    >>> top = peaks()["a creature"]
    >>> 0.05 < top["top_share"] < 0.25
    True
    >>> sample_identity(np.random.default_rng(0), color="red")[1]
    'red'
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import numpy as np

from consistent_char.toy.world import (
    ATTRIBUTES,
    COLORS,
    EYES,
    HATS,
    IDENTITY_ATTRIBUTES,
    SHAPES,
)

__all__ = [
    "ARCHETYPES",
    "ARCHETYPE_MASS",
    "ARCHETYPE_OFFSET",
    "PRIORS",
    "TAIL_EXPONENT",
    "TAIL_SEED",
    "conditional",
    "identities",
    "identity_weights",
    "peaks",
    "sample_identity",
]

#: The popular identities, most popular first: (shape, color, hat, hat_color, eyes). Together
#: they name every value of every identity attribute, so each one-attribute prompt has a mode.
ARCHETYPES: tuple[tuple[str, str, str, str, str], ...] = (
    ("round", "blue", "crown", "red", "big"),
    ("square", "yellow", "wizard", "purple", "cyclops"),
    ("tall", "pink", "tophat", "green", "big"),
    ("triangle", "red", "cap", "blue", "dots"),
    ("diamond", "green", "crown", "yellow", "big"),
    ("round", "purple", "cap", "pink", "cyclops"),
    ("square", "red", "tophat", "yellow", "big"),
    ("tall", "green", "wizard", "red", "dots"),
    ("round", "yellow", "tophat", "blue", "sleepy"),
    ("triangle", "blue", "none", "none", "big"),
    ("diamond", "purple", "crown", "green", "sleepy"),
    ("square", "pink", "none", "none", "dots"),
)
ARCHETYPE_MASS = 0.6
ARCHETYPE_OFFSET = 2.0
TAIL_EXPONENT = 0.6
TAIL_SEED = 2311
#: ``"world"``: the weights above; ``"uniform"``: every identity equally likely (the probe's
#: training set, and tests that need every identity often).
PRIORS: tuple[str, ...] = ("world", "uniform")


@lru_cache(maxsize=1)
def identities() -> tuple[tuple[str, ...], ...]:
    """Every valid identity (a creature without a hat has hat colour "none"), in a fixed order."""
    out = []
    for shape in SHAPES:
        for color in COLORS:
            for eyes in EYES:
                out.append((shape, color, "none", "none", eyes))
                for hat in HATS[1:]:
                    for hat_color in COLORS:
                        out.append((shape, color, hat, hat_color, eyes))
    return tuple(out)


@lru_cache(maxsize=1)
def _index_table() -> np.ndarray:
    """``(n_identities, 5)`` value indices, columns in `IDENTITY_ATTRIBUTES` order."""
    return np.array(
        [
            [ATTRIBUTES[a].index(v) for a, v in zip(IDENTITY_ATTRIBUTES, ident, strict=True)]
            for ident in identities()
        ],
        dtype=np.int64,
    )


@lru_cache(maxsize=2)
def identity_weights(prior: str = "world") -> np.ndarray:
    """The probability of each identity of `identities()` under `prior` (sums to 1)."""
    if prior not in PRIORS:
        raise ValueError(f"prior must be one of {list(PRIORS)}, got {prior!r}")
    everyone = identities()
    n = len(everyone)
    if prior == "uniform":
        return np.full(n, 1.0 / n)
    position = {ident: i for i, ident in enumerate(everyone)}
    weights = np.zeros(n)
    head = 1.0 / (np.arange(1, len(ARCHETYPES) + 1) + ARCHETYPE_OFFSET)
    for ident, w in zip(ARCHETYPES, head / head.sum(), strict=True):
        weights[position[ident]] = ARCHETYPE_MASS * w
    tail = np.array([i for i in range(n) if weights[i] == 0.0])
    tail = np.random.default_rng(TAIL_SEED).permutation(tail)
    tail_w = 1.0 / np.arange(1, len(tail) + 1) ** TAIL_EXPONENT
    weights[tail] = (1.0 - ARCHETYPE_MASS) * tail_w / tail_w.sum()
    weights.setflags(write=False)
    return weights


def conditional(prior: str = "world", **fixed: str) -> tuple[np.ndarray, np.ndarray]:
    """The identities that match `fixed` identity attributes and their probabilities.

    Naming a hat colour other than "none" implies a hat; naming ``hat="none"`` implies
    ``hat_color="none"`` (an identity tuple holds both, so filtering does it).

    Returns:
        ``(indices into identities(), probabilities summing to 1)``.

    Raises:
        ValueError: An unknown attribute or value, or a combination no identity has
            (``hat="none", hat_color="red"``).
    """
    table = _index_table()
    mask = np.ones(len(table), dtype=bool)
    for name, value in fixed.items():
        if name not in IDENTITY_ATTRIBUTES:
            raise ValueError(f"unknown identity attribute {name!r}; known: {IDENTITY_ATTRIBUTES}")
        if value not in ATTRIBUTES[name]:
            raise ValueError(f"{name} must be one of {list(ATTRIBUTES[name])}, got {value!r}")
        mask &= table[:, IDENTITY_ATTRIBUTES.index(name)] == ATTRIBUTES[name].index(value)
    indices = np.flatnonzero(mask)
    if indices.size == 0:
        raise ValueError(f"no identity has {fixed}")
    weights = identity_weights(prior)[indices]
    return indices, weights / weights.sum()


def sample_identity(
    rng: np.random.Generator, prior: str = "world", **fixed: str
) -> tuple[str, ...]:
    """Draws one identity from `prior` conditioned on `fixed` (one uniform draw from `rng`,
    whatever is fixed, so pinning does not shift later draws)."""
    indices, probs = conditional(prior, **fixed)
    u = rng.random()
    k = min(int(np.searchsorted(np.cumsum(probs), u, side="right")), len(indices) - 1)
    return identities()[int(indices[k])]


def peaks(prior: str = "world") -> dict[str, dict[str, Any]]:
    """How peaked the draw is for "a creature" and for each one-attribute condition.

    Returns:
        ``{label: {"fixed", "top_identity", "top_share", "candidates"}}``; labels are
        ``"a creature"`` and ``"attribute=value"`` for every identity attribute value.
    """
    out: dict[str, dict[str, Any]] = {}
    conditions: list[tuple[str, Mapping[str, str]]] = [("a creature", {})]
    for name in IDENTITY_ATTRIBUTES:
        for value in ATTRIBUTES[name]:
            conditions.append((f"{name}={value}", {name: value}))
    for label, fixed in conditions:
        indices, probs = conditional(prior, **fixed)
        k = int(np.argmax(probs))
        out[label] = {
            "fixed": dict(fixed),
            "top_identity": list(identities()[int(indices[k])]),
            "top_share": float(probs[k]),
            "candidates": int(indices.size),
        }
    return out
