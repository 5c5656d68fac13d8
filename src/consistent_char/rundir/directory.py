"""`RunDirectory`: the paths of a run's files, and their checksummed readers and writers.

A resumed run checks each finished step's files against their recorded checksums, shapes and
values before it trusts them (`RunDirectory.verify`): a step whose files changed is computed
again.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from consistent_char.errors import (
    InputFileError,
    InputNotFoundError,
    InvalidValueError,
    OutputExistsError,
)
from consistent_char.rundir.files import (
    TEMP_SUFFIX,
    save_npy_atomic,
    save_png_atomic,
    sha256_bytes,
    sha256_file,
    write_json_atomic,
    write_text_atomic,
)
from consistent_char.rundir.lock import LOCK_FILE, RunLock
from consistent_char.rundir.outputs import check_output_dir
from consistent_char.rundir.state import STEPS, RunState, Step

if TYPE_CHECKING:
    from consistent_char.config import ExtractorConfig

logger = logging.getLogger(__name__)

#: The files an identity folder holds (identity.py writes them; kept here to clean up after it).
_IDENTITY_FILES = frozenset(
    {"identity.json", "embeddings.safetensors", "pytorch_lora_weights.safetensors"}
)

#: Threads that encode one call's PNGs. Pillow releases the GIL while it compresses, so they run
#: in parallel: on the GPU benchmark a 1024² image took 0.55 s to save on one core, 70 s for the
#: 128 images of an iteration (benchmarks/README.md).
PNG_WRITER_THREADS = min(8, os.cpu_count() or 1)


class RunDirectory:
    """Paths, the lock, and the atomic, checksummed readers and writers of one run's folder."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        #: SHA-256 of each file this object wrote or verified, by run-relative path; merged into
        #: ``state.json`` on every `write_state`.
        self.checksums: dict[str, str] = {}

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
        """Whether a run was started here (``state.json`` exists)."""
        return self.state_path.is_file()

    def iter_dir(self, iteration: int) -> Path:
        return self.root / f"iter_{iteration:03d}"

    def image_path(self, iteration: int, index: int) -> Path:
        return self.iter_dir(iteration) / "images" / f"{index:04d}.png"

    def embeddings_path(self, iteration: int) -> Path:
        return self.iter_dir(iteration) / "embeddings.npy"

    def clusters_path(self, iteration: int) -> Path:
        return self.iter_dir(iteration) / "clusters.json"

    def iteration_identity_dir(self, iteration: int) -> Path:
        return self.iter_dir(iteration) / "identity"

    def _key(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    # ------------------------------------------------------------- opening

    def lock(self) -> RunLock:
        """The run's lock (a context manager); the folder is created if it does not exist."""
        self.root.mkdir(parents=True, exist_ok=True)
        return RunLock(self.root)

    def check(self, prompt: str, config: ExtractorConfig, *, resume: bool) -> RunState | None:
        """Checks, before any model loads and without writing, that a run for `prompt` with
        `config` can start here (or, with `resume`, continue here); returns the saved state
        when resuming.

        Raises:
            OutputNotWritableError: The folder cannot be created or written.
            OutputExistsError: It holds a run and `resume` is false, or it holds other files.
            InputNotFoundError: `resume` without a run here.
            InputFileError: ``state.json`` or ``config.yaml`` is corrupt.
            ConfigError: `config` differs from the run's.
            InvalidValueError: The run was started for another prompt.
        """
        holder = RunLock(self.root).holder()
        if holder is not None:
            raise RunLock.locked_error(self.root, holder)
        return self._check(prompt, config, resume=resume)

    def _check(self, prompt: str, config: ExtractorConfig, *, resume: bool) -> RunState | None:
        check_output_dir(self.root)
        if not resume:
            if self.exists():
                raise OutputExistsError(
                    f"{self.root} already holds a run; continue it with --resume (resume=True), "
                    "or choose another folder"
                )
            others = _entries(self.root) - {LOCK_FILE}
            if others:
                raise OutputExistsError(
                    f"{self.root} exists and is not a run folder (it holds {_some(others)}); "
                    "choose a new or empty folder (nothing was changed)"
                )
            return None
        if not self.exists():
            raise InputNotFoundError(
                f"nothing to resume: {self.state_path} does not exist; run without --resume to "
                "start a run there"
            )
        state = self.read_state()
        saved = self.read_config()
        diff = saved.describe_differences(config)
        if diff:
            from consistent_char.config import ConfigError

            raise ConfigError(
                f"cannot resume {self.root} with a different config; differing fields: {diff}; "
                "resume without --config/--set/--model to use the run's own"
            )
        if state.prompt != prompt:
            raise InvalidValueError(
                f"cannot resume {self.root}: it was started for prompt {state.prompt!r}, not "
                f"{prompt!r}"
            )
        return state

    def open(self, prompt: str, config: ExtractorConfig, *, resume: bool) -> RunState:
        """Starts a run here (writes ``config.yaml`` and ``state.json``) or, with `resume`,
        returns the saved state after `verify`; call it holding `lock`."""
        state = self._check(prompt, config, resume=resume)
        if state is not None:
            self.remove_temporary_files()
            if state.finished:
                logger.info("run %s already finished; returning its identity", self.root)
            return self.verify(state, config.num_images)
        self.root.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.config_path, config.to_yaml())
        state = RunState(prompt=prompt)
        self.write_state(state)
        return state

    def read_config(self) -> ExtractorConfig:
        """Reads ``config.yaml``; one that is not a valid config is an `InputFileError`."""
        from consistent_char.config import ConfigError, ExtractorConfig

        try:
            return ExtractorConfig.from_file(self.config_path)
        except ConfigError as err:
            raise InputFileError(
                f"{self.config_path} is not this run's valid config ({' '.join(str(err).split())})"
                "; restore it, or start a new run in another folder"
            ) from None

    # ----------------------------------------------------------------- state

    def read_state(self) -> RunState:
        """Reads ``state.json``; a missing, unreadable or malformed one is an `InputFileError`."""
        try:
            data = json.loads(self.state_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputNotFoundError(f"{self.root} is not a run directory: no state.json") from None
        except (ValueError, OSError) as err:
            raise InputFileError(
                f"{self.state_path} is not valid JSON ({_short(err)}): restore it, or start a new "
                "run in another folder"
            ) from None
        state = RunState.from_dict(data, self.state_path)
        self.checksums.update(state.checksums)
        return state

    def write_state(self, state: RunState) -> None:
        """Writes ``state.json`` with the checksums of the steps it marks finished."""
        self._checksum_finished_step(state)
        state.checksums.update(self.checksums)
        write_json_atomic(self.state_path, state.__dict__)

    def _checksum_finished_step(self, state: RunState) -> None:
        # Files written by an earlier process of this run (a cut generation's leading images) or
        # by code outside this class (Identity.save) are hashed as the step is marked done.
        if state.step == "generated":
            for path in sorted((self.iter_dir(state.iteration) / "images").glob("*.png")):
                if self._key(path) not in self.checksums:
                    self.checksums[self._key(path)] = sha256_file(path)
        elif state.step == "refined":
            folder = self.iteration_identity_dir(state.iteration)
            for name in sorted(_entries(folder)):
                if (folder / name).is_file():
                    self.checksums[self._key(folder / name)] = sha256_file(folder / name)

    def _verified_bytes(self, path: Path) -> bytes:
        """The bytes of `path`, checked against the checksum recorded when it was written."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise InputFileError(f"{path} is missing") from None
        expected = self.checksums.get(self._key(path))
        if expected is not None and sha256_bytes(data) != expected:
            raise InputFileError(f"{path} changed after the run wrote it (checksum mismatch)")
        return data

    # ---------------------------------------------------------------- images

    def save_images(self, iteration: int, start: int, images: Sequence[Image.Image]) -> None:
        """Writes `images` as images `start`, `start + 1`, ... of `iteration`, in parallel.

        A crash can leave a later image written and an earlier one not; `existing_images` counts
        only the leading run, so a resumed run draws the rest again (same seeds, same images).
        """
        paths = [self.image_path(iteration, start + offset) for offset in range(len(images))]
        workers = min(PNG_WRITER_THREADS, len(images))
        if workers <= 1:
            digests = [
                save_png_atomic(path, image) for path, image in zip(paths, images, strict=True)
            ]
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="png") as pool:
                # list() re-raises the first failed write.
                digests = list(pool.map(save_png_atomic, paths, images))
        for path, digest in zip(paths, digests, strict=True):
            self.checksums[self._key(path)] = digest

    def existing_images(self, iteration: int, count: int) -> int:
        """How many leading images of `iteration` are already on disk and intact (a cut run's
        progress)."""
        n = 0
        while n < count and self._image_intact(self.image_path(iteration, n)):
            n += 1
        return n

    def _image_intact(self, path: Path) -> bool:
        if not path.is_file():
            return False
        try:
            self._verified_bytes(path)
            with Image.open(path) as im:
                im.verify()
        except (InputFileError, OSError, SyntaxError, ValueError):
            logger.warning("%s is damaged: drawing it again", path)
            return False
        return True

    def load_images(self, iteration: int, count: int) -> list[Image.Image]:
        """The first `count` images of `iteration`, each checked against its checksum."""
        images = []
        for j in range(count):
            path = self.image_path(iteration, j)
            data = self._verified_bytes(path)
            try:
                with Image.open(io.BytesIO(data)) as im:
                    images.append(im.convert("RGB"))
            except (OSError, SyntaxError, ValueError) as err:
                raise InputFileError(f"{path} is not a readable PNG ({_short(err)})") from None
            self.checksums.setdefault(self._key(path), sha256_bytes(data))
        return images

    # ------------------------------------------------------------ embeddings

    def save_embeddings(self, iteration: int, embeddings: np.ndarray) -> None:
        """Writes the embeddings of `iteration` and records their checksum."""
        path = self.embeddings_path(iteration)
        self.checksums[self._key(path)] = save_npy_atomic(path, embeddings)

    def load_embeddings(self, iteration: int, count: int | None = None) -> np.ndarray:
        """The embeddings of `iteration`, checked: recorded checksum, float32, ``(count, D)``,
        finite (NumPy's own format, never pickle)."""
        path = self.embeddings_path(iteration)
        data = self._verified_bytes(path)
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise InputFileError(f"{path} is not a NumPy array file ({_short(err)})") from None
        rows = arr.shape[0] if arr.ndim == 2 else -1
        if arr.dtype != np.float32 or arr.ndim != 2 or (count is not None and rows != count):
            raise InputFileError(
                f"{path} holds {arr.dtype} {arr.shape}, expected float32 "
                f"({count if count is not None else 'N'}, D)"
            )
        if not np.isfinite(arr).all():
            raise InputFileError(f"{path} holds NaN or infinite values")
        return arr

    # -------------------------------------------------------------- clusters

    def save_clusters(self, iteration: int, data: dict[str, Any]) -> None:
        """Writes the clustering of `iteration` as JSON and records its checksum."""
        path = self.clusters_path(iteration)
        self.checksums[self._key(path)] = write_json_atomic(path, data)

    def load_clusters(self, iteration: int, count: int | None = None) -> dict[str, Any]:
        """The clustering of `iteration`, checked: checksum, one label in ``[0, k)`` per image,
        ``k`` finite centroids."""
        path = self.clusters_path(iteration)
        try:
            data = json.loads(self._verified_bytes(path))
            labels = np.asarray(data["labels"])
            centroids = np.asarray(data["centroids"], dtype=np.float64)
            k = int(data["k"])
        except InputFileError:
            raise
        except (ValueError, KeyError, TypeError) as err:
            raise InputFileError(f"{path} is not a clustering ({_short(err)})") from None
        if (
            labels.ndim != 1
            or labels.dtype.kind not in "iu"
            or (count is not None and labels.shape[0] != count)
            or (labels.size and not 0 <= labels.min() <= labels.max() < k)
            or centroids.ndim != 2
            or centroids.shape[0] != k
            or not np.isfinite(centroids).all()
        ):
            raise InputFileError(
                f"{path} does not hold {count} labels in [0, {k}) and {k} centroids"
            )
        return dict(data)

    # ------------------------------------------------------------ verification

    def verify(self, state: RunState, num_images: int) -> RunState:
        """Checks every finished step's files (checksums, shapes, dtypes, finite values) and rolls
        `state` back to just before the first step whose files fail, so that step is computed
        again: every stage is deterministic, so the run still ends as an uncut one would."""
        for iteration in range(state.iteration + 1):
            for step in STEPS:
                if not state.done(iteration, step):
                    return state
                problem = self._step_problem(state, iteration, step, num_images)
                if problem is not None:
                    logger.warning(
                        "%s; computing iteration %d's %s step again", problem, iteration, step
                    )
                    self._set_aside(state, iteration, step)
                    state.roll_back_to_before(iteration, step)
                    return state
        return state

    def _step_problem(
        self, state: RunState, iteration: int, step: Step, num_images: int
    ) -> str | None:
        try:
            if step == "generated":
                for j in range(num_images):
                    self._verified_bytes(self.image_path(iteration, j))
            elif step == "embedded":
                self.load_embeddings(iteration, num_images)
            elif step == "clustered":
                # The last iteration of a run that stopped (converged, patience, saturation)
                # ends before clustering: it has no clusters to check.
                stopped_here = (
                    iteration == state.iteration
                    and (state.converged or state.finished)
                    and state.step == "clustered"
                )
                if not stopped_here:
                    self.load_clusters(iteration, num_images)
            else:
                from consistent_char.identity import Identity

                folder = self.iteration_identity_dir(iteration)
                if not folder.is_dir():
                    return f"{folder} is missing"
                for name in sorted(_entries(folder)):
                    self._verified_bytes(folder / name)
                Identity.load(folder)
        except (InputFileError, ValueError, OSError) as err:
            return str(err)
        return None

    def _set_aside(self, state: RunState, iteration: int, step: Step) -> None:
        """Renames what the recomputation would not overwrite: a damaged identity folder, and
        the folders of later iterations, drawn from what is now recomputed (a resumed run would
        otherwise reuse their images). Nothing is deleted."""
        moved = []
        if step == "refined" and self.iteration_identity_dir(iteration).exists():
            moved.append(self.iteration_identity_dir(iteration))
        later = iteration + 1
        while self.iter_dir(later).exists():
            moved.append(self.iter_dir(later))
            later += 1
        for folder in moved:
            target = _free_name(folder.with_name(folder.name + ".superseded"))
            os.replace(folder, target)
            logger.warning("moved %s aside to %s", folder, target)
            prefix = self._key(folder) + "/"
            for key in [k for k in self.checksums if k.startswith(prefix)]:
                del self.checksums[key]
        state.checksums = dict(self.checksums)

    def remove_temporary_files(self) -> None:
        """Removes the temporary files and folders a killed writer of this run left behind:
        only names this library gives them (``.NAME.XXXX.tmp``), and a temporary identity
        folder only when it holds nothing but identity files."""
        folders = [self.root, *sorted(self.root.glob("iter_*")), *self.root.glob("iter_*/images")]
        for folder in folders:
            for path in folder.glob(f".*{TEMP_SUFFIX}"):
                if path.is_file() and not path.is_symlink():
                    path.unlink(missing_ok=True)
                elif path.is_dir() and _entries(path) <= _IDENTITY_FILES:
                    shutil.rmtree(path)


def _entries(folder: Path) -> set[str]:
    try:
        return {p.name for p in folder.iterdir()}
    except (FileNotFoundError, NotADirectoryError):
        return set()


def _some(names: set[str]) -> str:
    shown = sorted(names)[:3]
    return ", ".join(shown) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _free_name(path: Path) -> Path:
    candidate, n = path, 1
    while candidate.exists():
        candidate = path.with_name(f"{path.name}.{n}")
        n += 1
    return candidate


def _short(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
