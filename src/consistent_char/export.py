"""Exports an identity to the files AUTOMATIC1111 and ComfyUI load, and imports them back.

`export_kohya(identity, "fox.safetensors")` writes two files:

- ``fox.safetensors``: the UNet LoRA in kohya-ss keys, ``lora_unet_<module path, "." → "_">``
  followed by ``.lora_down.weight`` (peft's ``lora_A``), ``.lora_up.weight`` (``lora_B``) and
  ``.alpha`` (a scalar: the applied scale is alpha / rank). A1111: ``models/Lora``, prompt
  ``<lora:fox:1>``; ComfyUI: ``models/loras``, a *LoraLoader* node.
- ``fox_emb.safetensors``: the token embeddings in the SDXL embedding format,
  ``{"clip_l": (n, 768), "clip_g": (n, 1280)}``. A1111: ``embeddings/``, prompt word ``fox_emb``
  (A1111 names an embedding by its file name, not by the identity's token); ComfyUI:
  ``models/embeddings``, prompt word ``embedding:fox_emb``.

The key conversion is diffusers' own (`convert_state_dict_to_kohya` one way,
`StableDiffusionXLPipeline.lora_state_dict` + `convert_unet_state_dict_to_peft` the other), the
same code diffusers uses to read LoRAs made for A1111; `export_kohya` checks that its output reads
back to the identity's exact keys before it writes anything. Only safetensors is read or written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import safetensors
import torch
from safetensors import safe_open
from safetensors.torch import save

from consistent_char._version import __version__
from consistent_char.errors import OutputExistsError, UserError
from consistent_char.identity import Identity, IdentityError
from consistent_char.rundir import check_output_file, write_bytes_atomic

_SafetensorError: type[Exception] = getattr(safetensors, "SafetensorError", Exception)

__all__ = ["EMBEDDING_SUFFIX", "ExportError", "embedding_path", "export_kohya", "import_kohya"]

#: The embedding file sits next to the LoRA file: ``<stem>_emb.safetensors``.
EMBEDDING_SUFFIX = "_emb"
# kohya-ss's SDXL UNet (sgm naming, ``input_blocks_4_1_...``) has 2 layers per block, the number
# diffusers needs to map sgm block ids of LoRAs from other tools onto its own UNet.
_SDXL_UNET_CONFIG = SimpleNamespace(layers_per_block=2)


class ExportError(UserError, ValueError):
    """An identity or file cannot be converted (e.g. a LoRA on layers kohya keys cannot name)."""


def embedding_path(lora_file: str | os.PathLike[str]) -> Path:
    """The embedding file that goes with a LoRA file: ``fox.safetensors → fox_emb.safetensors``."""
    path = Path(lora_file)
    return path.with_name(path.stem + EMBEDDING_SUFFIX + ".safetensors")


def export_kohya(identity: Identity, out_file: str | os.PathLike[str]) -> tuple[Path | None, Path]:
    """Writes the identity as a kohya-format LoRA and an SDXL embedding file.

    Args:
        identity: The identity to export.
        out_file: The LoRA file to write (``.safetensors``); the embeddings go next to it as
            `embedding_path(out_file)`.

    Returns:
        ``(lora_file, embedding_file)``; ``lora_file`` is ``None`` for an identity without a
        LoRA (textual inversion only), which writes the embedding file alone.

    Raises:
        ExportError: `out_file` does not end in ``.safetensors``, or the LoRA wraps modules whose
            kohya names would not read back to the same modules.
        consistent_char.errors.OutputExistsError: A file to write exists and is not an earlier
            export of this library (re-exporting over one's own files is allowed).
        consistent_char.errors.OutputNotWritableError: The folder cannot be written.

    Example:
        >>> identity = Identity.load("runs/demo/identity")  # doctest: +SKIP
        >>> export_kohya(identity, "export/fox.safetensors")  # doctest: +SKIP
        (PosixPath('export/fox.safetensors'), PosixPath('export/fox_emb.safetensors'))
    """
    out = Path(out_file)
    emb_file = embedding_path(out)
    _check_export_targets(out, emb_file, with_lora=identity.lora is not None)
    meta = _metadata(identity, out.stem)

    # 1. Convert and check the LoRA before anything is written.
    kohya = None if identity.lora is None else _checked_kohya(identity)

    # 2. Write: embeddings, then the LoRA, each through a temporary file.
    write_bytes_atomic(
        emb_file,
        save(
            {
                "clip_l": identity.clip_l.detach().cpu().contiguous(),
                "clip_g": identity.clip_g.detach().cpu().contiguous(),
            },
            metadata=meta,
        ),
    )
    if kohya is None:
        return None, emb_file
    kohya_meta = {
        **meta,
        # The ss_* keys are what kohya-ss writes; A1111 reads them to show the LoRA's base model
        # and settings.
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(identity.lora_rank),
        "ss_network_alpha": _number(identity.lora_alpha),
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_output_name": out.stem,
    }
    write_bytes_atomic(out, save(kohya, metadata=kohya_meta))
    return out, emb_file


def _check_export_targets(out: Path, emb_file: Path, *, with_lora: bool) -> None:
    """A ``.safetensors`` name, a writable folder, and no file of the user's in the way."""
    if out.suffix != ".safetensors":
        raise ExportError(
            f"the output file must end in .safetensors, got {out.name!r}; e.g. "
            "--out fox.safetensors"
        )
    check_output_file(out)
    for path in (out, emb_file) if with_lora else (emb_file,):
        if (path.exists() or path.is_symlink()) and not _is_our_export(path):
            raise OutputExistsError(
                f"{path} exists and is not an earlier export of consistent-char; choose another "
                "--out name or move that file (nothing was written)"
            )


def _is_our_export(path: Path) -> bool:
    """True for a safetensors file `export_kohya` wrote (its metadata names the token)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return "consistent_char_token" in (f.metadata() or {})
    except (_SafetensorError, OSError, ValueError, RuntimeError):
        return False


def import_kohya(
    lora_file: str | os.PathLike[str] | None,
    emb_file: str | os.PathLike[str],
    token: str | None = None,
) -> Identity:
    """Reads a kohya-format LoRA and an SDXL embedding file into an `Identity`.

    Reads the files `export_kohya` writes, and also LoRAs from other SDXL tools that only train
    the UNet (kohya-ss's sgm key names included).

    Args:
        lora_file: The LoRA file, or ``None`` for an embedding alone.
        emb_file: The ``{"clip_l", "clip_g"}`` embedding file.
        token: The identity's token; ``None`` takes the one `export_kohya` stored in the file's
            metadata, else the embedding file's name in angle brackets (``<fox_emb>``).

    Returns:
        The identity, with the LoRA in peft keys as `Identity.lora` holds it.

    Raises:
        ExportError: The files hold something else (text encoder LoRA, mixed alphas, other
            embedding keys).

    Example:
        >>> identity = import_kohya("fox.safetensors", "fox_emb.safetensors")  # doctest: +SKIP
    """
    emb_path = Path(emb_file)
    with safe_open(str(emb_path), framework="pt") as f:
        keys = set(f.keys())
        if keys != {"clip_l", "clip_g"}:
            raise ExportError(
                f"{emb_path} is not an SDXL embedding file: expected keys clip_l and clip_g, "
                f"found {sorted(keys)}"
            )
        clip_l, clip_g = f.get_tensor("clip_l"), f.get_tensor("clip_g")
        emb_meta = f.metadata() or {}
    lora: dict[str, torch.Tensor] | None = None
    lora_meta: dict[str, str] = {}
    rank, alpha = 4, 4.0
    if lora_file is not None:
        lora, rank, alpha, lora_meta = _read_kohya_lora(Path(lora_file))
    meta = {**emb_meta, **lora_meta}
    token = token or meta.get("consistent_char_token") or f"<{emb_path.stem}>"
    targets = _targets(meta, lora)
    metadata: dict[str, Any] = {}
    if meta.get("consistent_char_metadata"):
        metadata = json.loads(meta["consistent_char_metadata"])
    try:
        return Identity(
            token=token,
            clip_l=clip_l,
            clip_g=clip_g,
            lora=lora,
            lora_rank=rank,
            lora_alpha=alpha,
            target_modules=targets,
            metadata=metadata,
        )
    except IdentityError as err:
        raise ExportError(f"cannot import {emb_path}: {err}") from err


def _checked_kohya(identity: Identity) -> dict[str, torch.Tensor]:
    """The identity's LoRA in kohya keys, checked to read back to the same modules."""
    assert identity.lora is not None
    kohya = _to_kohya(identity)
    back = _from_kohya(kohya)[0]
    if set(back) != set(identity.lora):
        lost = sorted(set(identity.lora) - set(back))[:3]
        raise ExportError(
            "the LoRA wraps modules whose kohya names do not read back to the same modules "
            f"(e.g. {lost}); target_modules={identity.target_modules}"
        )
    return kohya


def _read_kohya_lora(path: Path) -> tuple[dict[str, torch.Tensor], int, float, dict[str, str]]:
    """A kohya LoRA file as peft keys, with its one rank, its one alpha and its metadata."""
    with safe_open(str(path), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not iterable)
        meta = f.metadata() or {}
    lora, alphas = _from_kohya(state)
    if not lora:
        raise ExportError(f"{path} holds no UNet LoRA weights")
    ranks = {int(v.shape[0]) for k, v in lora.items() if ".lora_A." in k}
    if len(ranks) != 1:
        raise ExportError(f"{path} mixes LoRA ranks {sorted(ranks)}; Identity has one")
    rank = ranks.pop()
    # A kohya file without alpha means alpha = rank (scale 1), as kohya-ss reads it.
    values = set(alphas.values()) or {float(rank)}
    if len(values) != 1:
        raise ExportError(f"{path} mixes LoRA alphas {sorted(values)}; Identity has one")
    return lora, rank, float(values.pop()), meta


# ---------------------------------------------------------------------------------- conversions


def _to_kohya(identity: Identity) -> dict[str, torch.Tensor]:
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    assert identity.lora is not None
    peft = {f"unet.{k}": v.detach().cpu().contiguous() for k, v in identity.lora.items()}
    kohya: dict[str, torch.Tensor] = convert_state_dict_to_kohya(peft)
    # diffusers writes alpha = rank (scale 1); the identity's own alpha is what it was trained
    # with, so it replaces that.
    for key in kohya:
        if key.endswith(".alpha"):
            kohya[key] = torch.tensor(float(identity.lora_alpha), dtype=torch.float32)
    return kohya


def _from_kohya(
    state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """kohya keys → (peft keys without the ``unet.`` prefix, alpha per module)."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    if not all(k.startswith("lora_") for k in state):
        odd = sorted(k for k in state if not k.startswith("lora_"))[:3]
        raise ExportError(f"not a kohya-format LoRA: keys such as {odd}")
    converted, network_alphas = StableDiffusionXLPipeline.lora_state_dict(
        dict(state), unet_config=_SDXL_UNET_CONFIG
    )
    others = sorted(k for k in converted if not k.startswith("unet."))
    if others:
        raise ExportError(
            f"the LoRA also trains the text encoders (e.g. {others[0]}); an Identity holds a "
            "UNet LoRA only"
        )
    unet = {k[len("unet.") :]: v for k, v in converted.items()}
    peft: dict[str, torch.Tensor] = convert_unet_state_dict_to_peft(unet)
    alphas = {k: float(v) for k, v in (network_alphas or {}).items()}
    return peft, alphas


def _targets(meta: Mapping[str, str], lora: Mapping[str, torch.Tensor] | None) -> list[str]:
    if meta.get("consistent_char_target_modules"):
        return list(json.loads(meta["consistent_char_target_modules"]))
    if not lora:
        return ["to_q", "to_k", "to_v", "to_out.0"]
    names: list[str] = []
    for key in lora:
        parts = key.split(".lora_")[0].split(".")
        # `to_out.0`: a numbered child is named with its parent, as target_modules names it.
        name = ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]
        if name not in names:
            names.append(name)
    return names


def _metadata(identity: Identity, name: str) -> dict[str, str]:
    info = identity.metadata or {}
    return {
        "consistent_char_token": identity.token,
        "consistent_char_target_modules": json.dumps(list(identity.target_modules)),
        "consistent_char_version": __version__,
        "consistent_char_prompt": str(info.get("prompt", "")),
        "consistent_char_base_model": str(info.get("base_model", "")),
        "consistent_char_metadata": json.dumps(info, default=str),
        "name": name,
    }


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
