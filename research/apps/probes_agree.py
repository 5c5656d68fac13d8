"""The pose probe and the attribute probe on the last iteration's images of loop runs: the look
each keeps against the identity the attribute probe reads most often (`majority_identity`),
and the readings where they differ (pose probe / attribute probe).

    python research/apps/probes_agree.py RUN_DIR [RUN_DIR ...] [--pose-probe DIR]

``--pose-probe`` reads with another pose probe than the shipped one (e.g. one the recipe
trained into a copy of the weights).
"""

from __future__ import annotations

import argparse
from collections import Counter

from pose_settings import iteration_images, loop_run  # type: ignore[import-not-found]

import consistent_char.toy as toy
from consistent_char.toy.evaluate import identity_kept, majority_identity
from consistent_char.toy.probe import IdentityProbe
from consistent_char.toy.world import IDENTITY_ATTRIBUTES


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--pose-probe", default=None)
    args = parser.parse_args()
    pose_probe = IdentityProbe.from_pretrained(args.pose_probe or toy.pose_probe_dir())
    attribute_probe = IdentityProbe.from_pretrained(toy.probe_dir())
    for arg in args.runs:
        last = sorted(loop_run(arg).glob("iter_*"))[-1]
        images = iteration_images(last)
        posed, plain = pose_probe.predict(images), attribute_probe.predict(images)
        reference = majority_identity(plain)
        differ = Counter(
            f"{k}:{a[k]}/{b[k]}"
            for a, b in zip(posed, plain, strict=True)
            for k in IDENTITY_ATTRIBUTES
            if a[k] != b[k]
        )
        print(
            f"{arg} ({last.name}): pose probe kept {identity_kept(posed, reference):.3f}, "
            f"attribute probe kept {identity_kept(plain, reference):.3f}; "
            f"differ {dict(differ.most_common(4))}"
        )


if __name__ == "__main__":
    main()
