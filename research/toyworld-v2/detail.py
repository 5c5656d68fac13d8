"""Which signal a real model also offers tells a washed-out iteration from a clean one? For every
evaluated run given, prints per iteration the probe's validity (ground truth, evaluation only)
next to candidate guard signals computed from the loop's own images and embeddings:

- `lap`: mean absolute Laplacian of the grey image (fine detail), relative to iteration 0;
- `sat`: mean HSV saturation, relative to iteration 0;
- `nn`: mean distance of each embedding to its nearest iteration-0 embedding, relative to the
  same within iteration 0 (leave-one-out): how far the images are from anything the base
  model drew.

`python research/toyworld-v2/detail.py RUN_DIR ...` (runs scored by `eval seeds`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from consistent_char.convergence import mean_saturation


def pixel_stats(folder: Path) -> tuple[float, float]:
    images = [Image.open(path).convert("RGB") for path in sorted(folder.glob("*.png"))]
    laps = []
    for img in images:
        grey = np.asarray(img.convert("L"), dtype=np.float32) / 255
        lap = (
            -4 * grey[1:-1, 1:-1]
            + grey[:-2, 1:-1]
            + grey[2:, 1:-1]
            + grey[1:-1, :-2]
            + grey[1:-1, 2:]
        )
        laps.append(np.abs(lap).mean())
    return float(np.mean(laps)), mean_saturation(images)


def nn_distance(x: np.ndarray, ref: np.ndarray, same: bool) -> float:
    d = np.linalg.norm(x[:, None, :] - ref[None, :, :], axis=-1)
    if same:
        np.fill_diagonal(d, np.inf)
    return float(d.min(axis=1).mean())


def main(paths: list[str]) -> None:
    rows = []
    for path in map(Path, paths):
        ev = json.loads((path / "evaluation.json").read_text())
        validity = {p["iteration"]: p["validity"] for p in ev["per_iteration"]}
        x0 = np.load(path / "iter_000" / "embeddings.npy")
        base_nn = nn_distance(x0, x0, True)
        lap0, sat0 = pixel_stats(path / "iter_000" / "images")
        line = []
        for i in sorted(validity):
            folder = path / f"iter_{i:03d}"
            lap, sat = pixel_stats(folder / "images")
            emb = folder / "embeddings.npy"
            nn = nn_distance(np.load(emb), x0, i == 0) / base_nn if emb.exists() else float("nan")
            rows.append((validity[i], lap / lap0, sat / sat0, nn))
            line.append(
                f"{i}: v{validity[i]:.2f} lap{lap / lap0:.2f} sat{sat / sat0:.2f} nn{nn:.2f}"
            )
        print(path, "|", "; ".join(line))
    a = np.array(rows)
    for j, name in enumerate(["lap", "sat", "nn"], start=1):
        ok = ~np.isnan(a[:, j])
        r = np.corrcoef(a[ok, 0], a[ok, j])[0, 1]
        print(f"correlation of validity with {name}: {r:.2f} over {ok.sum()} iterations")


if __name__ == "__main__":
    main(sys.argv[1:])
