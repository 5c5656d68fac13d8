"""Per iteration of a run: how pure the chosen cluster is and how much of the iteration draws
iteration 0's character, read by ToyWorld's probe (evaluation only).

    python research/toyworld-v2/chosen.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import sys
from collections import Counter

from consistent_char.eval.drift import _chosen_members, _iteration_images, modal_identity
from consistent_char.eval.run import load_probe
from consistent_char.rundir import RunDirectory
from consistent_char.toy.world import IDENTITY_ATTRIBUTES, SCENES


def ident(record: dict[str, str]) -> tuple[str, ...]:
    return tuple(record[a] for a in IDENTITY_ATTRIBUTES)


def main(paths: list[str]) -> None:
    probe = load_probe()
    for path in paths:
        run = RunDirectory(path)
        print(path)
        reference = None
        i = 0
        while run.iter_dir(i).is_dir():
            images = _iteration_images(run, i)
            if not images:
                break
            records = probe.predict(images)
            members = _chosen_members(run, i, len(images)) or []
            chosen = [ident(records[j]) for j in members]
            top, top_n = Counter(chosen).most_common(1)[0] if chosen else ((), 0)
            if i == 0 and members:
                reference = ident(modal_identity([records[j] for j in members]))
            share = sum(ident(r) == reference for r in records) / len(records)
            scenes = Counter(r["scene"] for r in records)
            chosen_scenes = Counter(records[j]["scene"] for j in members)
            print(
                f"  it {i}: chosen {len(members):2d}, top {top_n:2d} {' '.join(top)}"
                f" | iteration share of it-0 character {share:.2f}"
                f" | scenes {' '.join(f'{s[:2]}{scenes[s]}' for s in SCENES)}"
                f" | chosen scenes {' '.join(f'{s[:2]}{chosen_scenes[s]}' for s in SCENES)}"
            )
            i += 1


if __name__ == "__main__":
    main(sys.argv[1:])
