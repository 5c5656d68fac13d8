"""A run killed with SIGKILL anywhere resumes to the identity an uncut run learns.

A child process (forked from the test, so it starts in milliseconds) runs a short extraction on a
tiny SDXL pipeline and a tiny DINOv2, both loaded from folders with the real `from_pretrained`,
and kills itself with SIGKILL at a chosen point: while drawing, embedding or training, or halfway
through writing a file. SIGKILL runs no handler, `finally` or `atexit`: the run directory is left
exactly as a power cut would leave it. The test then resumes the run in its own process and
compares the identity's tensors with an uncut run's, bit for bit.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from consistent_char import (
    ExtractorConfig,
    Identity,
    IterativeIdentityExtractor,
    extractor,
    generation,
    rundir,
)
from consistent_char import identity as identity_module
from consistent_char.testing.tiny import tiny_dinov2, tiny_sdxl_pipeline

PROMPT = "a creature"


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> ExtractorConfig:
    root = tmp_path_factory.mktemp("models")
    tiny_sdxl_pipeline(seed=0, directory=root / "sdxl")
    tiny_dinov2(seed=0, directory=root / "dinov2")
    return ExtractorConfig.from_overrides(
        {
            "model": str(root / "sdxl"),
            "device": "cpu",
            "num_images": 8,
            "d_size_c": 4,
            "d_min_c": 2,
            "max_iterations": 2,
            "generator.num_inference_steps": 2,
            # Batches of 4 in every run, so that the child's chunks of 4 (below) draw the same
            # batches: on a CPU a batch's size changes its images' last bits.
            "generator.batch_size": 4,
            "embedder.model": str(root / "dinov2"),
            "refiner.steps": 3,
            "refiner.batch_size": 2,
            "refiner.initializer_token": "creature",
            "refiner.lora_lr": 1e-3,
            # Never converged: both iterations draw, embed, cluster and refine.
            "convergence.d_conv_relative": 0.001,
        }
    )


@pytest.fixture(scope="module")
def reference(config, tmp_path_factory) -> Identity:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    return IterativeIdentityExtractor.from_config(config).extract(PROMPT, run_dir=run_dir).identity


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_on_event(stage: str, iteration: int, done: int | None = None):
    def callback(event):
        at = event.kind == "progress" and event.stage == stage and event.iteration == iteration
        if at and (done is None or event.done == done):
            _die()

    return callback


def _kill_halfway_through_writing(name: str, nth: int = 1) -> Callable[[], None]:
    """Makes the `nth` atomic write of a file called `name` stop halfway, as a cut would."""
    seen = {"n": 0}
    real = rundir.files.write_bytes_atomic

    def write(path, data):
        if Path(path).name == name:
            seen["n"] += 1
            if seen["n"] == nth:
                fd, tmp = tempfile.mkstemp(
                    prefix=f".{name}.", suffix=rundir.TEMP_SUFFIX, dir=Path(path).parent
                )
                os.write(fd, data[: len(data) // 2])
                os.fsync(fd)
                _die()
        return real(path, data)

    def install() -> None:
        rundir.files.write_bytes_atomic = write

    return install


def _kill_while_saving_identity(nth: int) -> Callable[[], None]:
    """Kills the process in the `nth` `Identity.save`, after its embeddings file is written."""
    seen = {"n": 0}
    real = identity_module.save_file

    def save_file(tensors, filename, *args, **kwargs):
        real(tensors, filename, *args, **kwargs)
        seen["n"] += 1
        if seen["n"] == nth:
            _die()

    def install() -> None:
        identity_module.save_file = save_file

    return install


def _kill_in_report() -> None:
    extractor.build_report = lambda root: _die()


def _kill_in_embedder(iteration: int) -> Callable[[IterativeIdentityExtractor], None]:
    def install(ex: IterativeIdentityExtractor) -> None:
        calls = {"n": 0}
        real = ex.embedder.embed

        def embed(images):
            calls["n"] += 1
            if calls["n"] == iteration + 1:
                real(images[:2])  # partway through the work
                _die()
            return real(images)

        ex.embedder.embed = embed  # type: ignore[method-assign]

    return install


# name -> (install before the run, progress callback, install on the built extractor)
KILL_POINTS: dict[str, tuple[Callable[[], None] | None, Callable | None, Callable | None]] = {
    "while drawing iteration 1": (None, _kill_on_event("generate", 1, done=8), None),
    "while embedding iteration 1": (None, None, _kill_in_embedder(1)),
    "while training iteration 0": (None, _kill_on_event("refine", 0, done=2), None),
    "while writing embeddings.npy": (
        _kill_halfway_through_writing("embeddings.npy", 2),
        None,
        None,
    ),
    "while writing state.json": (_kill_halfway_through_writing("state.json", 5), None, None),
    "while saving iteration 1's identity": (_kill_while_saving_identity(2), None, None),
    "while writing the report": (_kill_in_report, None, None),
}


def _run_in_child_until_killed(config: ExtractorConfig, run_dir: Path, point: str) -> None:
    before, callback, on_extractor = KILL_POINTS[point]
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            # Smaller chunks, so a cut generation has written some images and not others.
            generation.GENERATION_CHUNK = 4
            if before is not None:
                before()
            ex = IterativeIdentityExtractor.from_config(config)
            if on_extractor is not None:
                on_extractor(ex)
            ex.extract(PROMPT, run_dir=run_dir, callback=callback)
        finally:
            os._exit(3)  # reached only if the kill point never came
    deadline = time.monotonic() + 120
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the child run did not reach the kill point {point!r} in time")
        time.sleep(0.02)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
        f"the child was not killed {point} (exit status {status})"
    )


def _tree(root: Path, skip: Path) -> dict[str, tuple[bytes | None, int]]:
    out = {}
    for path in sorted(root.rglob("*")):
        if path == skip or skip in path.parents:
            continue
        stat = path.lstat()
        out[str(path.relative_to(root))] = (
            path.read_bytes() if path.is_file() else None,
            stat.st_mtime_ns,
        )
    return out


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_run_killed_then_resumed_learns_the_uncut_identity(config, reference, tmp_path, point):
    # The user's own files beside the run.
    (tmp_path / "notes.txt").write_text("mine\n")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.png").write_bytes(b"not really a png")
    run_dir = tmp_path / "run"
    outside = _tree(tmp_path, skip=run_dir)

    _run_in_child_until_killed(config, run_dir, point)
    assert (run_dir / "state.json").is_file()
    resumed = IterativeIdentityExtractor.from_config(config).extract(
        PROMPT, run_dir=run_dir, resume=True
    )

    got, want = resumed.identity, reference
    assert torch.equal(got.clip_l, want.clip_l) and torch.equal(got.clip_g, want.clip_g)
    assert got.lora is not None and want.lora is not None and got.lora.keys() == want.lora.keys()
    assert all(torch.equal(got.lora[k], want.lora[k]) for k in want.lora)
    saved = Identity.load(run_dir / "identity")
    assert torch.equal(saved.clip_l, want.clip_l)
    # Nothing outside the run folder was touched, and no temporary file or lock is left in it.
    assert _tree(tmp_path, skip=run_dir) == outside
    leftovers = [p.name for p in run_dir.rglob(".*")]
    assert leftovers == [], leftovers
