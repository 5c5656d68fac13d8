"""Which scenes each refinement of a loop learned from, and how each scene's images keep the
identity's look in the next iteration: for every iteration of a run directory, the scenes of
its core (image j draws scene j mod 5, the toy preset's prompt variations) and, per scene, the
share of its images a probe reads as the reference look (default: the identity the probe reads
most often in the run's last iteration, `majority_identity`). `eval toy-apps` reads pose
control with the pose probe (the default here) and local editing with the attribute probe
(``--probe attribute``).

    python research/apps/core_scenes.py RUN_DIR [RUN_DIR ...] [--probe pose|attribute]
        [--reference shape=...,eyes=big]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pose_settings import (  # type: ignore[import-not-found]
    iteration_images,
    look_lost,
    loop_run,
)

import consistent_char.toy as toy
from consistent_char.toy.captions import SCENE_PHRASES
from consistent_char.toy.evaluate import majority_identity
from consistent_char.toy.probe import IdentityProbe

SCENES = list(SCENE_PHRASES)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--reference", default=None)
    parser.add_argument("--probe", choices=("pose", "attribute"), default="pose")
    args = parser.parse_args()
    probe_dir = toy.pose_probe_dir() if args.probe == "pose" else toy.probe_dir()
    probe = IdentityProbe.from_pretrained(probe_dir)
    for run in args.runs:
        run = loop_run(run)
        iterations = sorted(run.glob("iter_*"))
        read = {it.name: probe.predict(iteration_images(it)) for it in iterations}
        reference = (
            dict(kv.split("=") for kv in args.reference.split(","))
            if args.reference
            else majority_identity(read[iterations[-1].name])
        )
        state = json.loads((run / "state.json").read_text())
        print(f"{run}: converged {state['converged']}, reference {reference}")
        for it in iterations:
            lost = look_lost(read[it.name], reference)
            per_scene = []
            for s, scene in enumerate(SCENES):
                mine = [m for j, m in enumerate(lost) if j % len(SCENES) == s]
                per_scene.append(f"{scene} {1 - sum(mine) / len(mine):.2f}")
            clusters = it / "clusters.json"
            core = json.loads(clusters.read_text()).get("core") if clusters.is_file() else None
            core_scenes = [SCENES[j % len(SCENES)] for j in core] if core else "-"
            print(f"  {it.name}: kept {', '.join(per_scene)}; core {core_scenes}")


if __name__ == "__main__":
    main()
