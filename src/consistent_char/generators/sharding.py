"""One iteration's images drawn on several devices at once, the same images as on one.

Image j depends only on its prompt and seed, but only up to rounding: a batched matmul may
round differently from a smaller one, so regrouping the images into other batches can move a
pixel by a grey level. The shards are therefore made of whole batches, the batches one device
would draw: each device draws a contiguous run of them on its own copy of the pipeline, and
the images come back in order, byte for byte those of one device of the same kind.

The devices are a setting (``generator.devices``): ``None`` is the pipeline's device alone;
``"auto"`` every visible CUDA device when the pipeline is on one; or a list whose first entry is
the pipeline's device, where the refinement trains. ``"cpu"`` may repeat (each entry a worker
with its own copy; the tests shard that way); a CUDA device may not.
"""

from __future__ import annotations

import copy
import logging
import queue
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from consistent_char.errors import InvalidValueError

__all__ = ["check_device_list", "copy_pipeline", "draw_shards", "plan_shards", "resolve_devices"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: ``report(done, total)`` for one shard's images.
ShardReport = Callable[[int, int], None]


def check_device_list(devices: Any) -> None:
    """Checks a ``generator.devices`` value without asking torch which devices exist.

    Raises:
        ValueError: Not ``"auto"`` nor a list; an empty list; an entry that is not ``cpu``,
            ``cuda`` or ``cuda:N``; CPU and CUDA mixed (their images differ by rounding); or a
            CUDA device listed twice.
    """
    if devices is None or devices == "auto":
        return
    if not isinstance(devices, list):
        raise ValueError(f"give a list such as [cuda:0, cuda:1], or auto, not {devices!r}")
    if not devices:
        raise ValueError("the list is empty: give at least one device, or null for the run's")
    parsed = [_parse(d) for d in devices]
    if len({d.type for d in parsed}) > 1:
        raise ValueError(
            f"{devices} mixes CPU and CUDA devices: their images differ by rounding, so list "
            "devices of one kind"
        )
    cuda = [_index(d) for d in parsed if d.type == "cuda"]
    repeated = sorted({i for i in cuda if cuda.count(i) > 1})
    if repeated:
        raise ValueError(
            f"cuda:{repeated[0]} is listed twice in {devices}: list each CUDA device once"
        )


def _parse(device: Any) -> torch.device:
    if not isinstance(device, str):
        raise ValueError(f"each device must be a string such as cuda:1, got {device!r}")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}: use cpu, cuda or cuda:N")
    return parsed


def _index(device: torch.device) -> int:
    """A CUDA device's index; plain ``cuda`` is the current device (0 unless changed)."""
    if device.index is not None:
        return device.index
    return torch.cuda.current_device() if torch.cuda.is_available() else 0


def resolve_devices(devices: list[str] | str | None, first: torch.device) -> list[torch.device]:
    """The devices a generator whose pipeline is on `first` draws on, `first` first.

    Raises:
        InvalidValueError: A CUDA device that torch does not see, or a list that does not start
            with the pipeline's device.
    """
    check_device_list(devices)
    first = torch.device("cuda", _index(first)) if first.type == "cuda" else first
    if devices is None:
        return [first]
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if devices == "auto":
        if first.type != "cuda":
            return [first]
        return [first] + [torch.device("cuda", i) for i in range(visible) if i != first.index]
    parsed = [_parse(d) for d in devices]
    parsed = [torch.device("cuda", _index(d)) if d.type == "cuda" else d for d in parsed]
    for device in parsed:
        if device.type == "cuda" and _index(device) >= visible:
            raise InvalidValueError(
                f"generator.devices lists {device}, but torch sees {visible} CUDA device(s) "
                "on this machine: list only those it sees (or set generator.devices: auto)"
            )
    if parsed[0] != first:
        raise InvalidValueError(
            f"generator.devices must start with the pipeline's device {first} (where the "
            f"refinement runs), got {devices}: set device: {parsed[0]} or list {first} first"
        )
    return parsed


def plan_shards(total: int, batch: int, workers: int) -> list[tuple[int, int]]:
    """Splits images ``[0, total)`` drawn in batches of `batch` into contiguous shards of whole
    batches, one per worker at most, as even in batches as the count allows.

    Example:
        >>> plan_shards(10, 2, 2)  # five batches: two for the first worker, three for the other
        [(0, 4), (4, 10)]
        >>> plan_shards(3, 4, 2)  # one batch: one worker
        [(0, 3)]
    """
    batches = -(-total // batch)
    used = min(workers, batches)
    bounds = [min(total, (k * batches // used) * batch) for k in range(used + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def copy_pipeline(pipeline: Any, device: torch.device) -> Any:
    """A deep copy of `pipeline` whose weights are created on `device` directly.

    Each parameter and buffer is copied straight to `device`, so a copy onto another GPU never
    holds a second full copy on the source device, even for a moment.
    """
    memo: dict[int, Any] = {}
    for component in pipeline.components.values():
        if not isinstance(component, torch.nn.Module):
            continue
        for param in component.parameters():
            moved = param.detach().to(device, copy=True)
            memo[id(param)] = torch.nn.Parameter(moved, requires_grad=param.requires_grad)
        for buffer in component.buffers():
            memo[id(buffer)] = buffer.detach().to(device, copy=True)
    return copy.deepcopy(pipeline, memo)


def draw_shards(
    jobs: Sequence[Callable[[ShardReport], list[T]]],
    total: int,
    callback: Callable[[int, int], None] | None,
) -> list[T]:
    """Runs each shard's job on its own thread and joins their results in order.

    torch releases the GIL inside its kernels, so the devices work at once. Progress from the
    workers is passed to `callback` on the calling thread, as ``callback(done, total)`` over
    all shards. One job runs on the calling thread itself.
    """
    if len(jobs) == 1:
        return jobs[0](callback or (lambda _done, _total: None))
    done = [0] * len(jobs)
    updates: queue.Queue[tuple[int, int]] = queue.Queue()

    def reporter(k: int) -> ShardReport:
        return lambda shard_done, _shard_total: updates.put((k, shard_done))

    with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="shard") as pool:
        futures = [pool.submit(job, reporter(k)) for k, job in enumerate(jobs)]
        while not (all(f.done() for f in futures) and updates.empty()):
            try:
                k, d = updates.get(timeout=0.05)
            except queue.Empty:
                continue
            done[k] = d
            if callback is not None:
                callback(sum(done), total)
        # A failed shard re-raises here, once every shard has stopped.
        return [item for future in futures for item in future.result()]
