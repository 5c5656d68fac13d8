"""The run directory: every artefact of a run, written so that a crash never leaves a file that a
resumed run would trust half-written (temp name + `os.replace`, which is atomic on POSIX).

    runs/<name>/
      config.yaml        the full resolved config
      state.json         finished steps, the history and a SHA-256 of every artefact
      .lock              while a process writes the run: that process's pid
      iter_000/ images/*.png  embeddings.npy  clusters.json  identity/
      identity/          the final identity

A run directory is written by one process at a time (`RunDirectory.lock`), and a resumed run
checks each finished step's files against their recorded checksums, shapes and values before it
trusts them (`RunDirectory.verify`): a step whose files changed is computed again.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image

from consistent_char.errors import (
    InputFileError,
    InputNotFoundError,
    InvalidValueError,
    OutputExistsError,
    OutputNotWritableError,
    RunLockedError,
)

if TYPE_CHECKING:
    from consistent_char.config import ExtractorConfig

logger = logging.getLogger(__name__)

Step = Literal["generated", "embedded", "clustered", "refined"]
STEPS: tuple[Step, ...] = ("generated", "embedded", "clustered", "refined")

STATE_VERSION = 1
LOCK_FILE = ".lock"
#: Suffix of every temporary file or folder this library writes before renaming it into place.
TEMP_SUFFIX = ".tmp"
#: The files an identity folder holds (identity.py writes them; kept here to clean up after it).
_IDENTITY_FILES = frozenset(
    {"identity.json", "embeddings.safetensors", "pytorch_lora_weights.safetensors"}
)

#: Threads that encode one call's PNGs. Pillow releases the GIL while it compresses, so they run
#: in parallel: on the GPU benchmark a 1024² image took 0.55 s to save on one core, 70 s for the
#: 128 images of an iteration (benchmarks/README.md).
PNG_WRITER_THREADS = min(8, os.cpu_count() or 1)


# ----------------------------------------------------------------------------- files and modes

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
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
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
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> str:
    return write_text_atomic(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def save_png_atomic(path: str | os.PathLike[str], image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return write_bytes_atomic(path, buf.getvalue())


def save_npy_atomic(path: str | os.PathLike[str], array: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return write_bytes_atomic(path, buf.getvalue())


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


# ------------------------------------------------------------------------------------ the state


@dataclass
class RunState:
    """What is finished: `(iteration, step)` is the last completed step; `history` holds the
    records of the iterations so far (as dicts), `finished` is set when the run returned;
    `checksums` maps run-relative file paths to their SHA-256 as written."""

    prompt: str
    iteration: int = -1
    step: Step | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False
    converged: bool = False
    version: int = STATE_VERSION
    checksums: dict[str, str] = field(default_factory=dict)

    def done(self, iteration: int, step: Step) -> bool:
        """True when `step` of `iteration` finished before (so a resumed run skips it)."""
        if self.step is None or iteration > self.iteration:
            return False
        if iteration < self.iteration:
            return True
        return STEPS.index(step) <= STEPS.index(self.step)

    def roll_back_to_before(self, iteration: int, step: Step) -> None:
        """Forgets `step` of `iteration` and everything after it, so a run computes it again."""
        index = STEPS.index(step)
        if index > 0:
            self.iteration, self.step = iteration, STEPS[index - 1]
        elif iteration > 0:
            self.iteration, self.step = iteration - 1, "refined"
        else:
            self.iteration, self.step = -1, None
        self.history = self.history[:iteration]
        self.finished = self.converged = False

    @classmethod
    def from_dict(cls, data: Any, source: Path) -> RunState:
        """Validates a parsed ``state.json``; raises `InputFileError` naming what is wrong."""

        def bad(why: str) -> InputFileError:
            return InputFileError(
                f"{source} is not a valid run state ({why}): restore it, or start a new run in "
                "another folder"
            )

        if not isinstance(data, dict):
            raise bad(f"a JSON object was expected, found {type(data).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise bad(f"unknown keys {unknown}")
        if not isinstance(data.get("prompt"), str) or not data["prompt"].strip():
            raise bad("no prompt")
        if data.get("version", STATE_VERSION) != STATE_VERSION:
            raise bad(f"version {data.get('version')!r}, this library reads {STATE_VERSION}")
        it = data.get("iteration", -1)
        if isinstance(it, bool) or not isinstance(it, int) or it < -1:
            raise bad(f"iteration {it!r}")
        step = data.get("step")
        if step is not None and step not in STEPS:
            raise bad(f"step {step!r}")
        if (step is None) != (it == -1):
            raise bad(f"iteration {it} with step {step!r}")
        history = data.get("history", [])
        if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
            raise bad("history is not a list of records")
        for index, record in enumerate(history):
            problem = _record_problem(record, index)
            if problem:
                raise bad(f"history[{index}] {problem}")
        for name in ("finished", "converged"):
            if not isinstance(data.get(name, False), bool):
                raise bad(f"{name} is {data[name]!r}")
        checksums = data.get("checksums", {})
        if not isinstance(checksums, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in checksums.items()
        ):
            raise bad("checksums is not a mapping of file names to digests")
        return cls(**data)


def _record_problem(record: dict[str, Any], index: int) -> str | None:
    """What is wrong with one saved `IterationRecord`, or None."""
    from consistent_char.interfaces import IterationRecord

    fields = IterationRecord.__dataclass_fields__
    required = {
        n for n, f in fields.items() if f.default is MISSING and f.default_factory is MISSING
    }
    if set(record) - set(fields) or required - set(record):
        unknown, missing = sorted(set(record) - set(fields)), sorted(required - set(record))
        return f"has unknown keys {unknown} or lacks {missing}"
    if record["iteration"] != index:
        return f"is iteration {record['iteration']!r}"
    for name in ("spread", "threshold"):
        value = record[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            return f"has {name} {value!r}"
    return None


# ------------------------------------------------------------------------------------- the lock

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]


class RunLock:
    """Holds a run directory for one writer: ``.lock`` holds the writer's pid.

    The lock is an `fcntl.flock` on that file, which the kernel releases when its process ends,
    however it ends: the lock of a process that was killed is taken over by the next run, and
    two live writers can never both hold it. The file is removed on release.
    """

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self.path = self.root / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Takes the lock or raises `RunLockedError` naming the process that holds it."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                self._lock(fd)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                raise self.locked_error(self.root, holder) from None
            except BaseException:
                os.close(fd)
                raise
            # The previous holder removes the file as it releases it: a lock on a file that is
            # no longer at `path` holds nothing, so try again.
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                os.close(fd)
                continue
            if os.path.samestat(os.fstat(fd), current):
                break
            os.close(fd)
        previous = _read_pid(fd)
        if previous is not None and previous != os.getpid():
            logger.info(
                "taking over the lock of %s from process %s, which ended", self.root, previous
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def holder(self) -> int | str | None:
        """The pid of the live process holding the lock (``"unknown"`` if it wrote none yet),
        or ``None`` when the run is free; takes nothing."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None
        try:
            if fcntl is None:
                pid = _read_pid(fd)
                return pid if pid is not None and _alive(pid) else None
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                return "unknown" if pid is None else pid
            return None
        finally:
            os.close(fd)  # also drops the shared lock taken to test it

    @staticmethod
    def locked_error(root: Path, holder: int | str | None) -> RunLockedError:
        return RunLockedError(
            f"{root} is being written by another run (process {holder or 'unknown'}); wait for "
            "it to end or stop it: two runs writing one folder would mix their files"
        )

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(fd)  # closing releases the flock

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    @staticmethod
    def _lock(fd: int) -> None:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        # Without flock: the pid in the file decides (a dead pid's lock is taken over).
        pid = _read_pid(fd)
        if pid is not None and pid != os.getpid() and _alive(pid):
            raise BlockingIOError


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------- the run directory


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
        diff = saved.differences(config)
        if diff:
            from consistent_char.config import ConfigError

            raise ConfigError(
                f"cannot resume {self.root} with a different config; differing fields: "
                + ", ".join(
                    f"{d} (run: {_get(saved, d)!r}, now: {_get(config, d)!r})" for d in diff
                )
                + "; resume without --config/--set/--model to use the run's own"
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
                converged_here = (
                    iteration == state.iteration and state.converged and state.step == "clustered"
                )
                if not converged_here:
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


# ------------------------------------------------------------------------------ output folders


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


# ------------------------------------------------------------------------------------- helpers


def _entries(folder: Path) -> set[str]:
    try:
        return {p.name for p in folder.iterdir()}
    except (FileNotFoundError, NotADirectoryError):
        return set()


def _some(names: set[str]) -> str:
    shown = sorted(names)[:3]
    return ", ".join(shown) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _plain_name(name: str) -> bool:
    return bool(name) and "/" not in name and name not in (".", "..")


def _free_name(path: Path) -> Path:
    candidate, n = path, 1
    while candidate.exists():
        candidate = path.with_name(f"{path.name}.{n}")
        n += 1
    return candidate


def _short(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _get(config: ExtractorConfig, dotted: str) -> Any:
    node: Any = config.to_dict()
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node
