"""Where a cast's subjects come from: a prompt-set file or a built-in set such as ConsiStory+.

A cast and ``eval real`` read the same `PromptSet` (subjects × settings): the cast learns one
identity per subject, ``eval real`` draws each subject in its settings. The built-in
``consistory+`` is the ConsiStory+ benchmark prompt set, shipped with its MIT licence and
attribution in ``consistent_char/data/consistory_plus/``.

Example:
    >>> prompts, source = load_subjects("consistory+")
    >>> len(prompts.subjects), source
    (184, 'consistory+')
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from consistent_char.errors import InputNotFoundError, InvalidValueError
from consistent_char.eval.real import PromptSet, Subject
from consistent_char.eval.results import slug

__all__ = [
    "BUILTIN_SETS",
    "CONSISTORY_PLUS",
    "load_subjects",
    "prompt_set_from_consistory",
    "run_folder_names",
]

#: The name of the built-in ConsiStory+ prompt set.
CONSISTORY_PLUS = "consistory+"
#: Built-in prompt sets: name → file under ``consistent_char/data``.
BUILTIN_SETS = {CONSISTORY_PLUS: "consistory_plus/consistory+.yaml"}


def prompt_set_from_consistory(data: Mapping[str, Any]) -> PromptSet:
    """Turns a ConsiStory+ file's mapping into a `PromptSet`.

    The file lists categories, each a list of ``{concept_token, subject, style, settings}``.
    As in the benchmark's own generator, a subject's identity prompt is
    ``f"{style} {subject}"`` and each frame adds one setting. A few entries repeat the same
    style and subject with other settings: they describe one character, so they become one
    subject with all their settings (in file order, without repeats).

    Raises:
        ValueError: The mapping is not shaped like ConsiStory+ (the message says where).
    """
    merged: dict[str, list[str]] = {}
    for category, entries in data.items():
        if not isinstance(entries, list):
            raise ValueError(f"{category}: expected a list of subjects, got {entries!r}")
        for k, entry in enumerate(entries):
            where = f"{category}[{k}]"
            if not isinstance(entry, Mapping):
                raise ValueError(f"{where}: expected a mapping, got {entry!r}")
            missing = sorted({"subject", "style", "settings"} - set(entry))
            if missing:
                raise ValueError(f"{where}: missing keys {missing}")
            name = " ".join(f"{entry['style']} {entry['subject']}".split())
            settings = merged.setdefault(name, [])
            settings += [s for s in _settings(entry["settings"], where) if s not in settings]
    return PromptSet([Subject(name, settings) for name, settings in merged.items()])


def _settings(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError(f"{where}.settings must be a list of non-empty strings, got {value!r}")
    return [" ".join(v.split()) for v in value]


def load_subjects(spec: str | Path) -> tuple[PromptSet, str]:
    """The prompt set `spec` names: a built-in set's name or a prompt-set file (YAML/JSON in
    `PromptSet`'s format); returns it with the name or path it came from.

    Raises:
        InputNotFoundError: Neither a built-in name nor an existing file (lists the names).
        InvalidValueError: The file is not a valid prompt set.
    """
    from consistent_char.config import load_mapping

    name = str(spec)
    if name in BUILTIN_SETS:
        path = resources.files("consistent_char") / "data" / BUILTIN_SETS[name]
        return prompt_set_from_consistory(load_mapping(str(path))), name
    if not Path(name).is_file():
        raise InputNotFoundError(
            f"{name} is neither a built-in prompt set ({', '.join(BUILTIN_SETS)}) nor a "
            "prompt-set file"
        )
    try:
        return PromptSet.from_file(name), name
    except ValueError as err:
        raise InvalidValueError(f"{name} is not a prompt set: {err}") from None


def run_folder_names(names: Sequence[str]) -> list[str]:
    """A run folder name for each subject: its slug, or, where two subjects share a slug (they
    differ only past 60 characters or in punctuation), the slug shortened and followed by a
    hash of the subject. The names do not depend on the subjects' order."""
    slugs = [slug(n, empty="subject") for n in names]
    shared = {s for s in slugs if slugs.count(s) > 1}
    return [
        f"{s[:53]}-{hashlib.sha256(n.encode()).hexdigest()[:6]}" if s in shared else s
        for s, n in zip(slugs, names, strict=True)
    ]
