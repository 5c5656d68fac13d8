"""Trial: the refinement's captions hold the token and the scene only ("<cc-char> in the
night"), while the loop still draws with the whole identity prompt ("<cc-char> a red creature
in the snow"): the token must learn the whole look, red body and yellow hat, instead of
learning it next to the word "red". Patches the extractor's refinement captions, then runs
`evaluate_seeds`.

    python research/toyworld-v2/caption_token_only.py --out runs/v2/captok "a red creature" \
        --seeds 1-3
"""

from __future__ import annotations

import argparse
import json

import consistent_char.extractor as ex
from consistent_char.eval.seeds import evaluate_seeds

BASE: dict[str, str] = {}
_refine = ex.IterativeIdentityExtractor._refine


def _refine_patched(self, run, state, iteration, identity, members, *args, **kwargs):  # type: ignore[no-untyped-def]
    base = BASE["prompt"]
    original = self._identity_prompt

    def caption(prompt: str, token: str) -> str:
        assert prompt.startswith(base), (prompt, base)
        return (token + prompt[len(base) :]).strip()

    self._identity_prompt = caption
    try:
        return _refine(self, run, state, iteration, identity, members, *args, **kwargs)
    finally:
        self._identity_prompt = original


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("prompts", nargs="+")
    parser.add_argument("--seeds", default="0-7")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    lo, _, hi = args.seeds.partition("-")
    seeds = range(int(lo), int(hi or lo) + 1)
    ex.IterativeIdentityExtractor._refine = _refine_patched  # type: ignore[method-assign]
    for prompt in args.prompts:
        BASE["prompt"] = prompt
        study = evaluate_seeds([prompt], seeds, f"{args.out}/{prompt.replace(' ', '-')}")
        print(json.dumps({prompt: study["prompts"][prompt]["summary"]}, indent=1), flush=True)


if __name__ == "__main__":
    main()
