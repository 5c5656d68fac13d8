"""Snapshots of an SDXL pipeline's tensors, for the generator and refiner checks that a stage
leaves the pipeline it shares with the other stages as it found it.

They compare hashes of every parameter and buffer, so they also work on full-size pipelines, at
the cost of reading every weight once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any


def sdxl_pipeline(stage: Any) -> Any | None:
    """The SDXL pipeline a stage exposes as ``.pipeline`` (or ``.pipe``), if any."""
    for attr in ("pipeline", "pipe"):
        pipe = getattr(stage, attr, None)
        if pipe is not None and all(
            getattr(pipe, n, None) is not None
            for n in ("unet", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
        ):
            return pipe
    return None


@dataclass
class Snapshot:
    """Digest of every parameter and buffer of a pipeline's modules (keyed ``component/name``,
    with peft's ``.base_layer`` dropped from names), and flags: requires_grad, training mode,
    adapters, tokenizer sizes."""

    tensors: dict[str, str] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    flags: dict[str, Any] = field(default_factory=dict)

    def diff(self, other: Snapshot, limit: int = 5) -> list[str]:
        """What differs from `other`, one line per tensor or flag, at most `limit` lines."""
        out = []
        for key in sorted(set(self.tensors) | set(other.tensors)):
            if key not in other.tensors:
                out.append(f"{key} disappeared")
            elif key not in self.tensors:
                out.append(f"{key} appeared")
            elif self.tensors[key] != other.tensors[key]:
                out.append(f"{key} changed")
        for key in sorted(set(self.flags) | set(other.flags)):
            if self.flags.get(key) != other.flags.get(key):
                out.append(f"{key}: {self.flags.get(key)!r} -> {other.flags.get(key)!r}")
        return out[:limit] + ([f"... {len(out) - limit} more"] if len(out) > limit else [])


def digest(tensor: Any) -> str:
    """Dtype, shape and content hash of a tensor."""
    import torch

    t = tensor.detach().to("cpu").contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
    return f"{t.dtype}{tuple(t.shape)}:{hashlib.sha1(raw).hexdigest()}"


def _components(pipe: Any) -> dict[str, Any]:
    components = getattr(pipe, "components", None) or {
        n: getattr(pipe, n) for n in ("unet", "vae", "text_encoder", "text_encoder_2")
    }
    return dict(sorted(components.items()))


def _live_tensors(module: Any, cname: str) -> dict[str, Any]:
    """Parameters and buffers of `module`, keyed ``component/name`` without peft's
    ``.base_layer``."""
    out = {}
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        out[f"{cname}/{name.replace('.base_layer', '')}"] = tensor
    return out


def snapshot(pipe: Any) -> Snapshot:
    """The `Snapshot` of `pipe` now."""
    import torch

    snap = Snapshot()
    for cname, module in _components(pipe).items():
        if isinstance(module, torch.nn.Module):
            for key, tensor in _live_tensors(module, cname).items():
                snap.tensors[key] = digest(tensor)
                snap.shapes[key] = tuple(tensor.shape)
                if isinstance(tensor, torch.nn.Parameter):
                    snap.flags[f"{key} requires_grad"] = bool(tensor.requires_grad)
            snap.flags[f"{cname} training"] = bool(module.training)
            peft_config = getattr(module, "peft_config", None)
            snap.flags[f"{cname} adapters"] = sorted(peft_config) if peft_config else []
        elif hasattr(module, "get_vocab"):
            snap.flags[f"{cname} vocab size"] = len(module)
    return snap


def training_violations(pipe: Any, before: Snapshot) -> list[str]:
    """The tensors the pipeline had before training that differ mid-training.

    A tensor may have moved under a new name (an embedding wrapped to add rows, a layer wrapped
    by peft) and an embedding matrix may have grown new rows: only its old rows must match.
    Tensors that are new (token rows, LoRA weights) are the identity's and may change.
    """
    import torch

    live: dict[str, Any] = {}
    for cname, module in _components(pipe).items():
        if isinstance(module, torch.nn.Module):
            live.update(_live_tensors(module, cname))
    moved = {digest(t) for k, t in live.items() if k not in before.tensors}
    problems = []
    for key, old_digest in before.tensors.items():
        tensor = live.get(key)
        if tensor is None:
            if old_digest not in moved:
                problems.append(f"{key} changed")
            continue
        if digest(tensor) == old_digest:
            continue
        old = before.shapes[key]
        grown = (
            tensor.ndim == 2
            and len(old) == 2
            and tensor.shape[0] > old[0]
            and tensor.shape[1] == old[1]
            and digest(tensor[: old[0]]) == old_digest
        )
        if not grown:
            problems.append(f"{key} changed")
    return problems


def torch_equal(a: Any, b: Any) -> bool:
    """Same shape and values, wherever the two tensors live."""
    import torch

    return bool(a.shape == b.shape and torch.equal(a.detach().cpu(), b.detach().cpu()))
