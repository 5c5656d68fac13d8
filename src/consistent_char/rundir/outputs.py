"""Folders a command writes into: checked before anything runs, and, for a user's own folder,
a manifest of the files this library wrote so that it never replaces anyone else's.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from consistent_char.errors import OutputExistsError, OutputNotWritableError
from consistent_char.rundir.files import write_json_atomic


def check_output_dir(
    path: str | os.PathLike[str],
    *,
    option: str = "--out",
    shown: str | os.PathLike[str] | None = None,
) -> Path:
    """Checks, without creating anything, that folder `path` can be created or written.

    Args:
        path: The folder.
        option: How the message names the path's source (``"--out"``).
        shown: The path as the user gave it, if `path` was derived from it (a file's folder).

    Raises:
        OutputNotWritableError: `path` or one of its parents is a file, or the deepest existing
            folder on the way to it refuses a new entry (tried with a temporary folder that is
            removed at once, since permission bits do not tell for root or read-only mounts).
    """
    target = Path(path).expanduser()
    named = Path(shown) if shown is not None else target
    existing = target
    while not existing.exists() and not existing.is_symlink():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "is a file" if existing == named else f"is below the file {existing}"
        raise OutputNotWritableError(
            f"{option} {named} {where}; choose a folder path (nothing was written)"
        )
    try:
        probe = tempfile.mkdtemp(prefix=".consistent-char-probe-", dir=existing)
        os.rmdir(probe)
    except OSError as err:
        raise OutputNotWritableError(
            f"{option} {named}: cannot write in {existing} ({err.strerror or err}); choose a "
            "folder you can write to"
        ) from None
    return target


def check_output_file(path: str | os.PathLike[str], *, option: str = "--out") -> Path:
    """Like `check_output_dir` for a file to write: its folder must be writable and `path` must
    not be a folder."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise OutputNotWritableError(f"{option} {target} is a folder; give a file name")
    check_output_dir(target.parent, option=option, shown=target)
    return target


class OutputFolder:
    """A user's folder that commands write named files into (images, a contact sheet), next to
    files that are not theirs to touch.

    A hidden manifest, ``.consistent-char-files.json``, lists the files this library wrote
    there. A name the manifest does not list is never overwritten, and `remove_stale` deletes
    only listed files. Names are recorded before their files are written, so a crash leaves no
    file of ours unlisted.
    """

    MANIFEST = ".consistent-char-files.json"

    def __init__(self, root: str | os.PathLike[str], *, option: str = "--out"):
        self.root = Path(root)
        self.option = option
        self.owned = self._read()

    def _read(self) -> set[str]:
        try:
            data = json.loads((self.root / self.MANIFEST).read_text(encoding="utf-8"))
            return {str(name) for name in data["files"] if _plain_name(str(name))}
        except (OSError, ValueError, KeyError, TypeError):
            return set()

    def check(self, names: Sequence[str]) -> None:
        """Raises `OutputExistsError` when writing `names` would replace a file this library did
        not write, and `OutputNotWritableError` when the folder cannot be written."""
        check_output_dir(self.root, option=self.option)
        if self.root.exists():
            taken = [
                n
                for n in names
                if ((self.root / n).exists() or (self.root / n).is_symlink())
                and n not in self.owned
            ]
            if taken:
                raise OutputExistsError(
                    f"{self.root / taken[0]} exists and was not written by consistent-char; "
                    f"move it or choose another {self.option} (nothing was written)"
                )

    def claim(self, names: Sequence[str]) -> None:
        """Records `names` as this library's, before their files are written."""
        self.check(names)
        self.root.mkdir(parents=True, exist_ok=True)
        self.owned |= set(names)
        self._write()

    def remove_stale(self, keep: Sequence[str]) -> list[str]:
        """Deletes the files this library wrote here earlier that are not in `keep`."""
        stale = sorted(self.owned - set(keep))
        for name in stale:
            path = self.root / name
            if path.is_file() and not path.is_symlink():
                path.unlink()
        self.owned -= set(stale)
        self._write()
        return stale

    def _write(self) -> None:
        write_json_atomic(self.root / self.MANIFEST, {"files": sorted(self.owned)})


def _plain_name(name: str) -> bool:
    return bool(name) and "/" not in name and name not in (".", "..")
