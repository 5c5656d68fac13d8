"""Mid-training check of the toy pose ControlNet: loads a recipe checkpoint, draws N images in
N poses with and without it, reads their poses with the pose probe and writes a sheet.

    python research/apps/check_controlnet.py CKPT_DIR WEIGHTS_DIR OUT.png [--n 16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file

from consistent_char.control import ControlledGenerator
from consistent_char.generators.sdxl import SDXLGenerator
from consistent_char.toy.captions import full_caption
from consistent_char.toy.pose import (
    POSE,
    POSE_TOLERANCE,
    pose_followed,
    pose_map,
    pose_of,
    sample_posed_record,
)
from consistent_char.toy.probe import IdentityProbe

sys.path.insert(0, ".")
from recipes.toyworld.controlnet import build_controlnet  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("ckpt", type=Path)
    parser.add_argument("weights", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--scale", type=float, default=1.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = StableDiffusionXLPipeline.from_pretrained(args.weights / "pipeline")
    net = build_controlnet(pipe.unet)
    tensors = load_file(str(args.ckpt / "controlnet.safetensors"))
    prefix = "model/controlnet/"
    net.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
    probe = IdentityProbe.from_pretrained(args.weights / "pose_probe")
    rng = np.random.default_rng(5)
    records = [sample_posed_record(rng) for _ in range(args.n)]
    prompts = [full_caption(r, scene=True) for r in records]
    maps = [pose_map(r) for r in records]
    seeds = list(range(args.n))
    settings = {"num_inference_steps": 20, "guidance_scale": 3.0}
    plain = SDXLGenerator.from_pipeline(pipe, **settings).generate(prompts, seeds)
    steered = ControlledGenerator(pipe, net, control_scale=args.scale, **settings).generate(
        prompts, seeds, control_images=maps
    )
    asked = pose_of(records)
    for name, images in (("without", plain), ("with", steered)):
        read = probe.predict_pose(images)
        within = np.abs(read - asked) <= np.asarray([POSE_TOLERANCE[k] for k in POSE])
        print(
            name,
            "followed",
            pose_followed(read, asked).mean(),
            "mean abs error",
            np.abs(read - asked).mean(0).round(3),
            "within per field",
            within.mean(0).round(3),
        )
    sheet = Image.new("RGB", (64 * args.n, 192))
    for k in range(args.n):
        for r, im in enumerate((maps[k], steered[k], plain[k])):
            sheet.paste(im, (64 * k, 64 * r))
    sheet.save(args.out)


if __name__ == "__main__":
    main()
