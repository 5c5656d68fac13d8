"""How consistent the shipped toy model is when it is told the whole identity in words.

    python docs/prompt_consistency.py [--identities 4] [--seeds-per-scene 8] [--guidance 3 7.5]

For random identities, draws the fully specified prompt ("a blue tall creature with sleepy eyes
wearing a pink top hat") in the 5 scenes x N seeds, with the ToyWorld preset's generator, and
scores the images with the probe exactly as `consistent-char eval run` scores a learned
identity (`consistent_char.eval.toy.score_records`). The result is a reference for the loop: an
identity learned from "a creature" is unlikely to be more consistent than the identity spelled
out in full.

It also prints how far apart the toy DINOv2 puts these images: the mean L2 distance between
images of the same prompt (other seeds and scenes) and between images of different identities.
"""

from __future__ import annotations

import argparse

import numpy as np

from consistent_char import toy
from consistent_char.config import ExtractorConfig
from consistent_char.embedders.dinov2 import DINOv2Embedder
from consistent_char.eval.run import generator_from_config, load_probe
from consistent_char.eval.toy import score_records
from consistent_char.toy.captions import caption, scene_phrase
from consistent_char.toy.world import IDENTITY_ATTRIBUTES, SCENES, sample_record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--identities", type=int, default=4)
    parser.add_argument("--seeds-per-scene", type=int, default=8)
    parser.add_argument("--guidance", type=float, nargs="+", default=[3.0, 7.5])
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    probe = load_probe(None)
    embedder = DINOv2Embedder.from_pretrained(str(toy.embedder_dir()), device="cpu")
    rng = np.random.default_rng(args.seed)
    records = [sample_record(rng) for _ in range(args.identities)]
    for guidance in args.guidance:
        config = ExtractorConfig.build({"model": "toy", "generator": {"guidance_scale": guidance}})
        generator = generator_from_config(config)
        scores, embeddings, labels = [], [], []
        for k, record in enumerate(records):
            words = caption(record, IDENTITY_ATTRIBUTES)
            scenes = [s for s in SCENES for _ in range(args.seeds_per_scene)]
            prompts = [f"{words} {scene_phrase(s)}" for s in scenes]
            seeds = [1000 * k + j for j in range(len(prompts))]
            images = generator.generate(prompts, seeds)
            scores.append(score_records(probe.predict(images), scenes))
            embeddings.append(np.asarray(embedder.embed(images), dtype=np.float64))
            labels += [k] * len(images)
            print(f"guidance {guidance}: {words!r}: {scores[-1]['identity_consistency']:.3f}")
        mean = {
            "identity_consistency": np.mean([s["identity_consistency"] for s in scores]),
            "prompt_adherence": np.mean([s["prompt_adherence"] for s in scores]),
            **{
                a: np.mean([s["attribute_agreement"][a] for s in scores])
                for a in IDENTITY_ATTRIBUTES
            },
        }
        x, ids = np.concatenate(embeddings), np.asarray(labels)
        distances = np.linalg.norm(x[:, None] - x[None], axis=2)
        pairs = np.triu(np.ones_like(distances, dtype=bool), 1)
        same = ids[:, None] == ids[None]
        mean["embedding_distance_same_prompt"] = distances[pairs & same].mean()
        mean["embedding_distance_other_identity"] = distances[pairs & ~same].mean()
        print(f"guidance {guidance}, mean over {len(records)} identities: "
              + ", ".join(f"{k} {v:.3f}" for k, v in mean.items()))  # fmt: skip


if __name__ == "__main__":
    main()
