"""Trial: the refinement's captions hold the token and the scene only ("<cc-char> in the
night"), while the loop still draws with the whole identity prompt ("<cc-char> a red creature
in the snow"): the token must learn the whole look, red body and yellow hat, instead of
learning it next to the word "red". Patches the extractor's refinement captions, then runs
`evaluate_seeds`.

    python research/toyworld-v2/caption_token_only.py --out runs/v2/captok "a red creature" \
        --seeds 1-3
"""

from __future__ import annotations

from trial import parse_args, run, token_for_prompt

import consistent_char.extractor as ex

_refine = ex.IterativeIdentityExtractor._refine


def _refine_patched(self, *args, **kwargs):  # type: ignore[no-untyped-def]
    # `_refine` captions each member with `self._identity_prompt`: swap it for the call.
    self._identity_prompt = token_for_prompt
    try:
        return _refine(self, *args, **kwargs)
    finally:
        del self._identity_prompt


if __name__ == "__main__":
    ex.IterativeIdentityExtractor._refine = _refine_patched  # type: ignore[method-assign]
    run(parse_args())
