"""Trial: once an identity is learned, guide against the user's prompt instead of the empty
prompt (negative prompt = the prompt without its scene), so that classifier-free guidance
amplifies what the token and the scene add, not the prompt's own words ("red"). Patches
`SDXLGenerator.generate` for draws with an identity (the loop after iteration 0 and the
evaluation's identity images; plain prompting is unchanged), then runs `evaluate_seeds`.

    python research/toyworld-v2/prompt_negative.py --out runs/v2/negprompt \
        "a green creature" --seeds 0-1
"""

from __future__ import annotations

import argparse
import json

from consistent_char.eval.seeds import evaluate_seeds
from consistent_char.generators.sdxl import SDXLGenerator

BASE: dict[str, str] = {}
_generate = SDXLGenerator.generate


def generate(self, prompts, seeds, identity=None, **kwargs):  # type: ignore[no-untyped-def]
    if identity is None:
        return _generate(self, prompts, seeds, identity, **kwargs)
    previous = self.negative_prompt
    self.negative_prompt = BASE["prompt"]
    try:
        return _generate(self, prompts, seeds, identity, **kwargs)
    finally:
        self.negative_prompt = previous


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("prompts", nargs="+")
    parser.add_argument("--seeds", default="0-7")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    lo, _, hi = args.seeds.partition("-")
    seeds = range(int(lo), int(hi or lo) + 1)
    SDXLGenerator.generate = generate  # type: ignore[method-assign]
    for prompt in args.prompts:
        BASE["prompt"] = prompt
        study = evaluate_seeds([prompt], seeds, f"{args.out}/{prompt.replace(' ', '-')}")
        print(json.dumps({prompt: study["prompts"][prompt]["summary"]}, indent=1), flush=True)


if __name__ == "__main__":
    main()
