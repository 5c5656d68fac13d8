"""Where along the denoising is a pose lost? Posed renders redrawn by img2img at several
strengths, without a ControlNet or through one (each under its own pose map), and read by the
pose probe against the renders' true poses. At a low strength the layout is given: what is
lost there is lost in the last, low-noise steps.

    python research/apps/where_pose_is_lost.py [CONTROLNET] [--strengths 0.1,0.3,0.6,1.0]
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

import consistent_char.toy as toy
from consistent_char.toy.captions import sample_caption
from consistent_char.toy.pose import (
    POSE,
    POSE_TOLERANCE,
    pose_followed,
    pose_map,
    pose_of,
    sample_posed_record,
)
from consistent_char.toy.probe import IdentityProbe
from consistent_char.toy.world import render


def main() -> None:
    from diffusers import (
        ControlNetModel,
        EulerAncestralDiscreteScheduler,
        StableDiffusionXLControlNetImg2ImgPipeline,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
    )

    parser = argparse.ArgumentParser()
    parser.add_argument("controlnet", nargs="?", default=None, help="none: without one")
    parser.add_argument("--strengths", default="0.1,0.3,0.6,1.0")
    parser.add_argument("--n", type=int, default=80)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    probe = IdentityProbe.from_pretrained(toy.pose_probe_dir())
    pipe = StableDiffusionXLPipeline.from_pretrained(toy.model_dir())
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    if args.controlnet:
        controlnet = ControlNetModel.from_pretrained(args.controlnet)
        redraw = StableDiffusionXLControlNetImg2ImgPipeline(
            **pipe.components, controlnet=controlnet
        )
    else:
        redraw = StableDiffusionXLImg2ImgPipeline(**pipe.components)
    redraw.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(5)
    records = [sample_posed_record(rng) for _ in range(args.n)]
    renders = [render(r) for r in records]
    captions = [sample_caption(r, rng) for r in records]
    asked = pose_of(records)
    tolerance = np.array([POSE_TOLERANCE[k] for k in POSE])
    for strength in (float(s) for s in args.strengths.split(",")):
        images = []
        for start in range(0, args.n, 40):
            part = slice(start, start + 40)
            extra = (
                {"control_image": [pose_map(r) for r in records[part]]} if args.controlnet else {}
            )
            images += redraw(
                captions[part],
                image=renders[part],
                strength=strength,
                num_inference_steps=20,
                guidance_scale=3.0,
                generator=[torch.Generator().manual_seed(k) for k in range(start, start + 40)],
                **extra,
            ).images
        read = probe.predict_pose(images)
        print(
            f"strength {strength}: followed {pose_followed(read, asked).mean():.3f}, fields "
            f"{np.round(np.mean(np.abs(read - asked) <= tolerance, 0), 2)}, bias/tolerance "
            f"{np.round((read - asked).mean(0) / tolerance, 2)}",
            flush=True,
        )


if __name__ == "__main__":
    main()
