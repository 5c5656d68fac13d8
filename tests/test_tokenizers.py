"""The CLIP tokenizer builder: every listed word one token, the same files for the same words."""

import itertools
import random
import string

from consistent_char.tokenizers import _learn_merges, _merge, build_clip_tokenizer


def _reference_merges(words):
    """The textbook learner: recount every pair after every merge (slow, obviously right)."""
    segmented = [tuple(w[:-1]) + (w[-1] + "</w>",) for w in words if w]
    merges = []
    while True:
        counts = {}
        for symbols in segmented:
            for pair in zip(symbols, symbols[1:], strict=False):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        segmented = [_merge(symbols, best) for symbols in segmented]


def test_incremental_learner_gives_the_textbook_merges():
    rng = random.Random(0)
    for trial in range(25):
        alphabet = "abcxyz"[: rng.randint(2, 6)]
        words = sorted(
            {
                "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8)))
                for _ in range(rng.randint(1, 200))
            }
        )
        assert _learn_merges(words) == _reference_merges(words), trial


def test_every_word_of_a_large_vocabulary_is_one_token(tmp_path):
    words = [
        "".join(p)
        for p in itertools.islice(itertools.product(string.ascii_lowercase, repeat=3), 3000)
    ]
    tokenizer = build_clip_tokenizer(["a", "creature", *words], tmp_path)
    for word in ["a", "creature", *words[::97]]:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    # Text outside the vocabulary still tokenizes, into pieces.
    assert len(tokenizer("zzzzqq", add_special_tokens=False).input_ids) > 1
    again = build_clip_tokenizer(["a", "creature", *reversed(words)], tmp_path / "again")
    assert (tmp_path / "vocab.json").read_text() == (tmp_path / "again" / "vocab.json").read_text()
    assert again.get_vocab() == tokenizer.get_vocab()
