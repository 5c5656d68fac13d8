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

- `consistent_char.rundir.files`: atomic writers and checksums;
- `consistent_char.rundir.state`: ``state.json`` (`RunState`);
- `consistent_char.rundir.lock`: one writer at a time (`RunLock`);
- `consistent_char.rundir.directory`: `RunDirectory`, the paths and the checked readers;
- `consistent_char.rundir.outputs`: output checks and `OutputFolder`, a user's folder.
"""

from consistent_char.rundir.directory import PNG_WRITER_THREADS, RunDirectory
from consistent_char.rundir.files import (
    TEMP_SUFFIX,
    current_umask,
    follow_umask,
    save_npy_atomic,
    save_png_atomic,
    sha256_bytes,
    sha256_file,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)
from consistent_char.rundir.lock import LOCK_FILE, RunLock
from consistent_char.rundir.outputs import OutputFolder, check_output_dir, check_output_file
from consistent_char.rundir.state import STATE_VERSION, STEPS, RunState, Step

__all__ = [
    "LOCK_FILE",
    "PNG_WRITER_THREADS",
    "STATE_VERSION",
    "STEPS",
    "TEMP_SUFFIX",
    "OutputFolder",
    "RunDirectory",
    "RunLock",
    "RunState",
    "Step",
    "check_output_dir",
    "check_output_file",
    "current_umask",
    "follow_umask",
    "save_npy_atomic",
    "save_png_atomic",
    "sha256_bytes",
    "sha256_file",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_text_atomic",
]
