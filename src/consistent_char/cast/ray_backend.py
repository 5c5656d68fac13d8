"""Runs a cast's subjects as Ray tasks, one subject a task, across the machines of a cluster.

Ray is optional (``pip install consistent-char[ray]``) and imported only here, when a cast asks
for it. Each task asks for `CastConfig.gpus_per_subject` GPUs and `CastConfig.cpus_per_subject`
CPUs and extracts its subject into its run folder, which every worker must reach (a shared file
system on a cluster). A worker that dies (killed, out of memory, its machine lost) has its task
retried up to `CastConfig.max_retries` times; the retry resumes the run folder, whose lock the
dead worker's kernel released. An error inside an extraction is not retried: it is the
subject's outcome, recorded in ``cast.json``.

Example:
    >>> backend = RayBackend("auto", CastConfig(gpus_per_subject=1))  # doctest: +SKIP
    >>> run_cast(prompts, "cast/", config, source="consistory+", backend=backend)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Sequence
from typing import Any

from consistent_char.cast.runner import Outcome, SubjectJob, extract_subject
from consistent_char.config import CastConfig
from consistent_char.errors import InvalidValueError, UserError, one_line

__all__ = ["RayBackend", "ray_available"]

logger = logging.getLogger(__name__)

#: What ``pip`` installs for the Ray backend.
RAY_EXTRA = "pip install 'consistent-char[ray]'"


def ray_available() -> bool:
    """True when the optional `ray` package can be imported."""
    return importlib.util.find_spec("ray") is not None


class RayBackend:
    """Runs the jobs of a cast as Ray tasks.

    Args:
        address: ``"auto"`` joins the cluster running on this machine or, when there is none,
            starts a local Ray instance for the cast; any other value is a cluster's address
            (``ray://host:10001`` or ``host:6379``). In a process where Ray is already
            initialised, that Ray is used and left running.
        settings: The tasks' resources and retries.
        log_to_driver: Show the workers' output here (when this call starts or joins Ray).
    """

    def __init__(self, address: str, settings: CastConfig, *, log_to_driver: bool = True) -> None:
        if not ray_available():
            raise InvalidValueError(f"--ray needs Ray, which is not installed: {RAY_EXTRA}")
        if not address.strip():
            raise InvalidValueError("--ray needs 'auto' or a cluster address, got ''")
        self.address = address
        self.settings = settings
        self.log_to_driver = log_to_driver

    def run(
        self,
        jobs: Sequence[SubjectJob],
        on_start: Callable[[SubjectJob], None],
        on_done: Callable[[SubjectJob, Outcome], None],
    ) -> None:
        """Submits every job, then reports each as it ends."""
        import ray

        started_here = self._connect(ray)
        try:
            task = ray.remote(extract_subject).options(
                num_gpus=self.settings.gpus_per_subject,
                num_cpus=self.settings.cpus_per_subject,
                max_retries=self.settings.max_retries,
                retry_exceptions=False,
            )
            refs = {task.remote(job): job for job in jobs}
            for job in jobs:
                on_start(job)
            waiting = list(refs)
            while waiting:
                ready, waiting = ray.wait(waiting, num_returns=1)
                for ref in ready:
                    on_done(refs[ref], _outcome(ray, ref))
        finally:
            if started_here:
                ray.shutdown()

    def _connect(self, ray: Any) -> bool:
        """Joins or starts Ray; True when this call started it (and must shut it down)."""
        if ray.is_initialized():
            return False
        quiet = {"logging_level": logging.WARNING, "log_to_driver": self.log_to_driver}
        try:
            ray.init(address=self.address, **quiet)
        except ConnectionError as err:
            if self.address != "auto":
                raise UserError(
                    f"cannot reach the Ray cluster at {self.address} ({one_line(str(err))}); "
                    "check the address, or use --ray auto"
                ) from None
            logger.info("no Ray cluster running here; starting a local instance")
            ray.init(include_dashboard=False, **quiet)
        return True


def _outcome(ray: Any, ref: Any) -> Outcome:
    """The task's outcome; a task Ray gave up on (its workers died more often than retried)
    becomes a failure."""
    try:
        outcome: Outcome = ray.get(ref)
        return outcome
    except ray.exceptions.RayError as err:
        return {"status": "failed", "error": one_line(f"{type(err).__name__}: {err}")}
