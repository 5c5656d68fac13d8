"""Trial: after iteration 0, the token stands for the whole prompt ("<cc-char> in the snow"),
as in the paper's "a photo of [v]", instead of being put before it ("<cc-char> a red creature
in the snow"). Patches the extractor's identity prompt and the evaluation's scene prompts, then
runs `evaluate_seeds` as `consistent-char eval seeds` would.

    python research/toyworld-v2/token_only.py --out runs/v2/tokonly "a red creature" --seeds 0-3
"""

from __future__ import annotations

import argparse
import json

import consistent_char.eval.toy as toy_eval
from consistent_char.eval.seeds import evaluate_seeds
from consistent_char.extractor import IterativeIdentityExtractor

BASE: dict[str, str] = {}


def _identity_prompt(self, prompt: str, token: str) -> str:  # type: ignore[no-untyped-def]
    base = BASE["prompt"]
    assert prompt.startswith(base), (prompt, base)
    return (token + prompt[len(base) :]).strip()


def _prompt_with_identity(identity, text: str) -> str:  # type: ignore[no-untyped-def]
    base = BASE["prompt"]
    assert text.startswith(base), (text, base)
    return (identity.token + text[len(base) :]).strip()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("prompts", nargs="+")
    parser.add_argument("--seeds", default="0-7")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    lo, _, hi = args.seeds.partition("-")
    seeds = range(int(lo), int(hi or lo) + 1)
    IterativeIdentityExtractor._identity_prompt = _identity_prompt  # type: ignore[method-assign]
    toy_eval.prompt_with_identity = _prompt_with_identity  # type: ignore[assignment]
    for prompt in args.prompts:
        BASE["prompt"] = prompt
        study = evaluate_seeds([prompt], seeds, f"{args.out}/{prompt.replace(' ', '-')}")
        summary = study["prompts"][prompt]["summary"]
        print(json.dumps({prompt: summary}, indent=1), flush=True)


if __name__ == "__main__":
    main()
