"""The run directory: every artefact of a run, written so that a crash never leaves a file that a
resumed run would trust half-written (temp name + `os.replace`, which is atomic on POSIX).

    runs/<name>/
      config.yaml        the full resolved config
      state.json         finished steps and the history; the resume point
      iter_000/ images/*.png  embeddings.npy  clusters.json  identity/
      identity/          the final identity
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

Step = Literal["generated", "embedded", "clustered", "refined"]
STEPS: tuple[Step, ...] = ("generated", "embedded", "clustered", "refined")

STATE_VERSION = 1

#: Threads that encode one call's PNGs. Pillow releases the GIL while it compresses, so they run
#: in parallel: on the GPU benchmark a 1024² image took 0.55 s to save on one core, 70 s for the
#: 128 images of an iteration (benchmarks/README.md).
PNG_WRITER_THREADS = min(8, os.cpu_count() or 1)


@contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    with _atomic_path(Path(path)) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def save_png_atomic(path: str | os.PathLike[str], image: Image.Image) -> None:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())


def save_npy_atomic(path: str | os.PathLike[str], array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    write_bytes_atomic(path, buf.getvalue())


@dataclass
class RunState:
    """What is finished: `(iteration, step)` is the last completed step; `history` holds the
    records of the iterations so far (as dicts), `finished` is set when the run returned."""

    prompt: str
    iteration: int = -1
    step: Step | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False
    converged: bool = False
    version: int = STATE_VERSION

    def done(self, iteration: int, step: Step) -> bool:
        """True when `step` of `iteration` finished before (so a resumed run skips it)."""
        if self.step is None or iteration > self.iteration:
            return False
        if iteration < self.iteration:
            return True
        return STEPS.index(step) <= STEPS.index(self.step)


class RunDirectory:
    """Paths and atomic readers/writers of one run's folder."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    @property
    def identity_dir(self) -> Path:
        return self.root / "identity"

    def exists(self) -> bool:
        return self.state_path.is_file()

    def iter_dir(self, iteration: int) -> Path:
        return self.root / f"iter_{iteration:03d}"

    def image_path(self, iteration: int, index: int) -> Path:
        return self.iter_dir(iteration) / "images" / f"{index:04d}.png"

    def iteration_identity_dir(self, iteration: int) -> Path:
        return self.iter_dir(iteration) / "identity"

    # ----------------------------------------------------------------- state

    def read_state(self) -> RunState:
        data = json.loads(self.state_path.read_text())
        return RunState(**data)

    def write_state(self, state: RunState) -> None:
        write_json_atomic(self.state_path, state.__dict__)

    # ---------------------------------------------------------------- images

    def save_images(self, iteration: int, start: int, images: Sequence[Image.Image]) -> None:
        """Writes `images` as images `start`, `start + 1`, ... of `iteration`, in parallel.

        A crash can leave a later image written and an earlier one not; `existing_images` counts
        only the leading run, so a resumed run draws the rest again (same seeds, same images).
        """
        paths = [self.image_path(iteration, start + offset) for offset in range(len(images))]
        workers = min(PNG_WRITER_THREADS, len(images))
        if workers <= 1:
            for path, image in zip(paths, images, strict=True):
                save_png_atomic(path, image)
            return
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="png") as pool:
            # list() re-raises the first failed write.
            list(pool.map(save_png_atomic, paths, images))

    def existing_images(self, iteration: int, count: int) -> int:
        """How many leading images of `iteration` are already on disk (a cut run's progress)."""
        n = 0
        while n < count and self.image_path(iteration, n).is_file():
            n += 1
        return n

    def load_images(self, iteration: int, count: int) -> list[Image.Image]:
        images = []
        for j in range(count):
            with Image.open(self.image_path(iteration, j)) as im:
                images.append(im.convert("RGB"))
        return images

    # ------------------------------------------------------------ embeddings

    def save_embeddings(self, iteration: int, embeddings: np.ndarray) -> None:
        save_npy_atomic(self.iter_dir(iteration) / "embeddings.npy", embeddings)

    def load_embeddings(self, iteration: int) -> np.ndarray:
        return np.load(self.iter_dir(iteration) / "embeddings.npy", allow_pickle=False)

    # -------------------------------------------------------------- clusters

    def save_clusters(self, iteration: int, data: dict[str, Any]) -> None:
        write_json_atomic(self.iter_dir(iteration) / "clusters.json", data)

    def load_clusters(self, iteration: int) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.iter_dir(iteration) / "clusters.json").read_text())
        return data
