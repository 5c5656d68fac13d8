"""What a run keeps and loses from iteration to iteration, read by ToyWorld's probe.

A loop that trains on its own images can fade: it may keep clustering and converging while the
character it learned loses its eyes, its hat, its scenes, and finally its shape. Two measures
tell a kept character from a faded one:

- **drift**: the modal identity attributes of the cluster chosen at iteration 0 (the character
  the loop set out to learn), against those of the final identity's images; ``kept`` is the
  fraction of identity attributes on which they agree;
- **validity**: per iteration, the fraction of the loop's images that the probe takes for
  ToyWorld images (`IdentityProbe.predict_validity`); blurred, eyeless or blended creatures
  are not.

`iteration_measures` also reports, per iteration, how the images agree with iteration 0's
chosen character attribute by attribute, how confidently the probe reads them (detail), and
which scenes they show (a loop that drifts into one background). The loop never uses any of
this; it is for evaluation only.

Example:
    >>> records = [{"shape": "round", "color": "red", "hat": "cap", "hat_color": "blue",
    ...             "eyes": "big", "scene": "snow"}] * 3
    >>> modal_identity(records)["color"]
    'red'
    >>> kept(modal_identity(records), {**modal_identity(records), "hat": "none"})
    0.8
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from consistent_char.clusterers.selection import saved_members
from consistent_char.rundir import RunDirectory
from consistent_char.toy.world import IDENTITY_ATTRIBUTES, SCENES

__all__ = [
    "drift",
    "IterationReading",
    "image_validity",
    "iteration_measures",
    "iteration_readings",
    "kept",
    "min_validity",
    "modal_identity",
]

#: The probe reads an image "confidently" when every identity attribute's top class has at
#: least this probability.
CONFIDENT = 0.9


def modal_identity(records: Sequence[Mapping[str, str]]) -> dict[str, str]:
    """The most frequent value of each identity attribute among probe records (ties: the
    value seen first)."""
    if not records:
        raise ValueError("modal_identity needs at least one record")
    return {a: Counter(r[a] for r in records).most_common(1)[0][0] for a in IDENTITY_ATTRIBUTES}


def kept(first: Mapping[str, str], last: Mapping[str, str]) -> float:
    """The fraction of identity attributes on which two identities agree."""
    return float(np.mean([first[a] == last[a] for a in IDENTITY_ATTRIBUTES]))


def image_validity(probe: Any, images: Sequence[Image.Image]) -> float | None:
    """The fraction of `images` the probe takes for ToyWorld images, or ``None`` for a probe
    without a validity head."""
    if not hasattr(probe, "predict_validity") or getattr(probe, "valid_head", True) is None:
        return None
    return float((np.asarray(probe.predict_validity(images)) >= 0.5).mean())


def _confident(probe: Any, images: Sequence[Image.Image]) -> float | None:
    outputs = getattr(probe, "_outputs", None)
    if outputs is None:
        return None
    probs = outputs(images, 256)
    top = np.stack([probs[a].max(axis=-1) for a in IDENTITY_ATTRIBUTES], axis=1)
    return float((top.min(axis=1) >= CONFIDENT).mean())


def _iteration_images(run: RunDirectory, iteration: int) -> list[Image.Image]:
    folder = run.iter_dir(iteration) / "images"
    paths = sorted(folder.glob("[0-9][0-9][0-9][0-9].png"))
    images = []
    for path in paths:
        with Image.open(path) as im:
            images.append(im.convert("RGB"))
    return images


def _chosen_members(run: RunDirectory, iteration: int, n: int) -> list[int] | None:
    path = run.clusters_path(iteration)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    labels, chosen = data.get("labels"), data.get("chosen")
    if labels is None or chosen is None or len(labels) != n:
        return None
    return saved_members(data)


@dataclass
class IterationReading:
    """One iteration of a run as the probe reads it."""

    iteration: int
    images: list[Image.Image]
    records: list[dict[str, str]]  # the probe's reading of each image
    members: list[int] | None  # the chosen cluster's image indices (None: not clustered)


def iteration_readings(run_dir: str | os.PathLike[str], probe: Any) -> Iterator[IterationReading]:
    """Reads every iteration's images of a run with the probe, one iteration at a time, from
    iteration 0 up to the first without images."""
    run = RunDirectory(run_dir)
    iteration = 0
    while run.iter_dir(iteration).is_dir():
        images = _iteration_images(run, iteration)
        if not images:
            return
        members = _chosen_members(run, iteration, len(images))
        yield IterationReading(iteration, images, probe.predict(images), members)
        iteration += 1


def iteration_measures(run_dir: str | os.PathLike[str], probe: Any) -> list[dict[str, Any]]:
    """Reads every iteration's images of a run with the probe.

    Returns:
        One entry per iteration that has images: ``iteration``, ``n_images``, ``validity``
        (`image_validity`), ``confident`` (the fraction read with every identity attribute
        at probability >= 0.9), ``modal`` (the images' modal identity), ``chosen_modal`` (that
        of the cluster chosen at this iteration, if it was clustered), ``agreement`` (per
        identity attribute, the fraction of the images that agree with iteration 0's chosen
        cluster's modal identity; all ``None`` when iteration 0 has no chosen cluster),
        ``identity_share`` (the fraction with all five attributes of it) and ``scenes`` (the
        fraction of images in each scene).
    """
    out: list[dict[str, Any]] = []
    reference: dict[str, str] | None = None
    for reading in iteration_readings(run_dir, probe):
        images, records, members = reading.images, reading.records, reading.members
        chosen_modal = modal_identity([records[j] for j in members]) if members else None
        if reading.iteration == 0:
            reference = chosen_modal
        entry: dict[str, Any] = {
            "iteration": reading.iteration,
            "n_images": len(images),
            "validity": image_validity(probe, images),
            "confident": _confident(probe, images),
            "modal": modal_identity(records),
            "chosen_modal": chosen_modal,
            "agreement": {
                a: (
                    float(np.mean([r[a] == reference[a] for r in records]))
                    if reference is not None
                    else None
                )
                for a in IDENTITY_ATTRIBUTES
            },
            "identity_share": (
                float(np.mean([kept(r, reference) == 1.0 for r in records]))
                if reference is not None
                else None
            ),
            "scenes": {s: float(np.mean([r["scene"] == s for r in records])) for s in SCENES},
        }
        out.append(entry)
    return out


def drift(
    iterations: Sequence[Mapping[str, Any]], final_records: Sequence[Mapping[str, str]]
) -> dict[str, Any]:
    """Iteration 0's chosen character against the final identity's images.

    Args:
        iterations: `iteration_measures` of the run.
        final_records: Probe records of images drawn with the final identity (e.g. those
            `evaluate_run` draws in every scene).

    Returns:
        ``{"chosen": modal identity of iteration 0's chosen cluster, "final": modal identity of
        `final_records`, "kept": fraction of identity attributes that agree,
        "attributes": {attribute: agree?}}``; ``chosen`` and ``kept`` are ``None`` when
        iteration 0 was not clustered.
    """
    chosen = iterations[0]["chosen_modal"] if iterations else None
    final = modal_identity(final_records)
    return {
        "chosen": chosen,
        "final": final,
        "kept": kept(chosen, final) if chosen is not None else None,
        "attributes": (
            {a: chosen[a] == final[a] for a in IDENTITY_ATTRIBUTES} if chosen is not None else None
        ),
    }


def min_validity(iterations: Sequence[Mapping[str, Any]]) -> float | None:
    """The lowest validity over a run's iterations (``None`` if the probe has no validity)."""
    values = [m["validity"] for m in iterations if m.get("validity") is not None]
    return min(values) if values else None
