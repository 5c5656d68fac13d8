"""Which hat colour an identity draws with and without the prompt's colour word, read by the
probe: `python research/toyworld-v2/bleed.py IDENTITY_DIR` (16 images in the forest a prompt)."""

from __future__ import annotations

import sys
from collections import Counter

from consistent_char.config import ExtractorConfig
from consistent_char.eval.run import load_probe
from consistent_char.generators.sdxl import SDXLGenerator
from consistent_char.identity import Identity
from consistent_char.stages import resolve_model


def main(identity_dir: str) -> None:
    settings = ExtractorConfig.from_overrides({"model": "toy"}).generator.model_dump()
    generator = SDXLGenerator.from_pretrained(
        resolve_model("toy"), device="cpu", dtype="float32", **settings
    )
    probe = load_probe()
    identity = Identity.load(identity_dir)
    token = identity.token
    prompts = [
        f"{token} a red creature in the forest",
        f"{token} a creature in the forest",
        f"{token} in the forest",
        f"{token} a red creature wearing a yellow top hat in the forest",
    ]
    for prompt in prompts:
        images = generator.generate([prompt] * 16, list(range(100, 116)), identity)
        records = probe.predict(images)
        for attribute in ("hat_color", "hat", "color"):
            counts = Counter(r[attribute] for r in records).most_common()
            print(f"{prompt} | {attribute}: {counts}")


if __name__ == "__main__":
    main(sys.argv[1])
