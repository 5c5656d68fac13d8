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


def copy_lora_into_controlnet(unet, controlnet, identity) -> None:  # noqa: ANN001
    """The identity's LoRA, as loaded into the UNet, injected into the ControlNet's modules of
    the same names (its down and mid blocks are a copy of the UNet's)."""
    from peft import LoraConfig, inject_adapter_in_model

    name = identity.adapter_name
    config = identity._lora_config()
    lora_config = LoraConfig(
        r=config["r"], lora_alpha=config["lora_alpha"], target_modules=config["target_modules"]
    )
    own = dict(controlnet.named_modules())
    targets = [n for n in own if n.startswith(("down_blocks", "mid_block"))]
    lora_config.target_modules = [
        n for n in targets if n.split(".")[-1] in config["target_modules"] or n.endswith("to_out.0")
    ]
    inject_adapter_in_model(lora_config, controlnet, adapter_name=name)
    unet_params = dict(unet.named_parameters())
    copied = 0
    with torch.no_grad():
        for n, p in controlnet.named_parameters():
            if "lora_" in n and n in unet_params:
                p.copy_(unet_params[n])
                copied += 1
    print(f"copied {copied} LoRA tensors into the ControlNet", flush=True)


def set_controlnet_lora(controlnet, name, scale) -> None:  # noqa: ANN001
    from peft.tuners.lora import LoraLayer

    for m in controlnet.modules():
        if isinstance(m, LoraLayer) and name in m.lora_A:
            m.set_scale(name, scale)


def main() -> None:
    from diffusers import EulerAncestralDiscreteScheduler

    parser = argparse.ArgumentParser()
    parser.add_argument("identity")
    parser.add_argument("schedules")
    parser.add_argument("--seed", type=int, default=0, help="picks the poses and seeds")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument(
        "--lora-in-controlnet",
        action="store_true",
        help="also put the identity's LoRA into the ControlNet's copy of the UNet's encoder",
    )
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
    if args.lora_in_controlnet:
        copy_lora_into_controlnet(pipe.unet, controlnet, identity)
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
                set_controlnet_lora(controlnet, name, late)
            return kwargs

        images = []
        for start in range(0, len(jobs), 40):
            part = jobs[start : start + 40]
            pipe.set_adapters([name], [early if switch > 0 else late])
            set_controlnet_lora(controlnet, name, early if switch > 0 else late)
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
