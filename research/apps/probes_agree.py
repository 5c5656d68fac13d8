"""The pose probe and the attribute probe on the last iteration's images of loop runs: the look
each keeps against the attribute probe's most frequent reading of each attribute, and the
readings where they differ (pose probe / attribute probe).

    python research/apps/probes_agree.py RUN_DIR [RUN_DIR ...] [--pose-probe DIR]

``--pose-probe`` reads with another pose probe than the shipped one (e.g. one the recipe
trained into a copy of the weights).
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from PIL import Image

import consistent_char.toy as toy
from consistent_char.toy.probe import IdentityProbe

LOOK = ("shape", "color", "hat", "hat_color", "eyes")


def kept(read: list[dict[str, str]], reference: dict[str, str]) -> float:
    return sum(all(r[k] == v for k, v in reference.items()) for r in read) / len(read)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--pose-probe", default=None)
    args = parser.parse_args()
    pose_probe = IdentityProbe.from_pretrained(args.pose_probe or toy.pose_probe_dir())
    attribute_probe = IdentityProbe.from_pretrained(toy.probe_dir())
    for arg in args.runs:
        run = Path(arg) / "run" if (Path(arg) / "run").is_dir() else Path(arg)
        last = sorted(run.glob("iter_*"))[-1]
        images = [Image.open(f).convert("RGB") for f in sorted((last / "images").glob("*.png"))]
        posed, plain = pose_probe.predict(images), attribute_probe.predict(images)
        reference = {k: Counter(r[k] for r in plain).most_common(1)[0][0] for k in LOOK}
        differ = Counter(
            f"{k}:{a[k]}/{b[k]}"
            for a, b in zip(posed, plain, strict=True)
            for k in LOOK
            if a[k] != b[k]
        )
        print(
            f"{arg} ({last.name}): pose probe kept {kept(posed, reference):.3f}, attribute "
            f"probe kept {kept(plain, reference):.3f}; differ {dict(differ.most_common(4))}"
        )


if __name__ == "__main__":
    main()
