"""How many of the base model's images the probe takes as valid, by sampler setting: iteration
0's 64 images of a prompt (the preset's scene variations and image seeds) drawn with each
setting, with their validity and their distinct creatures.

    python research/toyworld-v2/validity_settings.py "a creature" --seeds 0 1
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

from consistent_char.config import ExtractorConfig, toy_preset
from consistent_char.eval.drift import image_validity
from consistent_char.eval.methods import BenchmarkStages
from consistent_char.eval.run import load_probe
from consistent_char.extractor import image_seed
from consistent_char.toy.world import IDENTITY_ATTRIBUTES

SETTINGS = [
    {},
    {"generator.num_inference_steps": 30},
    {"generator.num_inference_steps": 40},
    {"generator.guidance_scale": 4.0},
    {"generator.guidance_scale": 5.0},
    {"generator.scheduler": "EulerDiscreteScheduler"},
    {"generator.scheduler": "DPMSolverMultistepScheduler"},
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("prompt")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    stages, probe = BenchmarkStages(), load_probe()
    for setting in SETTINGS:
        for seed in args.seeds:
            config = ExtractorConfig.from_overrides({**setting, "seed": seed}, base=toy_preset())
            n, templates = config.num_images, config.prompt_variations
            prompts = [templates[j % len(templates)].format(prompt=args.prompt) for j in range(n)]
            seeds = [image_seed(seed, 0, j) for j in range(n)]
            t0 = time.perf_counter()
            images = stages.generator(config).generate(prompts, seeds)
            seconds = time.perf_counter() - t0
            valid = image_validity(probe, images)
            records = probe.predict(images)
            ids = Counter(tuple(r[a] for a in IDENTITY_ATTRIBUTES) for r in records)
            top = ids.most_common(1)[0][1] / n
            print(
                f"{setting or 'preset'} seed {seed}: validity {valid:.3f}, distinct {len(ids)}, "
                f"top share {top:.3f}, {seconds:.0f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
