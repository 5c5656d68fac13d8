"""How far the shipped toy DINOv2 moves when one attribute of a render changes.

    python docs/embedding_sensitivity.py [--n 200] [--embedder DIR] [--generated]

Prints the mean L2 distance per change (`consistent_char.toy.evaluate.embedding_sensitivity`),
the figures quoted in docs/toyworld.md. With ``--generated`` the images are not renders but the
toy model's own, drawn with the preset's generator settings from each record's full caption
(every identity attribute and the scene), image ``j`` of every set from the same seed. A caption
names no position or size, so there ``context`` changes the scene word only.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
from PIL import Image

from consistent_char import toy
from consistent_char.config import ExtractorConfig
from consistent_char.embedders.dinov2 import DINOv2Embedder
from consistent_char.eval.run import generator_from_config
from consistent_char.toy.captions import full_caption
from consistent_char.toy.evaluate import embedding_sensitivity
from consistent_char.toy.world import CreatureRecord


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="images per change")
    parser.add_argument("--embedder", help="a DINOv2 folder (default: the shipped toy DINOv2)")
    parser.add_argument(
        "--generated", action="store_true", help="the toy model's images instead of renders"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    folder = args.embedder or str(toy.embedder_dir())
    embedder = DINOv2Embedder.from_pretrained(folder, device="cpu")
    draw = None
    if args.generated:
        generator = generator_from_config(ExtractorConfig.build({"model": "toy"}))
        seeds = list(range(args.n))

        def draw(records: Sequence[CreatureRecord]) -> list[Image.Image]:
            return generator.generate([full_caption(r) for r in records], seeds)

    for change, distance in sorted(
        embedding_sensitivity(embedder, n=args.n, draw=draw).items(), key=lambda kv: -kv[1]
    ):
        print(f"{change:>10}  {distance:7.3f}")


if __name__ == "__main__":
    main()
