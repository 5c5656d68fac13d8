"""What an identity loses without any ControlNet: `eval toy-apps`' 80 pose-control prompts and
seeds (`--seed S`) drawn plainly, read by the pose probe; each attribute's share, what was read
instead, and the misses by scene.

    python research/apps/unposed_attributes.py IDENTITY REFERENCE SEED
"""

from __future__ import annotations

import sys
from collections import Counter

import numpy as np
from pose_settings import PoseBench, attribute_lines, look_lost  # type: ignore[import-not-found]


def main() -> None:
    identity, reference, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    bench = PoseBench(identity, reference, seed)
    prompts = [j.prompt("a creature", bench.identity) for j in bench.jobs]
    read = bench.probe.predict(bench.gen.generate(prompts, bench.seeds, bench.identity))
    lost = look_lost(read, bench.reference)
    print(f"{identity}: kept {1 - float(np.mean(lost)):.3f}")
    print("\n".join(attribute_lines(read, bench.reference)))
    scenes = [j.prompt("a creature", None) for j in bench.jobs]
    print("  misses by prompt", dict(Counter(p for p, m in zip(scenes, lost, strict=True) if m)))


if __name__ == "__main__":
    main()
