"""Which creature iteration 0 would choose, under several choice rules, over many seeds: the
variety the loop can find and how pure its first training set is (no refinement).

    python research/toyworld-v2/first_choice.py "a creature" --seeds 0-15 --cache runs/v2/first

Generates iteration 0's images exactly as the preset's loop does (cached in --cache), embeds
them, reads them with the probe and applies each rule with the library's own `choose_cluster`.
Per rule: the creature of the chosen training set (its most frequent, read by the probe), its
purity, and over the seeds the distinct creatures found (with a hat).
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np
from trial import largest_choice

from consistent_char.clusterers.faiss_kmeans import FaissKMeansClusterer
from consistent_char.clusterers.selection import choose_cluster, densest_core
from consistent_char.config import ExtractorConfig, toy_preset
from consistent_char.eval.methods import BenchmarkStages
from consistent_char.eval.run import load_probe
from consistent_char.extractor import image_seed, stage_seed
from consistent_char.toy.world import IDENTITY_ATTRIBUTES

# name: (K, d_min_c, core_size, how the cluster is ranked): "core" by its densest core (the
# preset), "paper" by the whole cluster's cohesion, "largest" by its size; the refinement then
# trains on the chosen cluster's densest core (or on the whole cluster, core_size None).
RULES = {
    "preset K8 core5": (8, 5, 5, "core"),
    "K8 core3": (8, 5, 3, "core"),
    "K8 core4": (8, 5, 4, "core"),
    "K8 paper choice": (8, 5, None, "paper"),
    "K8 paper choice, its core5": (8, 5, 5, "paper"),
    "K4 paper choice, its core5": (4, 5, 5, "paper"),
    "K6 paper choice, its core5": (6, 5, 5, "paper"),
    "K8 largest, its core5": (8, 5, 5, "largest"),
    "K4 largest, its core5": (4, 5, 5, "largest"),
}


def sample(prompt: str, seed: int, cache: Path, stages: BenchmarkStages, probe) -> dict:  # type: ignore[no-untyped-def]
    path = cache / f"{prompt.replace(' ', '-')}-{seed}.npz"
    if path.is_file():
        data = np.load(path)
        return {"x": data["x"], "ids": [tuple(r) for r in data["ids"]], "scene": data["scene"]}
    config = ExtractorConfig.from_overrides({"seed": seed}, base=toy_preset())
    n, templates = config.num_images, config.prompt_variations
    prompts = [templates[j % len(templates)].format(prompt=prompt) for j in range(n)]
    seeds = [image_seed(seed, 0, j) for j in range(n)]
    images = stages.generator(config).generate(prompts, seeds)
    x = stages.embedder(config).embed(images)
    records = probe.predict(images)
    ids = np.array([[r[a] for a in IDENTITY_ATTRIBUTES] for r in records])
    scene = np.array([j % len(templates) for j in range(n)])
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=x, ids=ids, scene=scene)
    return {"x": x, "ids": [tuple(r) for r in ids], "scene": scene}


def apply(rule: tuple, x: np.ndarray, seed: int) -> list[int]:  # type: ignore[type-arg]
    k, d_min, core, how = rule
    labels, centroids = FaissKMeansClusterer().cluster(
        x.astype(np.float32), k, stage_seed(seed, 0, "cluster")
    )
    if how == "core":
        choice = choose_cluster(x, labels, centroids, d_min, core)
        assert choice.core is not None
        return list(choice.core)
    if how == "largest":
        return list(largest_choice(x, labels, centroids, d_min, core).core or [])
    index = choose_cluster(x, labels, centroids, d_min, None).index
    members = np.flatnonzero(labels == index)
    return members.tolist() if core is None else densest_core(x, members, core)[1].tolist()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("prompt")
    parser.add_argument("--seeds", default="0-15")
    parser.add_argument("--cache", default="runs/v2/first")
    args = parser.parse_args()
    lo, _, hi = args.seeds.partition("-")
    seeds = list(range(int(lo), int(hi or lo) + 1))
    stages, probe = BenchmarkStages(), load_probe()
    data = {s: sample(args.prompt, s, Path(args.cache), stages, probe) for s in seeds}
    for name, rule in RULES.items():
        found: Counter[tuple[str, ...]] = Counter()
        purities = []
        cells = []
        for s in seeds:
            sel = apply(rule, data[s]["x"], s)
            top, m = Counter(data[s]["ids"][j] for j in sel).most_common(1)[0]
            purities.append(m / len(sel))
            found[top] += 1
            cells.append(f"{s}:{top[0][:3]}-{top[1][:3]}-{top[2][:3]} {m}/{len(sel)}")
        hats = sum(t[2] != "none" for t in found)
        print(
            f"{name}: purity mean {np.mean(purities):.2f}, >=0.8 on "
            f"{sum(p >= 0.8 for p in purities)}/{len(seeds)}; creatures {len(found)} "
            f"(hat {hats}): {dict(found.most_common())}"
        )
        print("   " + " | ".join(cells))


if __name__ == "__main__":
    main()
