"""The optimisation loop every stage runs: AdamW, warm-up + cosine, EMA, checkpoints, resume."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from recipes.toyworld.checkpoint import (
    Checkpoint,
    load_module,
    load_optimizer,
    module_tensors,
    optimizer_tensors,
)
from recipes.toyworld.log import log
from recipes.toyworld.plan import STAGES, StagePlan

#: A stage's loss on one batch: ``loss_fn(step, rng, gen)``, drawing its batch from the streams.
LossFn = Callable[[int, np.random.Generator, torch.Generator], torch.Tensor]


def seed_of(*parts: int) -> int:
    """A 63-bit seed from integers: independent streams for each (run seed, stage, step)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> 1)


@contextmanager
def autocast(device: torch.device, enabled: bool) -> Iterator[None]:
    """bf16 autocast on `device` where `enabled`."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled):
        yield


def randint(high: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """`n` indices in ``[0, high)``, drawn where the generator lives: a host-to-device copy each
    step would make the CPU wait for the GPU's queue to drain."""
    return torch.randint(0, high, (n,), generator=gen, device=gen.device)


@dataclass
class LoopResult:
    """How a stage's loop ended: its steps, seconds, last logged loss, and whether time cut it."""

    steps: int
    seconds: float
    loss: float
    cut_by_time: bool


@dataclass
class _Position:
    """Where a stage's loop stands; what its checkpoint records."""

    step: int = 0
    seconds: float = 0.0
    loss: float = float("nan")


def run_loop(
    name: str,
    stage: StagePlan,
    *,
    modules: dict[str, nn.Module],
    loss_fn: LossFn,
    checkpoint: Checkpoint,
    seed: int,
    device: torch.device,
    time_limit: float | None = None,
    ema_modules: Sequence[str] = (),
    ema_decay: float = 0.999,
) -> tuple[LoopResult, dict[str, nn.Module]]:
    """Optimises `modules` with AdamW on `loss_fn` for ``stage.steps`` steps (or `time_limit`
    seconds), with warmup + cosine learning rate, gradient clipping, optional EMA copies and
    checkpoints every ``stage.checkpoint_every`` steps.

    The random streams are reseeded from ``(seed, stage, step)`` at each checkpoint boundary, so
    a run resumed from a checkpoint draws the same batches as an uninterrupted one.

    Returns:
        The result and the EMA modules (or the trained modules where no EMA is kept).
    """
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    ema = {key: _frozen_copy(modules[key]) for key in ema_modules}
    run = _StageRun(name, stage, checkpoint, modules, ema, _adamw(params, stage, device))
    trained = {k: ema.get(k, m) for k, m in modules.items()}
    result = run.resume()
    if result is None:
        stage_id = STAGES.index(name) if name in STAGES else len(STAGES)
        for module in modules.values():
            module.train()
        cut = run.optimise(loss_fn, params, seed, stage_id, device, time_limit, ema_decay)
        at = run.at
        result = LoopResult(at.step, at.seconds, at.loss, cut)
    return result, trained


class _StageRun:
    """One stage's modules, EMA copies and optimizer, with its checkpoint and position."""

    def __init__(
        self,
        name: str,
        stage: StagePlan,
        checkpoint: Checkpoint,
        modules: dict[str, nn.Module],
        ema: dict[str, nn.Module],
        opt: torch.optim.Optimizer,
    ) -> None:
        self.name, self.stage, self.checkpoint = name, stage, checkpoint
        self.modules, self.ema, self.opt = modules, ema, opt
        self.at = _Position()

    def resume(self) -> LoopResult | None:
        """Loads the checkpoint if there is one; returns its result if the stage is done."""
        state = self.checkpoint.state()
        if state is None:
            return None
        tensors = self.checkpoint.tensors()
        for key, module in self.modules.items():
            load_module(f"model/{key}", module, tensors)
        for key, module in self.ema.items():
            load_module(f"ema/{key}", module, tensors)
        at = self.at
        at.step, at.seconds = int(state["step"]), float(state["seconds"])
        at.loss = float(state.get("loss", float("nan")))
        if state.get("done"):
            log(self.name, f"already trained ({at.step} steps, {at.seconds:.0f}s): loaded")
            return LoopResult(at.step, at.seconds, at.loss, bool(state.get("cut_by_time")))
        load_optimizer(self.opt, tensors)
        log(self.name, f"resuming at step {at.step} ({at.seconds:.0f}s done)")
        return None

    def optimise(
        self,
        loss_fn: LossFn,
        params: list[nn.Parameter],
        seed: int,
        stage_id: int,
        device: torch.device,
        time_limit: float | None,
        ema_decay: float,
    ) -> bool:
        """Trains from the current position to the last step or the time limit, checkpointing
        on the way and at the end. Returns whether the time limit cut the stage short."""
        name, stage, at = self.name, self.stage, self.at
        rng, gen = _streams(seed, stage_id, at.step, device)
        t0 = time.perf_counter() - at.seconds
        cut = False
        window: list[torch.Tensor] = []
        while True:
            at.seconds = time.perf_counter() - t0
            progress = at.step / stage.steps
            if time_limit:
                progress = max(progress, at.seconds / time_limit)
            if progress >= 1.0:
                cut = at.step < stage.steps
                break
            if at.step % stage.checkpoint_every == 0 and at.step > 0:
                rng, gen = _streams(seed, stage_id, at.step, device)
            lr = _learning_rate(stage, at.step, progress)
            window.append(self.step(loss_fn(at.step, rng, gen), params, lr, ema_decay))
            at.step += 1
            if at.step % stage.log_every == 0 or at.step == stage.steps:
                at.loss = _mean_loss(window, name, at.step)
                at.seconds = time.perf_counter() - t0
                log(
                    name,
                    f"step {at.step:>6}/{stage.steps}  loss {at.loss:.5f}  lr {lr:.2e}  "
                    f"{at.seconds:7.1f}s  {at.seconds / max(at.step, 1) * 1000:6.1f} ms/step",
                )
            if at.step % stage.checkpoint_every == 0 and at.step < stage.steps:
                at.seconds = time.perf_counter() - t0
                self.save(done=False)
        if window:
            at.loss = float(torch.stack(window).float().mean())
        at.seconds = time.perf_counter() - t0
        if cut:
            log(name, f"time limit reached after {at.step}/{stage.steps} steps")
        self.save(done=True, cut=cut)
        log(name, f"done: {at.step} steps in {at.seconds:.1f}s")
        return cut

    def step(
        self, loss: torch.Tensor, params: list[nn.Parameter], lr: float, ema_decay: float
    ) -> torch.Tensor:
        """One optimizer step on `loss` at learning rate `lr`, then the EMA update."""
        for group in self.opt.param_groups:
            group["lr"] = lr
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.ema:
            # The EMA warms up: early on it follows the weights closely.
            d = min(ema_decay, (1.0 + self.at.step) / (10.0 + self.at.step))
            with torch.no_grad():
                for key, copy_ in self.ema.items():
                    src: list[torch.Tensor] = [p.detach() for p in self.modules[key].parameters()]
                    dst: list[torch.Tensor] = list(copy_.parameters())
                    torch._foreach_lerp_(dst, src, 1.0 - d)
        return loss.detach()

    def save(self, done: bool, cut: bool = False) -> None:
        """Checkpoints the modules, the EMA and, while the stage goes on, the optimizer."""
        tensors: dict[str, torch.Tensor] = {}
        for key, module in self.modules.items():
            tensors.update(module_tensors(f"model/{key}", module))
        for key, module in self.ema.items():
            tensors.update(module_tensors(f"ema/{key}", module))
        if not done:
            tensors.update(optimizer_tensors(self.opt))
        state: dict[str, Any] = {
            "stage": self.name,
            "step": self.at.step,
            "seconds": self.at.seconds,
            "loss": self.at.loss,
            "done": done,
            "cut_by_time": cut,
            "plan": asdict(self.stage),
        }
        self.checkpoint.save(tensors, state)


def _adamw(params: list[nn.Parameter], stage: StagePlan, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: biases and norms are not decayed."""
    decay, no_decay = [p for p in params if p.ndim >= 2], [p for p in params if p.ndim < 2]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": stage.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=stage.lr,
        betas=(0.9, 0.99),
        **({"fused": True} if device.type == "cuda" else {}),
    )


def _streams(
    seed: int, stage_id: int, step: int, device: torch.device
) -> tuple[np.random.Generator, torch.Generator]:
    """The numpy and torch random streams of a stage from `step` on."""
    rng = np.random.default_rng([seed, stage_id, step])
    gen = torch.Generator(device=device).manual_seed(seed_of(seed, stage_id, step))
    return rng, gen


def _learning_rate(stage: StagePlan, step: int, progress: float) -> float:
    """Linear warm-up, then cosine decay over `progress` down to 5% of the peak."""
    lr = stage.lr * min(1.0, (step + 1) / stage.warmup)
    return lr * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _mean_loss(window: list[torch.Tensor], name: str, step: int) -> float:
    """The mean of the losses since the last log line (then cleared); a diverged loss stops the
    run rather than checkpointing NaN weights."""
    loss = float(torch.stack(window).float().mean())
    window.clear()
    if not math.isfinite(loss):
        raise FloatingPointError(f"{name}: loss is {loss} at step {step}")
    return loss


def _frozen_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` that no optimizer touches: the EMA's."""
    clone = copy.deepcopy(module)
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone
