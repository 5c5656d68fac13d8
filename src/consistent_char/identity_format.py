"""The identity folder's format: its file names, and how its files are read and checked.

An identity folder holds ``identity.json`` (the token, the LoRA settings, the history),
``pytorch_lora_weights.safetensors`` (diffusers' LoRA format) and ``embeddings.safetensors``
(``{"clip_l": (n, 768), "clip_g": (n, 1280)}``). Only safetensors is read or written; anything
damaged or of another shape is an `IdentityError` that names the file.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import safetensors
import torch
from safetensors import safe_open

from consistent_char.config import check_prompt_template
from consistent_char.errors import OutputExistsError, UserError
from consistent_char.rundir import TEMP_SUFFIX, check_output_dir

logger = logging.getLogger(__name__)

IDENTITY_JSON = "identity.json"
LORA_FILE = "pytorch_lora_weights.safetensors"
EMBEDDINGS_FILE = "embeddings.safetensors"
#: Every file an identity folder can hold; replacing an identity moves any other file over.
IDENTITY_FILES = frozenset({IDENTITY_JSON, LORA_FILE, EMBEDDINGS_FILE})
FORMAT_VERSION = 1
_SafetensorError: type[Exception] = getattr(safetensors, "SafetensorError", Exception)


class IdentityError(UserError, ValueError):
    """An identity is malformed, damaged, or does not fit the model it is applied to."""


def check_save_target(directory: Path) -> None:
    if directory.is_symlink() and not directory.exists():
        raise OutputExistsError(f"{directory} is a broken link; remove it or choose another folder")
    if directory.exists() and not directory.is_dir():
        raise OutputExistsError(
            f"{directory} is a file, not an identity folder; choose another folder (nothing was "
            "changed)"
        )
    if (
        directory.is_dir()
        and any(directory.iterdir())
        and not (directory / IDENTITY_JSON).is_file()
    ):
        raise OutputExistsError(
            f"{directory} holds files and is not an identity folder (no {IDENTITY_JSON}); "
            "choose a new or empty folder (nothing was changed)"
        )
    check_output_dir(directory.parent if directory.exists() else directory, option="folder")


def swap_into_place(tmp: Path, directory: Path) -> None:
    """Puts the new identity folder `tmp` where `directory` is, keeping the user's own files."""
    if not directory.exists():
        os.replace(tmp, directory)
        return
    if not any(directory.iterdir()):
        directory.rmdir()
        os.replace(tmp, directory)
        return
    old = Path(
        tempfile.mkdtemp(prefix=f".{directory.name}.old.", suffix=TEMP_SUFFIX, dir=directory.parent)
    )
    old.rmdir()  # a free name for the old folder, which a rename cannot put inside an existing one
    os.replace(directory, old)
    try:
        os.replace(tmp, directory)
    except BaseException:
        os.replace(old, directory)
        raise
    for entry in old.iterdir():
        if entry.name not in IDENTITY_FILES:
            os.replace(entry, directory / entry.name)
    for name in IDENTITY_FILES:
        (old / name).unlink(missing_ok=True)
    old.rmdir()


def read_info(directory: Path) -> dict[str, Any]:
    """``identity.json``, checked field by field, with the defaults of older files filled in."""
    info_path = directory / IDENTITY_JSON
    if not info_path.is_file():
        raise IdentityError(f"{directory} is not an identity directory: no {IDENTITY_JSON}")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        raise IdentityError(
            f"{info_path} is not valid JSON ({' '.join(str(err).split())}): the identity is damaged"
        ) from None

    def bad(field: str, want: str) -> IdentityError:
        got = info.get(field, "nothing") if isinstance(info, dict) else info
        return IdentityError(f"{info_path}: {field} must be {want}, found {got!r}")

    if not isinstance(info, dict):
        raise IdentityError(f"{info_path} must hold a JSON object, found {type(info).__name__}")
    version = info.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version < 1:
        raise bad("format_version", "a positive int")
    if version > FORMAT_VERSION:
        raise IdentityError(
            f"{info_path} has format_version {version}, newer than this library reads "
            f"({FORMAT_VERSION}): upgrade consistent_char"
        )
    if not isinstance(info.get("token"), str):
        raise bad("token", "a string")
    info.setdefault("has_lora", (directory / LORA_FILE).is_file())
    info.setdefault("lora_rank", 4)
    info.setdefault("lora_alpha", info["lora_rank"])
    info.setdefault("target_modules", ["to_q", "to_k", "to_v", "to_out.0"])
    info.setdefault("metadata", {})
    if not isinstance(info["has_lora"], bool):
        raise bad("has_lora", "true or false")
    if isinstance(info["lora_rank"], bool) or not isinstance(info["lora_rank"], int):
        raise bad("lora_rank", "an int >= 1")
    if isinstance(info["lora_alpha"], bool) or not isinstance(info["lora_alpha"], (int, float)):
        raise bad("lora_alpha", "a number > 0")
    info["lora_alpha"] = float(info["lora_alpha"])
    modules = info["target_modules"]
    if not isinstance(modules, list) or not all(isinstance(m, str) and m for m in modules):
        raise bad("target_modules", "a list of module names")
    if not isinstance(info["metadata"], dict):
        raise bad("metadata", "an object")
    template = info["metadata"].get("identity_prompt_template")
    if template is not None:
        try:
            check_prompt_template(template)
        except ValueError as err:
            raise IdentityError(f"{info_path}: {err}") from None
    for name in ("num_vectors", "clip_l_width", "clip_g_width"):
        value = info.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise bad(name, "an int")
    return info


def read_tensors(path: Path, *, keys: set[str] | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file as float32 (other float dtypes converted, with a
    warning); a damaged file, other keys or non-float values are an `IdentityError`."""
    try:
        with safe_open(str(path), framework="pt") as f:
            found = set(f.keys())
            if keys is not None and found != keys:
                raise IdentityError(
                    f"{path} must hold exactly {sorted(keys)}, found {sorted(found)}"
                )
            tensors = {k: f.get_tensor(k) for k in sorted(found)}
    except IdentityError:
        raise
    except (_SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise IdentityError(
            f"{path} is not a readable safetensors file ({' '.join(str(err).split())}): the "
            "identity is damaged"
        ) from None
    out = {}
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise IdentityError(
                f"{path}: {name} holds {t.dtype} values; an identity's vectors and LoRA weights "
                "are floating-point"
            )
        if t.dtype != torch.float32:
            logger.warning("%s: %s is %s; converting it to float32", path, name, t.dtype)
            t = t.float()
        if not bool(torch.isfinite(t).all()):
            raise IdentityError(f"{path}: {name} holds NaN or infinite values")
        out[name] = t
    return out


def check_lora(lora: dict[str, torch.Tensor], rank: int, path: Path) -> None:
    """Each LoRA weight is a matrix whose rank side is `rank` (lora_A: rows, lora_B: columns)."""
    if not lora:
        raise IdentityError(f"{path} holds no UNet LoRA weights (no 'unet.' keys)")
    for key, t in lora.items():
        if t.ndim != 2 or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise IdentityError(f"{path}: {key} is not a LoRA weight of a linear layer")
        got = t.shape[0] if ".lora_A." in key else t.shape[1]
        if got != rank:
            raise IdentityError(f"{path}: {key} has rank {got}, but {IDENTITY_JSON} says {rank}")
