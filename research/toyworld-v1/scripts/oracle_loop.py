"""A diagnostic, not the method: the loop with the probe's answers as its embedding.

    python docs/oracle_loop.py runs/trials/oracle_s0 --seed 0
    consistent-char eval run runs/trials/oracle_s0 --seeds-per-scene 8

The loop never sees labels; this script breaks that rule on purpose, to ask how far a perfect
embedding would take it. Each image is embedded as the one-hot code of the five identity
attributes the probe reads on it (scaled by 4, so two images that differ in one attribute lie
5.7 apart), and nothing of the scene. Everything else is the ToyWorld preset: the generator, the
clustering, the refiner and the relative convergence threshold. If the identity still misses
its mark, the embedding is not what holds it back.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from consistent_char.config import ExtractorConfig
from consistent_char.eval.run import load_probe
from consistent_char.extractor import IterativeIdentityExtractor
from consistent_char.stages import build_stages
from consistent_char.toy.world import ATTRIBUTES, IDENTITY_ATTRIBUTES

SCALE = 4.0


class ProbeEmbedder:
    """One-hot identity attributes as read by ToyWorld's probe."""

    def __init__(self) -> None:
        self.probe = load_probe(None)
        self.columns = [(a, v) for a in IDENTITY_ATTRIBUTES for v in ATTRIBUTES[a]]

    @property
    def embedding_dim(self) -> int:
        return len(self.columns)

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        out = np.zeros((len(images), self.embedding_dim), dtype=np.float32)
        for i, record in enumerate(self.probe.predict(list(images))):
            for a in IDENTITY_ATTRIBUTES:
                out[i, self.columns.index((a, record[a]))] = SCALE
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="a new run directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt", default="a creature")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    config = ExtractorConfig.build({"model": "toy", "seed": args.seed})
    generator, _, clusterer, refiner, criterion = build_stages(config)
    extractor = IterativeIdentityExtractor(
        generator, ProbeEmbedder(), clusterer, refiner, criterion, config=config
    )
    result = extractor.extract(args.prompt, run_dir=args.out)
    spreads = ", ".join(f"{r.spread:.2f}" for r in result.history)
    print(f"{len(result.history)} iterations, converged {result.converged}; spreads {spreads}")


if __name__ == "__main__":
    main()
