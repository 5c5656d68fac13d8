"""One writer per run directory: a second run is refused with the holder's pid, a killed
holder's lock is taken over, and of several processes racing for a free run exactly one wins."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from test_extractor import make_extractor

from consistent_char.errors import RunLockedError
from consistent_char.rundir import LOCK_FILE, RunLock


def _fork(body) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            body()
        finally:
            os._exit(0)
    return pid


def _wait_for(path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            pytest.fail(f"{path} did not appear")
        time.sleep(0.01)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_two_runs_on_one_folder_cannot_both_write(tmp_path):
    run_dir, paused, go_on = tmp_path / "run", tmp_path / "paused", tmp_path / "go-on"

    def first_run():
        def pause(event):
            # Mid-run, holding the lock: wait until the test lets it go on.
            if event.kind == "stage_end" and event.stage == "embed" and event.iteration == 1:
                paused.touch()
                while not go_on.exists():
                    time.sleep(0.01)

        make_extractor().extract("a colour", run_dir=run_dir, callback=pause)

    writer = _fork(first_run)
    try:
        _wait_for(paused)
        before = _files(run_dir)
        with pytest.raises(RunLockedError, match=rf"process {writer}\)"):
            make_extractor().extract("a colour", run_dir=run_dir, resume=True)
        with pytest.raises(RunLockedError, match=rf"process {writer}\)"):
            make_extractor().extract("a colour", run_dir=run_dir)
        assert _files(run_dir) == before, "the refused run wrote into the folder"
    finally:
        go_on.touch()
        _, status = os.waitpid(writer, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    # The first run finished undisturbed, as an uncontended run does.
    reference = make_extractor().extract("a colour", run_dir=tmp_path / "ref")
    finished = make_extractor().extract("a colour", run_dir=run_dir, resume=True)
    assert torch.equal(finished.identity.clip_l, reference.identity.clip_l)
    assert not (run_dir / LOCK_FILE).exists()


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path):
    run_dir, locked = tmp_path / "run", tmp_path / "locked"

    def hold_forever():
        RunLock(run_dir).acquire()
        locked.touch()
        time.sleep(600)

    run_dir.mkdir()
    holder = _fork(hold_forever)
    _wait_for(locked)
    assert RunLock(run_dir).holder() == holder
    with pytest.raises(RunLockedError, match=rf"process {holder}\)"):
        RunLock(run_dir).acquire()
    os.kill(holder, signal.SIGKILL)
    os.waitpid(holder, 0)
    # The dead holder's file is still there, with its pid: it no longer locks anything.
    assert (run_dir / LOCK_FILE).read_text().strip() == str(holder)
    assert RunLock(run_dir).holder() is None
    with RunLock(run_dir):
        assert (run_dir / LOCK_FILE).read_text().strip() == str(os.getpid())
    assert not (run_dir / LOCK_FILE).exists()


def test_of_processes_racing_for_a_free_run_exactly_one_wins(tmp_path):
    run_dir, start = tmp_path / "run", tmp_path / "start"
    run_dir.mkdir()
    results = tmp_path / "results"
    results.mkdir()

    def contender():
        _wait_for(start)
        try:
            lock = RunLock(run_dir).acquire()
        except RunLockedError:
            (results / f"{os.getpid()}.refused").touch()
            return
        (results / f"{os.getpid()}.won").touch()
        # Hold it until every contender has tried (a second winner would wait here in vain).
        deadline = time.monotonic() + 30
        while len(list(results.iterdir())) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        lock.release()

    pids = [_fork(contender) for _ in range(4)]
    start.touch()
    for pid in pids:
        os.waitpid(pid, 0)
    outcomes = sorted(p.suffix for p in results.iterdir())
    assert outcomes == [".refused", ".refused", ".refused", ".won"]


def test_evaluating_a_run_another_process_writes_is_refused_and_writes_nothing(tmp_path):
    from consistent_char.eval.run import evaluate_run

    run_dir = tmp_path / "run"
    make_extractor(max_iterations=1).extract("a colour", run_dir=run_dir)
    before = _files(run_dir)
    with RunLock(run_dir), pytest.raises(RunLockedError, match="being written by another run"):
        evaluate_run(run_dir, probe=object(), generator=object())
    assert _files(run_dir) == before
