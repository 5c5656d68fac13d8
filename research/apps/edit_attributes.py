"""Which attributes an identity loses in local editing: `eval toy-apps`' 40 edits (8 per scene)
read by the identity probe, each attribute's share and the values read in its place, and a sheet
of the edits (one row per scene) with a yellow bar under each that lost the look.

    python research/apps/edit_attributes.py IDENTITY --seed S --sheet OUT.png \
        [--lora-scale 1.5] [--guidance 3] [--reference shape=round,...]
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
from PIL import Image, ImageDraw
from pose_settings import REFERENCE, attribute_lines, look_lost  # type: ignore[import-not-found]

import consistent_char.toy as toy
from consistent_char.eval.local_edit import edit_cases, edit_cases_with
from consistent_char.identity import Identity
from consistent_char.usage import identity_generator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("identity")
    parser.add_argument("--seed", type=int, default=0, help="as eval toy-apps --seed")
    parser.add_argument("--sheet", required=True)
    parser.add_argument("--lora-scale", type=float, default=None)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--reference", default=REFERENCE)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    reference = dict(kv.split("=") for kv in args.reference.split(","))
    identity = Identity.load(args.identity)
    gen = identity_generator(identity, device="cpu", guidance_scale=args.guidance)
    if args.lora_scale is not None:
        gen.lora_scale = args.lora_scale
    probe = toy.IdentityProbe.from_pretrained(toy.probe_dir())
    key = tuple(reference[a] for a in toy.IDENTITY_ATTRIBUTES)
    cases = edit_cases(per_scene=8, seed=args.seed, avoid=key)
    edited = edit_cases_with(gen, cases, identity, "a creature")
    read = probe.predict(edited)
    lost = look_lost(read, reference)
    kept = 1 - float(np.mean(lost))
    print(f"LoRA scale {gen.lora_scale}, guidance {gen.guidance_scale}: kept {kept:.3f}")
    print("\n".join(attribute_lines(read, reference)))
    size = 128
    sheet = Image.new("RGB", (8 * size, 5 * (size + 4)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, miss) in enumerate(zip(edited, lost, strict=True)):
        x, y = (i % 8) * size, (i // 8) * (size + 4)
        sheet.paste(image.convert("RGB").resize((size, size)), (x, y))
        if miss:
            draw.rectangle([x, y + size, x + size - 1, y + size + 3], fill="yellow")
    sheet.save(args.sheet)


if __name__ == "__main__":
    main()
