"""The hat colour an identity draws at several guidance scales, with and without the prompt's
colour word, read by the probe: `python research/toyworld-v2/bleed_guidance.py IDENTITY_DIR`."""

from __future__ import annotations

import sys
from collections import Counter

from consistent_char.config import ExtractorConfig
from consistent_char.eval.run import load_probe
from consistent_char.generators.sdxl import SDXLGenerator
from consistent_char.identity import Identity
from consistent_char.stages import resolve_model


def main(identity_dir: str) -> None:
    probe = load_probe()
    identity = Identity.load(identity_dir)
    prompts = [
        f"{identity.token} a red creature in the forest",
        f"{identity.token} a creature in the forest",
    ]
    for guidance in (1.0, 2.0, 3.0, 5.0):
        settings = ExtractorConfig.from_overrides({"model": "toy"}).generator.model_dump()
        settings["guidance_scale"] = guidance
        generator = SDXLGenerator.from_pretrained(
            resolve_model("toy"), device="cpu", dtype="float32", **settings
        )
        for prompt in prompts:
            records = probe.predict(
                generator.generate([prompt] * 16, list(range(100, 116)), identity)
            )
            hat_colour = Counter(r["hat_color"] for r in records).most_common(3)
            hat = Counter(r["hat"] for r in records).most_common(2)
            print(f"guidance {guidance} | {prompt} | hat colour {hat_colour} | hat {hat}")


if __name__ == "__main__":
    main(sys.argv[1])
