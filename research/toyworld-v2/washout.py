"""Which image- or embedding-only statistic tells the loop's washed-out iterations from its
clean ones? `python research/toyworld-v2/washout.py RUN_DIR ...` (finished runs with an
evaluation.json from `consistent-char eval run`).

Per iteration it prints the probe's validity (the ground truth here, never a guard) next to
statistics a real model offers too, each relative to iteration 0:

- sat: mean HSV saturation of the images (the `max_saturation_rise` guard);
- detail: mean absolute Laplacian of the grey images (fine structure, edges, eyes);
- scenes: mean distance between the five scene variations' embedding centroids (the loop's
  images keep their scenes apart while they draw the scene the prompt names);
- anchor: the recorded anchor distance over iteration 0's chosen cohesion.
"""

from __future__ import annotations

import json
import sys
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image

from consistent_char.convergence import mean_saturation


def detail(images: list[Image.Image]) -> float:
    values = []
    for im in images:
        g = np.asarray(im.convert("L"), dtype=np.float64)
        lap = 4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]
        values.append(np.abs(lap).mean())
    return float(np.mean(values))


def scene_separation(embeddings: np.ndarray, n_scenes: int = 5) -> float:
    labels = np.arange(len(embeddings)) % n_scenes
    centroids = [embeddings[labels == s].mean(axis=0) for s in range(n_scenes)]
    return float(np.mean([np.linalg.norm(a - b) for a, b in combinations(centroids, 2)]))


def main() -> None:
    for path in map(Path, sys.argv[1:]):
        ev = json.loads((path / "evaluation.json").read_text())
        history = json.loads((path / "state.json").read_text())["history"]
        validity = {r["iteration"]: r["validity"] for r in ev["per_iteration"]}
        rows = []
        for h in history:
            i = h["iteration"]
            folder = path / f"iter_{i:03d}"
            images = [
                Image.open(p).convert("RGB") for p in sorted((folder / "images").glob("*.png"))
            ]
            emb = np.load(folder / "embeddings.npy")
            rows.append(
                (
                    i,
                    validity.get(i),
                    mean_saturation(images),
                    detail(images),
                    scene_separation(emb),
                    h["spread"],
                    h.get("anchor_distance"),
                )
            )
        base = rows[0]
        c0 = history[0]["chosen_cohesion"]
        print(f"{path}  consistency {ev['identity']['identity_consistency']:.3f}")
        for i, v, s, d, sc, sp, an in rows:
            anchor = "-" if an is None else f"{an / c0:.2f}"
            print(
                f"  {i}: valid {v:.2f}  sat {s / base[2]:.2f}  detail {d / base[3]:.2f}  "
                f"scenes {sc / base[4]:.2f}  spread {sp / base[5]:.2f}  anchor {anchor}"
            )


if __name__ == "__main__":
    main()
