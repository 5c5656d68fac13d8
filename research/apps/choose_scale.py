"""Choosing the identity's LoRA scale for pose control per identity: the strongest of a few
scales whose drawings still follow the pose on calibration poses that no evaluation uses.

    python research/apps/choose_scale.py IDENTITY [IDENTITY ...] [--reference ...] \
        [--calibration-seed 13] [--poses 6] [--scales 1.5 1.2 1.0] [--threshold 0.9]

Each identity is drawn through ToyWorld's ControlNet (until 85% of the steps, the LoRA in the
ControlNet too, the ControlNet at 2 after the switch) at each scale, strongest first, on the
first `poses` poses (4 seeds each) of `pose_jobs(20, 4, calibration_seed)`, read by the pose
probe (ToyWorld's control annotator); the chosen scale is the first whose following reaches
`threshold`, else the best-following one. A scale of 0 draws the identity's tokens with its
LoRA off (the switch and the late scale as at any scale). With `--all` it prints the
annotator's error (`consistent_char.control.control_error`, the measure the library's
`choose_lora_scale` uses) beside it. `--control-scale C` draws everything with the ControlNet at
C before the switch; `--stream S` calibrates on the poses `eval toy-apps --lora-scale auto
--seed S` uses.
"""

from __future__ import annotations

import argparse

from pose_settings import REFERENCE, PoseBench  # type: ignore[import-not-found]

from consistent_char.control import ControlledGenerator, control_error, load_controlnet
from consistent_char.toy.pose import annotate, pose_followed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("identities", nargs="+")
    parser.add_argument(
        "--reference", action="append", help="one per identity (default: round blue)"
    )
    parser.add_argument("--calibration-seed", type=int, default=13)
    parser.add_argument("--poses", type=int, default=6)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.5, 1.2, 1.0])
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--control-scale", type=float, default=1.0)
    parser.add_argument(
        "--stream",
        type=int,
        help="calibrate on `pose_jobs(poses, 4, STREAM, calibration=True)`, the poses "
        "`eval toy-apps --lora-scale auto --seed STREAM` calibrates on",
    )
    parser.add_argument(
        "--all",
        action="store_true",
        help="draw every scale and the plain prompt, and print "
        "the annotator's map error beside the probe's following",
    )
    args = parser.parse_args()
    references = args.reference or [REFERENCE] * len(args.identities)
    controlnet = load_controlnet("toy", device="cpu")
    n = 4 * args.poses
    for identity, reference in zip(args.identities, references, strict=True):
        if args.stream is None:
            bench = PoseBench(identity, reference, args.calibration_seed)
        else:
            bench = PoseBench(identity, reference, args.stream, args.poses, calibration=True)
        prompts = [j.prompt("a creature", bench.identity) for j in bench.jobs[:n]]
        followed: dict[float, float] = {}
        errors: dict[float | str, float] = {}
        if args.all:
            plain = ControlledGenerator(
                bench.gen.pipeline,
                controlnet,
                control_scale=args.control_scale,
                **bench.gen.settings.model_dump(),
            )
            drawn = plain.generate(
                [j.prompt("a creature", None) for j in bench.jobs[:n]],
                bench.seeds[:n],
                None,
                control_images=bench.maps[:n],
            )
            errors["plain"] = control_error(drawn, bench.maps[:n], annotate)
        for scale in args.scales:
            controlled = ControlledGenerator(
                bench.gen.pipeline,
                controlnet,
                control_scale=args.control_scale,
                identity_until=0.85,
                identity_in_controlnet=True,
                late_control_scale=2.0,
                **{**bench.gen.settings.model_dump(), "lora_scale": scale},
            )
            images = controlled.generate(
                prompts, bench.seeds[:n], bench.identity, control_images=bench.maps[:n]
            )
            read = bench.probe.predict_pose(images)
            followed[scale] = float(pose_followed(read, bench.asked[:n]).mean())
            if args.all:
                errors[scale] = control_error(images, bench.maps[:n], annotate)
            elif followed[scale] >= args.threshold:
                break
        chosen = next(
            (s for s, f in followed.items() if f >= args.threshold),
            max(followed, key=lambda s: followed[s]),
        )
        print(f"{identity}: followed {followed} -> scale {chosen}", flush=True)
        if errors:
            print(f"  annotator's map error: { {k: round(v, 4) for k, v in errors.items()} }")


if __name__ == "__main__":
    main()
