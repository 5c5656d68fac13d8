"""Writing files so that a crash never leaves one half-written: a temporary name in the same
folder, then `os.replace`, which is atomic on POSIX. Each writer returns the SHA-256 of what it
wrote, which the run directory records to check the file when a run resumes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

#: Suffix of every temporary file or folder this library writes before renaming it into place.
TEMP_SUFFIX = ".tmp"

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (``/proc``)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    with _UMASK_LOCK:  # os.umask can only be read by setting it
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def follow_umask(path: str | os.PathLike[str], *, directory: bool = False) -> None:
    """Gives a file made by `tempfile` (always 0600, or 0700 for a folder) the mode an ordinary
    ``open``/``mkdir`` would have given it under the user's umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def sha256_bytes(data: bytes) -> str:
    """The SHA-256 of `data`, in hex: what the run records for each file it writes."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of the file at `path`, in hex, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        follow_umask(tmp)
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> str:
    """Writes `data` to `path` through a temporary file and returns its SHA-256 (hex)."""
    with _atomic_path(Path(path)) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return sha256_bytes(data)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> str:
    """`write_bytes_atomic` for UTF-8 text."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> str:
    """`write_bytes_atomic` for `data` as indented JSON (NumPy scalars and arrays allowed)."""
    return write_text_atomic(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def save_png_atomic(path: str | os.PathLike[str], image: Image.Image) -> str:
    """`write_bytes_atomic` for `image` encoded as PNG (lossless, so it loads back exactly)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return write_bytes_atomic(path, buf.getvalue())


def save_npy_atomic(path: str | os.PathLike[str], array: np.ndarray) -> str:
    """`write_bytes_atomic` for `array` in NumPy's ``.npy`` format, without pickle."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return write_bytes_atomic(path, buf.getvalue())
