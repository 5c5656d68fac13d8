"""Scores local editing (`consistent_char.eval.local_edit`) for an identity on ToyWorld, and
writes a sheet of every case: input | mask | edited with the identity | edited plainly.

    PYTHONPATH=src:. python research/apps/local_edit.py IDENTITY_DIR --out DIR [--per-scene 8]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

import consistent_char.toy as toy
from consistent_char.eval.local_edit import edit_cases, edit_cases_with, score_local_edit
from consistent_char.identity import Identity
from consistent_char.usage import identity_generator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("identity", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--per-scene", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strength", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--base-prompt", default="a creature")
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    identity = Identity.load(args.identity)
    gen = identity_generator(
        identity,
        model=args.model,
        device="cpu",
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
    )
    probe = toy.IdentityProbe.from_pretrained(toy.probe_dir())
    start = time.perf_counter()
    scores = score_local_edit(
        gen, identity, probe, args.base_prompt, per_scene=args.per_scene, seed=args.seed,
        strength=args.strength,
    )  # fmt: skip
    scores["seconds"] = round(time.perf_counter() - start, 1)
    scores["settings"] = {
        "per_scene": args.per_scene, "seed": args.seed, "strength": args.strength,
        "steps": gen.num_inference_steps, "guidance": gen.guidance_scale,
        "scheduler": gen.scheduler,
    }  # fmt: skip
    (args.out / "scores.json").write_text(json.dumps(scores, indent=2))
    print(json.dumps(scores, indent=2))
    _sheet(gen, identity, args, scores["reference"])


def _sheet(gen, identity, args, reference) -> None:
    """Every case again (same seeds, so the same images): one row each."""
    key = tuple(reference[a] for a in toy.IDENTITY_ATTRIBUTES)
    cases = edit_cases(per_scene=args.per_scene, seed=args.seed, avoid=key)
    rows = [
        edit_cases_with(gen, cases, who, args.base_prompt, strength=args.strength)
        for who in (identity, None)
    ]
    lines = [
        np.concatenate(
            [np.asarray(c.image), np.asarray(c.mask.convert("RGB")), np.asarray(a), np.asarray(b)],
            axis=1,
        )
        for c, a, b in zip(cases, *rows, strict=True)
    ]
    Image.fromarray(np.concatenate(lines, axis=0)).save(args.out / "sheet.png", optimize=True)


if __name__ == "__main__":
    main()
