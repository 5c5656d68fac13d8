"""Builds small CLIP tokenizers from a word list, for ToyWorld's model and the test suite.

The vocabulary is learned with a real BPE trainer on the words, so each listed word is one token
and any other text still tokenizes (into characters). The files are the standard CLIP
`vocab.json` + `merges.txt`, loaded back with `CLIPTokenizer.from_pretrained(dir)`: building a
`CLIPTokenizer(vocab_file=..., merges_file=...)` directly silently yields a 3-token vocabulary
with transformers 5.
"""

from __future__ import annotations

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
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    unique = sorted({w.strip().lower() for w in words if w.strip()})
    base = set(string.ascii_lowercase + string.digits + ",.!?'-<>_")
    alphabet = sorted(base | set("".join(unique)))
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=100_000,
        min_frequency=1,
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        show_progress=False,
        special_tokens=[],
    )
    bpe.train_from_iterator(unique, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = dict(sorted(model["vocab"].items(), key=lambda kv: kv[1]))
    # A character alone is a word end too ("a" in "a creature").
    for ch in alphabet:
        vocab.setdefault(ch + "</w>", len(vocab))
    for special in (BOS, EOS):
        vocab.setdefault(special, len(vocab))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
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
