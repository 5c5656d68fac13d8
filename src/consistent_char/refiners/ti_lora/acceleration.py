"""Optional speed-ups of the training step; none of them changes what is trained.

- `_StepRunner` replays the step as a CUDA graph (``cuda_graphs``): one launch a step instead of
  tens of thousands of ops issued by the host.
- `compiled` compiles the UNet's repeated blocks with `torch.compile` (``compile_blocks``).
- `autocast` and `no_lora_input_cast` run the UNet in bfloat16 (``mixed_precision``) while the
  trained tensors stay float32.
- `copy_from_host` moves the step's random draws to the device without waiting for it.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

#: Eager steps (on a side stream) before `cuda_graphs` captures the training step.
CUDA_GRAPH_WARMUP_STEPS = 3


class _StepRunner:
    """Runs a training step: eagerly, or (``graphed``) as a CUDA graph.

    Graphed, the first `warmup` calls run eagerly on a side stream (what PyTorch asks before a
    capture: lazy initialisation, the optimizer's state, cuBLAS workspaces). The next call
    captures the step and replays it, and every later call only replays it. A capture that fails
    leaves the runner eager. The step's returned tensor is graph memory that the next replay
    overwrites, so callers get a copy.
    """

    def __init__(
        self,
        step: Callable[[], torch.Tensor],
        *,
        graphed: bool,
        warmup: int = CUDA_GRAPH_WARMUP_STEPS,
    ) -> None:
        self.step = step
        self.graphed = graphed
        self.warmup = warmup
        self.calls = 0
        self.graph: Any = None
        self.output: torch.Tensor | None = None
        self.side: Any = None

    def __call__(self) -> torch.Tensor:
        if not self.graphed:
            return self.step()
        self.calls += 1
        if self.calls <= self.warmup:
            return self._on_side_stream()
        if self.graph is None:
            started = time.perf_counter()
            try:
                self.graph, self.output = self._capture()
            except Exception as err:  # noqa: BLE001 - any capture failure falls back to eager
                logger.warning(
                    "could not capture the training step in a CUDA graph (%s: %s); "
                    "training on without one",
                    type(err).__name__,
                    err,
                )
                self.graphed, self.graph, self.output = False, None, None
                return self.step()
            logger.info(
                "captured the training step in a CUDA graph in %.2f s after %d eager steps",
                time.perf_counter() - started,
                self.warmup,
            )
        assert self.output is not None
        self.graph.replay()
        return self.output.clone()

    @staticmethod
    def check_device(device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(
                f"cuda_graphs=True needs the pipeline on a CUDA device; its UNet is on {device}"
            )

    def _on_side_stream(self) -> torch.Tensor:
        if self.side is None:
            self.side = torch.cuda.Stream()
        main = torch.cuda.current_stream()
        self.side.wait_stream(main)  # the inputs were filled on the main stream
        with torch.cuda.stream(self.side), warnings.catch_warnings():
            # AdamW warns that a capturable optimizer runs uncaptured: here it must, to warm up.
            warnings.filterwarnings("ignore", message=".*capturable=True.*")
            output = self.step()
        main.wait_stream(self.side)
        # Read on the main stream: its memory must not be reused before that read.
        output.record_stream(main)
        return output

    def _capture(self) -> tuple[Any, torch.Tensor]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = self.step()
        return graph, output


def copy_from_host(target: torch.Tensor, source: torch.Tensor) -> None:
    """Copies a host tensor into `target`; into CUDA from pinned memory without blocking, since
    a pageable copy waits for every kernel already queued on the stream."""
    cuda = target.device.type == "cuda"
    target.copy_(source.pin_memory() if cuda else source, non_blocking=cuda)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of a host tensor on `device`, made as `copy_from_host` makes it."""
    out = torch.empty_like(tensor, device=device)
    copy_from_host(out, tensor)
    return out


def repeated_blocks(unet: nn.Module) -> list[nn.Module]:
    """The UNet's sub-modules whose class diffusers lists in ``_repeated_blocks``."""
    names = set(getattr(unet, "_repeated_blocks", None) or ())
    return [m for m in unet.modules() if type(m).__name__ in names]


@contextlib.contextmanager
def compiled(blocks: Sequence[nn.Module]) -> Iterator[None]:
    """Compiles each block's call for the duration (what `nn.Module.compile` does) and gives
    back whatever the block had before, compiled by the caller or not."""
    # torch.compile caches by code object, so identical blocks, and later refines with new
    # LoRA layers of the same shapes, reuse one compiled graph instead of compiling again.
    before = [m._compiled_call_impl for m in blocks]
    try:
        for m in blocks:
            m.compile()
        yield
    finally:
        for m, impl in zip(blocks, before, strict=True):
            m._compiled_call_impl = impl


def uses_autocast(mixed_precision: str, device: torch.device) -> bool:
    """Whether ``mixed_precision`` runs the UNet under bfloat16 autocast on `device`."""
    return mixed_precision == "bf16" or (mixed_precision == "auto" and device.type == "cuda")


def autocast(active: bool, device: torch.device, *, cache: bool = True) -> Any:
    """bfloat16 autocast on `device` when `active`, else nothing. A captured step must not keep
    autocast's cast weights past its own call (``cache=False``)."""
    if not active:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=cache)


def no_lora_input_cast(unet: nn.Module, *, active: bool) -> Any:
    """Under autocast the LoRA matmuls run in bfloat16 anyway: peft's cast of each LoRA input
    to the float32 of the trained weights would only add copies (and their backward)."""
    try:
        from peft.helpers import disable_input_dtype_casting
    except ImportError:  # older peft: keep its casts
        return contextlib.nullcontext()
    return disable_input_dtype_casting(unet, active=active)
