"""Trial: after iteration 0, the token stands for the whole prompt ("<cc-char> in the snow"),
as in the paper's "a photo of [v]", instead of being put before it ("<cc-char> a red creature
in the snow"). Patches the extractor's identity prompt and the evaluation's scene prompts, then
runs `evaluate_seeds` as `consistent-char eval seeds` would.

    python research/toyworld-v2/token_only.py --out runs/v2/tokonly "a red creature" --seeds 0-3
"""

from __future__ import annotations

from trial import parse_args, run, token_for_prompt

import consistent_char.eval.toy as toy_eval
from consistent_char.extractor import IterativeIdentityExtractor

if __name__ == "__main__":
    IterativeIdentityExtractor._identity_prompt = (  # type: ignore[method-assign]
        lambda self, prompt, token: token_for_prompt(prompt, token)
    )
    toy_eval.prompt_with_identity = (  # type: ignore[assignment]
        lambda identity, text: token_for_prompt(text, identity.token)
    )
    run(parse_args())
