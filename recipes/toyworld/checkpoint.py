"""Stage checkpoints: what a cut run resumes from, and how an exported folder seeds a new run."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from recipes.toyworld.log import log


def atomic_write_text(path: Path, text: str) -> None:
    """Writes `path` through a temporary file, so a run cut mid-write leaves the old file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


class Checkpoint:
    """``checkpoints/<stage>.safetensors`` (modules, EMA, optimizer) + ``<stage>.json`` (step,
    seconds, done, results)."""

    def __init__(self, directory: Path, stage: str) -> None:
        self.tensors_path = directory / f"{stage}.safetensors"
        self.state_path = directory / f"{stage}.json"

    def state(self) -> dict[str, Any] | None:
        """The saved state, or ``None`` where either file is missing (nothing to resume)."""
        if not self.state_path.is_file() or not self.tensors_path.is_file():
            return None
        state: dict[str, Any] = json.loads(self.state_path.read_text())
        return state

    def tensors(self) -> dict[str, torch.Tensor]:
        """The saved tensors, on the CPU."""
        return load_file(str(self.tensors_path))

    def save(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """Writes both files, each atomically: the tensors first, so a state always has them."""
        self.tensors_path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_save(tensors, self.tensors_path)
        atomic_write_text(self.state_path, json.dumps(state, indent=2))


def stage_done(directory: Path, stage: str) -> bool:
    """Whether `stage` has a finished checkpoint under `directory`."""
    return bool((Checkpoint(directory, stage).state() or {}).get("done"))


def module_tensors(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """`module`'s state, keyed ``<prefix>/<name>`` so that several modules share one file."""
    return {f"{prefix}/{k}": v for k, v in module.state_dict().items()}


def load_module(prefix: str, module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Loads into `module` the tensors `module_tensors` wrote under `prefix`."""
    own = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + "/")}
    module.load_state_dict(own)


def optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state (AdamW's moments), keyed ``opt/<index>/<name>``."""
    out: dict[str, torch.Tensor] = {}
    for index, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            out[f"opt/{index}/{key}"] = torch.as_tensor(value)
    return out


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    """Restores the state `optimizer_tensors` wrote; the parameter groups stay `opt`'s own."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    full = opt.state_dict()
    full["state"] = state
    opt.load_state_dict(full)


def seed_from_export(weights: Path, ckpt_dir: Path, continue_stages: Sequence[str]) -> None:
    """Writes checkpoints that start every stage from an exported weights folder (the layout
    `export` writes: ``pipeline/``, ``dinov2/``, ``probe/``): stages in `continue_stages` train
    on from those weights (fresh optimizer and schedule), the others count as finished.

    This is how a short GPU run is continued on another machine, e.g. the CPU.
    """
    modules = _exported_modules(weights)
    vae: Any = modules["vae"]["vae"]
    for stage, parts in modules.items():
        tensors: dict[str, torch.Tensor] = {}
        for key, module in parts.items():
            state = {k: v.float().contiguous() for k, v in module.state_dict().items()}
            tensors.update({f"model/{key}/{k}": v for k, v in state.items()})
            if stage == "unet":  # the UNet stage keeps EMA copies of its three modules
                tensors.update({f"ema/{key}/{k}": v.clone() for k, v in state.items()})
        done = stage not in continue_stages
        state = {"stage": stage, "step": 0, "seconds": 0.0, "loss": float("nan"), "done": done}
        if stage == "vae" and done:
            state["scaling_factor"] = float(vae.config.scaling_factor)
        Checkpoint(ckpt_dir, stage).save(tensors, state)
        log("setup", f"{stage}: {'loaded as finished' if done else 'continues'} from {weights}")


def _exported_modules(weights: Path) -> dict[str, dict[str, nn.Module]]:
    """Each stage's modules, loaded from an exported weights folder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, Dinov2Model

    from consistent_char.toy.models import IdentityProbe

    pipe = weights / "pipeline"
    return {
        "vae": {"vae": AutoencoderKL.from_pretrained(pipe / "vae")},
        "unet": {
            "text_encoder": CLIPTextModel.from_pretrained(pipe / "text_encoder"),
            "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(pipe / "text_encoder_2"),
            "unet": UNet2DConditionModel.from_pretrained(pipe / "unet"),
        },
        "dino": {"dino": Dinov2Model.from_pretrained(weights / "dinov2")},
        "probe": {"probe": IdentityProbe.from_pretrained(weights / "probe")},
    }
