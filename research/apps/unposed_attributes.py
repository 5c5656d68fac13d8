"""What an identity loses without any ControlNet: `eval toy-apps`' 80 pose-control prompts and
seeds (`--seed S`) drawn plainly, read by the pose probe; each attribute's share, what was read
instead, and the misses by scene; then the same images read by the attribute probe (the
evaluation's probe for unposed images, trained on ToyWorld's own narrow poses), as a second
reader.

    python research/apps/unposed_attributes.py IDENTITY REFERENCE SEED
"""

from __future__ import annotations

import sys
from collections import Counter

import numpy as np
from pose_settings import PoseBench, attribute_lines, look_lost  # type: ignore[import-not-found]

import consistent_char.toy as toy
from consistent_char.toy.probe import IdentityProbe


def main() -> None:
    identity, reference, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    bench = PoseBench(identity, reference, seed)
    prompts = [j.prompt("a creature", bench.identity) for j in bench.jobs]
    images = bench.gen.generate(prompts, bench.seeds, bench.identity)
    scenes = [j.prompt("a creature", None) for j in bench.jobs]
    attribute_probe = IdentityProbe.from_pretrained(toy.probe_dir())
    for name, probe in (("pose probe", bench.probe), ("attribute probe", attribute_probe)):
        read = probe.predict(images)
        lost = look_lost(read, bench.reference)
        print(f"{identity}, {name}: kept {1 - float(np.mean(lost)):.3f}")
        print("\n".join(attribute_lines(read, bench.reference)))
        misses = Counter(p for p, m in zip(scenes, lost, strict=True) if m)
        print("  misses by prompt", dict(misses))


if __name__ == "__main__":
    main()
