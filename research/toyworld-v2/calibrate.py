"""Spreads the loop's convergence threshold must separate, on the shipped ToyWorld models.

    python research/toyworld-v2/calibrate.py [--n 40] [--guidance 3.0]

Draws, with the ToyWorld preset's generator (sampler, steps, guidance):
- "a creature" (iteration 0 of the loop on its vaguest prompt);
- each of the first four archetypes, named in full, across the five scenes (a perfectly kept
  character, as the loop would draw it after converging);
- two archetypes mixed half and half (a refinement on a mixed cluster would draw about this);
and prints each set's spread (mean pairwise DINOv2 distance) and the ratio to the first.
"""

from __future__ import annotations

import argparse

import numpy as np

from consistent_char.config import ExtractorConfig
from consistent_char.convergence import mean_pairwise_distance
from consistent_char.eval.methods import BenchmarkStages
from consistent_char.toy.captions import full_caption, scene_phrase
from consistent_char.toy.prior import ARCHETYPES
from consistent_char.toy.world import IDENTITY_ATTRIBUTES, SCENES, CreatureRecord


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--guidance", type=float, default=None)
    args = parser.parse_args()
    overrides = {} if args.guidance is None else {"generator.guidance_scale": args.guidance}
    config = ExtractorConfig.from_overrides({"model": "toy", **overrides})
    stages = BenchmarkStages()
    generator, embedder = stages.generator(config), stages.embedder(config)

    def spread(prompts: list[str], offset: int) -> float:
        images = generator.generate(prompts, [offset + j for j in range(len(prompts))])
        return mean_pairwise_distance(np.asarray(embedder.embed(images), dtype=np.float32))

    base = spread(["a creature"] * args.n, 0)
    print(f"'a creature': spread {base:.3f}")

    def prompts_of(identity: tuple[str, ...]) -> list[str]:
        record = CreatureRecord(
            **dict(zip(IDENTITY_ATTRIBUTES, identity, strict=True)), scene="snow"
        )
        text = full_caption(record, scene=False)
        return [f"{text} {scene_phrase(SCENES[j % 5])}" for j in range(args.n)]

    for k, identity in enumerate(ARCHETYPES[:4]):
        s = spread(prompts_of(identity), 10_000 * (k + 1))
        print(f"archetype {k + 1} {' '.join(identity)}, 5 scenes: {s:.3f} ({s / base:.2f})")
    mixed = prompts_of(ARCHETYPES[0])[: args.n // 2] + prompts_of(ARCHETYPES[1])[: args.n // 2]
    s = spread(mixed, 90_000)
    print(f"archetypes 1 and 2 half and half: {s:.3f} ({s / base:.2f})")


if __name__ == "__main__":
    main()
