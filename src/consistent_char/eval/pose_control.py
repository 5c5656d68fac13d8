"""Pose control in ToyWorld: does the drawn creature follow the pose, and is it the identity?

Each pose (drawn from `consistent_char.toy.pose.POSE_RANGES`) becomes a pose map, the control
image of ToyWorld's ControlNet. Every image is then read by the pose probe (an identity probe
with a pose head, trained on creatures in those poses):

- **control_followed**: the fraction of images whose read pose is within
  `consistent_char.toy.pose.POSE_TOLERANCE` of the asked one, in every field;
- **identity_kept**: the fraction whose five identity attributes are the identity's own (its
  `reference`: what the probe reads most often on the identity drawn without control).

Four ways of drawing are measured, so that each of the ControlNet and the identity shows its
own effect: the identity with and without the ControlNet, and plain prompting (the prompt
without the identity) with and without it.

Example:
    >>> args = (gen, controlled, identity, probe, reference, "a creature")  # doctest: +SKIP
    >>> section, images = score_pose_control(*args)  # doctest: +SKIP
    >>> section["controlnet"]["identity"]["control_followed"]  # doctest: +SKIP
    0.95
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from consistent_char.identity import Identity
from consistent_char.toy.captions import scene_phrase
from consistent_char.toy.evaluate import identity_kept
from consistent_char.toy.pose import (
    POSE,
    POSE_TOLERANCE,
    pose_followed,
    pose_map,
    pose_of,
    sample_pose,
)
from consistent_char.toy.world import SCENES
from consistent_char.usage import prompt_with_identity

__all__ = ["PoseJob", "pose_jobs", "score_pose_control"]

#: Mixed into the seeds so that pose control never draws with the loop's or another
#: evaluation's starting noise.
_POSE_SEED_TAG = 0x905E
#: The same for calibration poses (`pose_jobs(..., calibration=True)`), which no evaluation
#: draws.
_CALIBRATION_TAG = 0xCA1B


class PoseJob:
    """One image to draw: its scene, asked pose (`POSE` fields) and seed."""

    def __init__(self, scene: str, pose: dict[str, float], seed: int) -> None:
        self.scene, self.pose, self.seed = scene, pose, seed

    def prompt(self, base_prompt: str, identity: Identity | None) -> str:
        text = f"{' '.join(base_prompt.split())} {scene_phrase(self.scene)}"
        return prompt_with_identity(identity, text) if identity is not None else text


def pose_jobs(
    poses: int, per_pose: int, seed: int = 0, *, calibration: bool = False
) -> list[PoseJob]:
    """`poses` poses drawn from `POSE_RANGES` (scenes in turn), each drawn `per_pose` times;
    with `calibration`, poses and seeds of another stream, for choosing settings on poses the
    evaluation does not measure."""
    if poses < 1 or per_pose < 1:
        raise ValueError(f"need at least one pose and one image per pose, got {poses}, {per_pose}")
    tag = _CALIBRATION_TAG if calibration else _POSE_SEED_TAG
    rng = np.random.default_rng([tag, seed])
    jobs = []
    for p in range(poses):
        pose = sample_pose(rng)
        seeds = np.random.SeedSequence([tag, seed, p]).generate_state(per_pose)
        jobs += [PoseJob(SCENES[p % len(SCENES)], pose, int(s)) for s in seeds]
    return jobs


def score_pose_control(
    generator: Any,
    controlled: Any,
    identity: Identity,
    probe: Any,
    reference: Mapping[str, str],
    base_prompt: str,
    *,
    poses: int = 10,
    per_pose: int = 4,
    seed: int = 0,
) -> tuple[dict[str, Any], dict[str, list[Image.Image]]]:
    """Draws the four ways (identity or plain prompt, with or without the ControlNet) on the
    same poses, prompts and seeds, and reads each image with the pose probe.

    Args:
        generator: An `SDXLGenerator` on the base model.
        controlled: A `consistent_char.control.ControlledGenerator` on the same model.
        identity: The identity to draw.
        probe: An `IdentityProbe` with a pose head (`consistent_char.toy.pose_probe_dir`).
        reference: The identity's attributes as `probe` reads them
            (`consistent_char.toy.evaluate.majority_identity` of its plain images).
        base_prompt: The prompt the identity was learned from, e.g. ``"a creature"``.
        poses, per_pose, seed: What `pose_jobs` draws.

    Returns:
        The section (``{"controlnet" | "no_controlnet": {"identity" | "plain_prompt":
        {"control_followed", "identity_kept"}}, ...}``) and the images of each way, by name.
    """
    jobs = pose_jobs(poses, per_pose, seed)
    asked = pose_of([j.pose for j in jobs])
    maps = [pose_map(j.pose) for j in jobs]
    seeds = [j.seed for j in jobs]
    section: dict[str, Any] = {"controlnet": {}, "no_controlnet": {}}
    drawn: dict[str, list[Image.Image]] = {}
    for who, ident in (("identity", identity), ("plain_prompt", None)):
        prompts = [j.prompt(base_prompt, ident) for j in jobs]
        for way in ("controlnet", "no_controlnet"):
            if way == "controlnet":
                images = controlled.generate(prompts, seeds, ident, control_images=maps)
            else:
                images = generator.generate(prompts, seeds, ident)
            attributes, poses_read = probe.predict_with_pose(images)
            within = np.abs(poses_read - asked) <= [POSE_TOLERANCE[k] for k in POSE]
            section[way][who] = {
                "control_followed": float(np.mean(pose_followed(poses_read, asked))),
                "identity_kept": identity_kept(attributes, reference),
                # Which fields of the pose are followed, each alone.
                "fields_followed": {k: float(within[:, i].mean()) for i, k in enumerate(POSE)},
            }
            drawn[f"{way}/{who}"] = images
    section.update(
        poses=poses,
        images_per_pose=per_pose,
        fields=list(POSE),
        reference=dict(reference),
    )
    return section, drawn
