"""A cast on a local Ray instance (2 CPUs) on ToyWorld: a worker SIGKILLed in the middle of a
subject's run has its task retried, the retry resumes the run folder, and the cast ends with the
same identities as a sequential cast. Ray is imported, not skipped when missing: the README's test
command installs the ``ray`` extra, so a missing Ray is a failure here."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import ray
import torch
from test_cast import TINY

from consistent_char import ExtractorConfig, Identity
from consistent_char.cast import run_cast
from consistent_char.cast.ray_backend import RayBackend
from consistent_char.config import CastConfig
from consistent_char.eval.real import PromptSet

SUBJECTS = ["a creature", "a red creature", "a round creature"]


@pytest.fixture
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


class _Killer(threading.Thread):
    """SIGKILLs the worker writing the first run folder found past iteration 0's refinement
    (the pid is the one the run's lock records) and notes the time stamp of that run's first
    image, which a resumed run keeps and a restarted run rewrites."""

    def __init__(self, cast_dir: Path):
        super().__init__(daemon=True)
        self.cast_dir = cast_dir
        self.killed: tuple[str, int, int] | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for lock in self.cast_dir.glob("*/.lock"):
                run = lock.parent
                if not (run / "iter_000" / "identity" / "identity.json").is_file():
                    continue
                try:
                    pid = int(lock.read_text())
                except (OSError, ValueError):  # released or being written: look again
                    continue
                if pid == os.getpid():
                    continue
                image = (run / "iter_000" / "images" / "0000.png").stat().st_mtime_ns
                os.kill(pid, signal.SIGKILL)
                self.killed = (run.name, pid, image)
                return
            time.sleep(0.01)


def test_ray_cast_survives_a_killed_worker_and_equals_a_sequential_cast(local_ray, tmp_path):
    prompts = PromptSet.from_mapping({"settings": ["in a forest"], "subjects": SUBJECTS})
    config = ExtractorConfig.from_overrides(TINY, base={"model": "toy"})
    backend = RayBackend("auto", CastConfig(gpus_per_subject=0, max_retries=3))

    killer = _Killer(tmp_path / "ray")
    killer.start()
    on_ray = run_cast(prompts, tmp_path / "ray", config, source="test", backend=backend)
    killer.stop.set()
    killer.join()

    assert killer.killed is not None, "no worker was caught in the middle of a run"
    name, pid, image_stamp = killer.killed
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert on_ray.counts() == {"pending": 0, "running": 0, "done": 3, "failed": 0}
    # The retry resumed the killed run: iteration 0's images are the ones written before.
    first_image = tmp_path / "ray" / name / "iter_000" / "images" / "0000.png"
    assert first_image.stat().st_mtime_ns == image_stamp

    sequential = run_cast(prompts, tmp_path / "seq", config, source="test")
    assert [r.iterations for r in sequential.subjects] == [r.iterations for r in on_ray.subjects]
    for record in on_ray.subjects:
        a = Identity.load(tmp_path / "ray" / record.run / "identity")
        b = Identity.load(tmp_path / "seq" / record.run / "identity")
        assert torch.equal(a.clip_l, b.clip_l) and torch.equal(a.clip_g, b.clip_g)
        assert a.lora is not None and b.lora is not None and a.lora.keys() == b.lora.keys()
        assert all(torch.equal(a.lora[k], b.lora[k]) for k in a.lora)
