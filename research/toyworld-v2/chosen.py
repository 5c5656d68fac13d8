"""Per iteration of a run: how pure the chosen cluster is and how much of the iteration draws
iteration 0's character, read by ToyWorld's probe (evaluation only).

    python research/toyworld-v2/chosen.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import sys
from collections import Counter

from consistent_char.eval.drift import iteration_readings, modal_identity
from consistent_char.eval.run import load_probe
from consistent_char.toy.world import IDENTITY_ATTRIBUTES, SCENES


def ident(record: dict[str, str]) -> tuple[str, ...]:
    return tuple(record[a] for a in IDENTITY_ATTRIBUTES)


def main(paths: list[str]) -> None:
    probe = load_probe()
    for path in paths:
        print(path)
        reference = None
        for reading in iteration_readings(path, probe):
            i, records = reading.iteration, reading.records
            members = reading.members or []
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


if __name__ == "__main__":
    main(sys.argv[1:])
