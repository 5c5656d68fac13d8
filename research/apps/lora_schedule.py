"""Pose control with the identity's LoRA scale changing along the denoising: which steps does
the LoRA's pull towards the middle act in? Each schedule is ``[scale early, scale late, switch]``
(the fraction of the steps after which the late scale applies), with an optional fourth:
a ControlNet scale added after the switch (a second copy of the ControlNet, diffusers'
multi-ControlNet with ``control_guidance_start``). ``[1, 1, 0]`` is the baseline, drawn here
the same way (unfused LoRA, one diffusers call per 40 images).

    python research/apps/lora_schedule.py IDENTITY '[[1, 1, 0], [1, 0.6, 0.5], [0.6, 1, 0.5]]' \
        [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

import consistent_char.toy as toy
from consistent_char.control import control_pipeline, load_controlnet
from consistent_char.eval.pose_control import pose_jobs
from consistent_char.generators.sdxl import SDXLGenerator
from consistent_char.identity import Identity
from consistent_char.toy.evaluate import identity_kept
from consistent_char.toy.pose import POSE, POSE_TOLERANCE, pose_followed, pose_map, pose_of
from consistent_char.toy.probe import IdentityProbe

REFERENCE = {"shape": "round", "color": "blue", "hat": "crown", "hat_color": "red", "eyes": "big"}


def main() -> None:
    from diffusers import EulerAncestralDiscreteScheduler

    parser = argparse.ArgumentParser()
    parser.add_argument("identity")
    parser.add_argument("schedules")
    parser.add_argument("--seed", type=int, default=0, help="picks the poses and seeds")
    parser.add_argument("--guidance", type=float, default=3.0)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    identity = Identity.load(args.identity)
    base = SDXLGenerator.from_pretrained(str(toy.model_dir()), device="cpu").pipeline
    controlnet = load_controlnet("toy", device="cpu")
    pipe = control_pipeline(base, controlnet)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    identity.apply_to(pipe, scale=1.0)
    name = identity.adapter_name
    probe = IdentityProbe.from_pretrained(toy.pose_probe_dir())
    jobs = pose_jobs(20, 4, args.seed)
    asked = pose_of([j.pose for j in jobs])
    tolerance = np.array([POSE_TOLERANCE[k] for k in POSE])
    steps = 20
    from diffusers import MultiControlNetModel

    for early, late, switch, *boost in json.loads(args.schedules):
        extra = boost[0] if boost else 0.0

        def on_step_end(p, i, t, kwargs, late=late, switch=switch):  # noqa: ANN001
            if i + 1 == round(switch * steps):
                p.set_adapters([name], [late])
            return kwargs

        images = []
        for start in range(0, len(jobs), 40):
            part = jobs[start : start + 40]
            pipe.set_adapters([name], [early if switch > 0 else late])
            maps = [pose_map(j.pose) for j in part]
            control = {"image": maps}
            pipe.controlnet = (
                MultiControlNetModel([controlnet, controlnet]) if extra else controlnet
            )
            if extra:
                control = {
                    "image": [maps, maps],
                    "controlnet_conditioning_scale": [1.0, extra],
                    "control_guidance_start": [0.0, switch],
                    "control_guidance_end": [1.0, 1.0],
                }
            images += pipe(
                [j.prompt("a creature", identity) for j in part],
                **control,
                num_inference_steps=steps,
                guidance_scale=args.guidance,
                generator=[torch.Generator().manual_seed(j.seed) for j in part],
                callback_on_step_end=on_step_end,
            ).images
        read = probe.predict_pose(images)
        attributes = probe.predict(images)
        per_attribute = {
            k: round(float(np.mean([a[k] == v for a in attributes])), 2)
            for k, v in REFERENCE.items()
        }
        print(
            f"LoRA {early} then {late} after {switch:.0%} of the steps, ControlNet +{extra}: "
            f"followed "
            f"{pose_followed(read, asked).mean():.3f}, kept "
            f"{identity_kept(probe.predict(images), REFERENCE):.3f}, fields "
            f"{np.round(np.mean(np.abs(read - asked) <= tolerance, 0), 2)}, attributes "
            f"{per_attribute}",
            flush=True,
        )


if __name__ == "__main__":
    main()
