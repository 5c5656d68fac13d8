"""Can calibration see the look? For one identity, on the calibration poses of `eval toy-apps
--seed S` (6 poses × 4 seeds), draws the identity without a ControlNet (its look), then through
ToyWorld's ControlNet at each (control scale, LoRA scale), and prints for each: the annotator's
control error (`consistent_char.control.control_error`), the pose probe's following and look
kept (the truth in ToyWorld), and look distances that need no probe, from the loop's own
embedder (the toy DINOv2): the distance between the centroids of the posed and the unposed
drawings, and the mean distance of each posed drawing to its unposed twin (same prompt, seed).

    python research/apps/look_measure.py IDENTITY --stream S [--reference ...] \
        [--settings '[[1.0, 1.5], [1.0, 1.2], [1.0, 1.0], [0.7, 1.0]]']
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from pose_settings import REFERENCE, PoseBench  # type: ignore[import-not-found]

import consistent_char.toy as toy
from consistent_char.control import ControlledGenerator, control_error, load_controlnet
from consistent_char.stages import build_embedder
from consistent_char.toy.evaluate import identity_kept
from consistent_char.toy.pose import annotate, pose_followed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("identity")
    parser.add_argument("--stream", type=int, required=True)
    parser.add_argument("--reference", default=REFERENCE)
    parser.add_argument("--poses", type=int, default=6)
    parser.add_argument(
        "--settings", default="[[1.0, 1.5], [1.0, 1.2], [1.0, 1.0], [0.7, 1.5], [0.7, 1.0]]"
    )
    args = parser.parse_args()
    bench = PoseBench(args.identity, args.reference, args.stream, args.poses, calibration=True)
    embedder = build_embedder(
        "dinov2", str(toy.embedder_dir()), device=torch.device("cpu"), batch_size=64
    )
    controlnet = load_controlnet("toy", device="cpu")
    prompts = [j.prompt("a creature", bench.identity) for j in bench.jobs]
    unposed = bench.gen.generate(prompts, bench.seeds, bench.identity)
    base = embedder.embed(unposed)
    print(f"{args.identity} stream {args.stream}: unposed kept "
          f"{identity_kept(bench.probe.predict(unposed), bench.reference):.3f}")  # fmt: skip
    for control_scale, lora_scale in json.loads(args.settings):
        controlled = ControlledGenerator(
            bench.gen.pipeline,
            controlnet,
            control_scale=control_scale,
            identity_until=0.85,
            identity_in_controlnet=True,
            late_control_scale=2.0,
            **{**bench.gen.settings.model_dump(), "lora_scale": lora_scale},
        )
        images = controlled.generate(
            prompts, bench.seeds, bench.identity, control_images=bench.maps
        )
        posed = embedder.embed(images)
        centroid = float(np.linalg.norm(posed.mean(0) - base.mean(0)))
        twins = float(np.linalg.norm(posed - base, axis=1).mean())
        followed = float(pose_followed(bench.probe.predict_pose(images), bench.asked).mean())
        kept = identity_kept(bench.probe.predict(images), bench.reference)
        print(
            f"  C {control_scale} L {lora_scale}: error "
            f"{control_error(images, bench.maps, annotate):.4f}, followed {followed:.3f}, "
            f"kept {kept:.3f}, centroid distance {centroid:.3f}, twin distance {twins:.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
