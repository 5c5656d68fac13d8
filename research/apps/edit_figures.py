"""The pictures of docs/editing.md: an identity edited into three ToyWorld scene images, each
saved as input | mask | edited (64 px panels, shown at 2x).

The images are the first case of each scene of `consistent_char.eval.local_edit.edit_cases`
(seed 0): not picked by hand.

    PYTHONPATH=src:. python research/apps/edit_figures.py runs/demo/identity --out docs/images
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from consistent_char.edit import blended_edit
from consistent_char.eval.local_edit import edit_cases
from consistent_char.eval.toy import scene_prompts
from consistent_char.identity import Identity
from consistent_char.usage import identity_generator

SCENES = ("forest", "beach", "snow")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("identity", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default=None)
    parser.add_argument("--base-prompt", default="a creature")
    args = parser.parse_args()

    identity = Identity.load(args.identity)
    gen = identity_generator(identity, model=args.model, device="cpu")
    cases = edit_cases(SCENES, per_scene=1, seed=0)
    prompts = {s: p for s, p, _ in scene_prompts(identity, args.base_prompt, SCENES, 1)}
    edited = blended_edit(
        gen, [c.image for c in cases], [c.mask for c in cases],
        [prompts[c.scene] for c in cases], [c.seed for c in cases], identity,
    )  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    for case, result in zip(cases, edited, strict=True):
        row = np.concatenate(
            [np.asarray(case.image), np.asarray(case.mask.convert("RGB")), np.asarray(result)],
            axis=1,
        )
        picture = Image.fromarray(row)
        picture = picture.resize((picture.width * 2, picture.height * 2), Image.Resampling.NEAREST)
        path = args.out / f"edit_{case.scene}.png"
        picture.save(path, optimize=True)
        print(f"{path}  ←  {prompts[case.scene]} (seed {case.seed})")


if __name__ == "__main__":
    main()
