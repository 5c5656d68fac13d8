"""How far the shipped toy DINOv2 moves when one attribute of a render changes.

    python docs/embedding_sensitivity.py [--n 200] [--embedder DIR]

Prints the mean L2 distance per change (`consistent_char.toy.evaluate.embedding_sensitivity`),
the figures quoted in docs/toyworld.md.
"""

from __future__ import annotations

import argparse

import torch

from consistent_char import toy
from consistent_char.embedders.dinov2 import DINOv2Embedder
from consistent_char.toy.evaluate import embedding_sensitivity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="renders per change")
    parser.add_argument("--embedder", help="a DINOv2 folder (default: the shipped toy DINOv2)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    folder = args.embedder or str(toy.embedder_dir())
    embedder = DINOv2Embedder.from_pretrained(folder, device="cpu")
    for change, distance in sorted(
        embedding_sensitivity(embedder, n=args.n).items(), key=lambda kv: -kv[1]
    ):
        print(f"{change:>10}  {distance:7.3f}")


if __name__ == "__main__":
    main()
