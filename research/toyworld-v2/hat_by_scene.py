"""Per iteration and scene, the hat colours the probe reads on a run's images (image j draws
scene j mod 5): `python research/toyworld-v2/hat_by_scene.py RUN_DIR ...`."""

from __future__ import annotations

import sys
from collections import Counter

from consistent_char.eval.drift import iteration_readings
from consistent_char.eval.run import load_probe

SCENES = 5


def main(paths: list[str]) -> None:
    probe = load_probe()
    for path in paths:
        print(path)
        for reading in iteration_readings(path, probe):
            per: dict[int, Counter[str]] = {}
            for j, record in enumerate(reading.records):
                per.setdefault(j % SCENES, Counter())[record["hat_color"]] += 1
            cells = [
                f"s{g}:" + ",".join(f"{k[:3]}{v}" for k, v in c.most_common(3))
                for g, c in sorted(per.items())
            ]
            print(f"  it{reading.iteration}: " + " | ".join(cells))


if __name__ == "__main__":
    main(sys.argv[1:])
