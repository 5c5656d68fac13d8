"""Does the toy DINOv2 look at the creature? Its CLS attention against the creature's pixels.

    python docs/attention_coverage.py [--n 64]

Renders `--n` random creatures, each also in another scene: the pixels that do not change are
the creature's. For each render the script takes the last layer's attention from the CLS token
to the 8 × 8 patches (the mean over heads) and prints the share of that attention on the
patches the creature covers (at least 0.3 of their pixels), the share of the image those
patches are, and the correlation between the attention and each patch's creature coverage.
A prototype refiner weighed its loss with these maps (docs/toyworld.md).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from consistent_char.embedders.dinov2 import DINOv2Embedder
from consistent_char.toy import SCENES, embedder_dir, render, sample_record
from consistent_char.toy.world import record_with


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=64, help="renders to look at")
    args = parser.parse_args()
    embedder = DINOv2Embedder.from_pretrained(str(embedder_dir()))
    model = embedder.model
    model.set_attn_implementation("eager")  # only eager attention returns its weights
    patch = int(model.config.patch_size)
    rng = np.random.default_rng(0)
    share, area, corr = [], [], []
    for _ in range(args.n):
        record = sample_record(rng)
        image = render(record)
        elsewhere = render(record_with(record, scene=next(s for s in SCENES if s != record.scene)))
        same = np.abs(np.asarray(image, float) - np.asarray(elsewhere, float)).sum(-1) < 1
        rows, cols = same.shape[0] // patch, same.shape[1] // patch
        cover = same.reshape(rows, patch, cols, patch).mean(axis=(1, 3)).ravel()
        pixels = torch.as_tensor(np.asarray(embedder.preprocess([image])))
        with torch.no_grad():
            attention = model(pixel_values=pixels, output_attentions=True).attentions[-1]
        cls = attention[0, :, 0, 1:].mean(0).numpy()
        creature = cover > 0.3
        share.append(cls[creature].sum() / cls.sum())
        area.append(creature.mean())
        corr.append(np.corrcoef(cls, cover)[0, 1])
    print(
        f"{args.n} renders: CLS attention on the creature's patches {np.mean(share):.3f}; "
        f"those patches' share of the image {np.mean(area):.3f}; correlation of attention "
        f"and coverage {np.mean(corr):.3f}"
    )


if __name__ == "__main__":
    main()
