"""What a saved result records about the software that made it."""

from __future__ import annotations

import importlib.metadata as md
import platform
from contextlib import suppress

from consistent_char._version import __version__

__all__ = ["versions"]


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
