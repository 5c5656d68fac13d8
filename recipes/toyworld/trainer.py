"""A run's shared state: its rendered sets, its trained models and what each stage took."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from consistent_char.toy.data import RenderedSet, render_set
from recipes.toyworld.log import log
from recipes.toyworld.loop import run_loop
from recipes.toyworld.plan import Plan, StagePlan


class Trainer:
    """Runs the stages in order over one rendered set, sharing the trained models.

    The stages (`recipes.toyworld.stages`) fill in `vae`, `scaling_factor`, `unet_parts`,
    `dino` and `probe`; `seconds` and `results` collect what ``metrics.json`` reports.
    """

    def __init__(
        self,
        out: Path,
        *,
        seed: int,
        device: torch.device,
        plan: Plan,
        time_budget: float | None,
        workers: int | None,
    ) -> None:
        self.out = out
        self.ckpt_dir = out / "checkpoints"
        self.seed = seed
        self.device = device
        self.plan = plan
        self.time_budget = time_budget
        self.workers = workers
        self.seconds: dict[str, float] = {}
        on_cuda = device.type == "cuda"
        self.bf16 = on_cuda if plan.bf16 is None else plan.bf16
        self.channels_last = on_cuda if plan.channels_last is None else plan.channels_last
        self.results: dict[str, Any] = {}
        self._data: RenderedSet | None = None
        self._heldout: RenderedSet | None = None
        self._uniform: RenderedSet | None = None
        self._probe_set: RenderedSet | None = None
        self._images: torch.Tensor | None = None
        self.vae: Any = None
        self.scaling_factor: float | None = None
        self.unet_parts: dict[str, Any] = {}
        self.dino: Any = None
        self.probe: Any = None

    # -- data

    def data(self) -> RenderedSet:
        """The world-prior set (VAE, text encoders and UNet); renders every set on first use."""
        if self._data is None:
            t = time.perf_counter()
            plan, workers = self.plan, self.workers
            self._data = render_set(
                plan.n_pairs,
                seed=(self.seed, 1),
                captions_per_image=plan.captions_per_image,
                workers=workers,
            )
            self._heldout = render_set(
                plan.heldout_pairs, seed=(self.seed, 2), captions_per_image=1, workers=workers
            )
            self._uniform = render_set(
                plan.uniform_pairs,
                seed=(self.seed, 3),
                captions_per_image=1,
                workers=workers,
                prior="uniform",
            )
            self._probe_set = render_set(
                plan.uniform_pairs,
                seed=(self.seed, 4),
                captions_per_image=1,
                workers=workers,
                prior="uniform",
                invalid_fraction=plan.probe_invalid_fraction,
            )
            dt = time.perf_counter() - t
            self.seconds["render"] = dt
            sets = (self._data, self._heldout, self._uniform, self._probe_set)
            n = sum(len(x) for x in sets)
            log(
                "render",
                f"{n} images in {dt:.1f}s ({n / dt:.0f}/s, "
                f"{self.workers or os.cpu_count()} workers)",
            )
        return self._data

    def uniform(self) -> RenderedSet:
        """Pairs drawn uniformly over identities (DINOv2)."""
        self.data()
        assert self._uniform is not None
        return self._uniform

    def probe_set(self) -> RenderedSet:
        """Uniform draws with `Plan.probe_invalid_fraction` invalid images (the probe)."""
        self.data()
        assert self._probe_set is not None
        return self._probe_set

    def heldout(self) -> RenderedSet:
        """Pairs from the world's prior that no stage trains on (the evaluation)."""
        self.data()
        assert self._heldout is not None
        return self._heldout

    def images(self) -> torch.Tensor:
        """The world-prior set's images on the device, uint8."""
        if self._images is None:
            self._images = torch.from_numpy(self.data().images).to(self.device)
        return self._images

    # -- stages

    def time_limit(self, stage: StagePlan) -> float | None:
        """`stage`'s share of ``--time-budget``, in seconds; ``None`` without a budget."""
        return None if self.time_budget is None else self.time_budget * stage.time_share

    def train_stage(self, name: str, **loop: Any) -> dict[str, nn.Module]:
        """`run_loop` for the stage `name` with its plan, seed, device and time share; records
        its seconds, steps and whether time cut it short. Returns the trained modules."""
        stage: StagePlan = getattr(self.plan, name)
        result, trained = run_loop(
            name,
            stage,
            seed=self.seed,
            device=self.device,
            time_limit=self.time_limit(stage),
            **loop,
        )
        self.seconds[name] = result.seconds
        self.results[f"{name}_steps"] = result.steps
        self.results[f"{name}_cut_by_time"] = result.cut_by_time
        return trained
