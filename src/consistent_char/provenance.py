"""What a saved result records about the software that made it."""

from __future__ import annotations

import importlib.metadata as md
import platform
from collections.abc import Sequence
from contextlib import suppress
from typing import TYPE_CHECKING, Any

from consistent_char._version import __version__

if TYPE_CHECKING:
    from consistent_char.config import ExtractorConfig
    from consistent_char.interfaces import IterationRecord

__all__ = ["run_metadata", "versions"]


def versions() -> dict[str, str]:
    """The versions of this library, Python and the model libraries that are installed.

    Example:
        >>> sorted(versions())[:2]
        ['consistent_char', 'diffusers']
    """
    out = {"consistent_char": __version__, "python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "peft"):
        with suppress(md.PackageNotFoundError):
            out[name] = md.version(name)
    return out


def run_metadata(
    config: ExtractorConfig, prompt: str, history: Sequence[IterationRecord], converged: bool
) -> dict[str, Any]:
    """What an extracted identity records of the run that made it (its ``metadata``)."""
    return {
        "prompt": prompt,
        "identity_prompt_template": config.identity_prompt_template,
        "base_model": config.model,
        "converged": converged,
        "iterations": len(history),
        "config": config.to_dict(),
        "history": [r.to_dict() for r in history],
        "versions": versions(),
    }
