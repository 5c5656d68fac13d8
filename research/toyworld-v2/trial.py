"""What the loop trials share: the command line (prompts, seeds, output folder), running
`evaluate_seeds` one prompt at a time, and the pieces more than one patch uses.

A trial script patches one step of the loop and calls `run(args)`; `BASE["prompt"]` holds the
prompt being run, for patches that need the user's words.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

import numpy as np

from consistent_char.clusterers.selection import ClusterChoice, choose_cluster, densest_core
from consistent_char.eval.seeds import evaluate_seeds

BASE: dict[str, str] = {}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("prompts", nargs="+")
    parser.add_argument("--seeds", default="0-7", help="a range, e.g. 0-3")
    parser.add_argument("--out", required=True)
    return parser.parse_args()


def run(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> None:
    """`evaluate_seeds` for each prompt in its own folder under ``args.out``, printing each
    prompt's summary."""
    lo, _, hi = args.seeds.partition("-")
    seeds = range(int(lo), int(hi or lo) + 1)
    for prompt in args.prompts:
        BASE["prompt"] = prompt
        out = f"{args.out}/{prompt.replace(' ', '-')}"
        study = evaluate_seeds([prompt], seeds, out, overrides=overrides)
        print(json.dumps({prompt: study["prompts"][prompt]["summary"]}, indent=1), flush=True)


def token_for_prompt(text: str, token: str) -> str:
    """`text` (the prompt, then a scene phrase) with the prompt replaced by the token."""
    base = BASE["prompt"]
    assert text.startswith(base), (text, base)
    return (token + text[len(base) :]).strip()


def largest_choice(
    embeddings: np.ndarray,
    labels: np.ndarray,
    centroids: np.ndarray,
    d_min_c: int,
    core_size: int,
    groups: np.ndarray | None = None,
) -> ClusterChoice:
    """`choose_cluster`, but the chosen cluster is the largest (ties: the lower label), with
    its densest `core_size` members as the core."""
    choice = choose_cluster(embeddings, labels, centroids, d_min_c, core_size, groups)
    index = int(np.argmax(choice.sizes))
    members = np.flatnonzero(np.asarray(labels) == index)
    tightness, core = densest_core(embeddings, members, core_size, groups)
    return dataclasses.replace(choice, index=index, cohesion=tightness, core=core.tolist())
