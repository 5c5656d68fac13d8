"""Builds small CLIP tokenizers from a word list, for ToyWorld's model and the test suite.

The vocabulary is learned by byte-pair encoding on the words, so each listed word is one token
and any other text still tokenizes (into characters). The files are the standard CLIP
`vocab.json` + `merges.txt`, loaded back with `CLIPTokenizer.from_pretrained(dir)`: building a
`CLIPTokenizer(vocab_file=..., merges_file=...)` directly silently yields a 3-token vocabulary
with transformers 5.
"""

from __future__ import annotations

import heapq
import json
import os
import string
from collections.abc import Iterable
from pathlib import Path

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def build_clip_tokenizer(words: Iterable[str], directory: str | os.PathLike[str]) -> CLIPTokenizer:
    """Writes a CLIP tokenizer whose vocabulary holds every word of `words` as one token.

    Args:
        words: Lower-case words (no spaces). Characters a-z, 0-9 and common punctuation are
            always in the vocabulary, so unknown words split into characters.
        directory: Where `vocab.json`, `merges.txt` and `tokenizer_config.json` are written.

    Returns:
        The tokenizer, loaded back from `directory` (``model_max_length`` 77, as in SDXL).
    """
    unique = sorted({w.strip().lower() for w in words if w.strip()})
    base = set(string.ascii_lowercase + string.digits + ",.!?'-<>_")
    alphabet = sorted(base | set("".join(unique)))
    merges = _learn_merges(unique)
    vocab: dict[str, int] = {}
    for symbol in alphabet:
        vocab.setdefault(symbol, len(vocab))
    for symbol in alphabet:  # a character alone is a word end too ("a" in "a creature")
        vocab.setdefault(symbol + "</w>", len(vocab))
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    for special in (BOS, EOS):
        vocab.setdefault(special, len(vocab))

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = [f"{left} {right}" for left, right in merges]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n")
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": 77,
                "bos_token": BOS,
                "eos_token": EOS,
                "unk_token": EOS,
                "pad_token": EOS,
                "do_lower_case": True,
            },
            indent=2,
        )
    )
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS})
    )
    return CLIPTokenizer.from_pretrained(str(out))


def _learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair merges that make every word one token, learned the classic way (most frequent
    pair first) with ties broken by the pair itself, so the same words always give the same
    files. (The `tokenizers` trainer breaks ties in hash order, which differs between runs.)

    Encoding replays merges in rank order exactly as they were learned, so each training word
    ends as a single token.

    Pair counts are updated incrementally (only the words holding the merged pair are
    re-counted) and the best pair comes from a heap with stale entries skipped: recounting every
    word for every merge took minutes for a CLIP-sized vocabulary of 49k words.
    """
    segmented = [tuple(w[:-1]) + (w[-1] + "</w>",) for w in words if w]
    counts: dict[tuple[str, str], int] = {}
    holders: dict[tuple[str, str], set[int]] = {}
    for index, symbols in enumerate(segmented):
        for pair in zip(symbols, symbols[1:], strict=False):
            counts[pair] = counts.get(pair, 0) + 1
            holders.setdefault(pair, set()).add(index)
    heap = [(-count, pair) for pair, count in counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while heap:
        negative, best = heapq.heappop(heap)
        if counts.get(best, 0) != -negative or negative == 0:
            continue  # a stale entry: the pair's count changed after it was pushed
        merges.append(best)
        changed: set[tuple[str, str]] = set()
        for index in sorted(holders.pop(best, ())):
            symbols = segmented[index]
            for pair in zip(symbols, symbols[1:], strict=False):
                counts[pair] -= 1
                changed.add(pair)
                holders.get(pair, set()).discard(index)
            symbols = segmented[index] = _merge(symbols, best)
            for pair in zip(symbols, symbols[1:], strict=False):
                counts[pair] = counts.get(pair, 0) + 1
                changed.add(pair)
                holders.setdefault(pair, set()).add(index)
        for pair in changed:
            if counts[pair] > 0:
                heapq.heappush(heap, (-counts[pair], pair))
            else:
                del counts[pair]
                holders.pop(pair, None)
    return merges


def _merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)
