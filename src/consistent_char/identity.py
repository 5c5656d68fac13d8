"""`Identity`: what the loop learns (Θ = new token embeddings τ + LoRA weights θ), and its files.

The on-disk format is plain diffusers, so a user needs nothing from this library to use it::

    identity/
      identity.json                     # token, prompt, base model, LoRA settings, history
      pytorch_lora_weights.safetensors  # pipe.load_lora_weights(dir)
      embeddings.safetensors            # {"clip_l": (n, 768), "clip_g": (n, 1280)}

Only safetensors is read or written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLPipeline

logger = logging.getLogger(__name__)

IDENTITY_JSON = "identity.json"
LORA_FILE = "pytorch_lora_weights.safetensors"
EMBEDDINGS_FILE = "embeddings.safetensors"
FORMAT_VERSION = 1
DEFAULT_ADAPTER_NAME = "consistent_char"


class IdentityError(ValueError):
    """An identity is malformed or does not fit the model it is applied to."""


@dataclass
class Identity:
    """A learned character: token embeddings for both SDXL text encoders and a UNet LoRA.

    Attributes:
        token: The placeholder token written in prompts, e.g. ``"<cc-fox>"``. With ``n`` vectors,
            diffusers' multi-vector convention adds ``token``, ``token_1``, ... ``token_{n-1}``
            and expands ``token`` in prompts to all of them.
        clip_l: ``(n, 768)`` rows for the first text encoder (CLIP ViT-L) in full-size SDXL.
        clip_g: ``(n, 1280)`` rows for the second text encoder (OpenCLIP bigG).
        lora: The UNet LoRA in peft's key format (``...to_q.lora_A.weight``), or ``None`` for a
            textual-inversion-only identity.
        lora_rank: LoRA rank ``r``.
        lora_alpha: LoRA scaling numerator (the applied scale is ``alpha / r``).
        target_modules: UNet module names the LoRA wraps.
        metadata: Free-form provenance (prompt, base model, settings, history, versions).

    Example:
        >>> identity = Identity.load("runs/demo/identity")  # doctest: +SKIP
        >>> identity.apply_to(pipe)  # doctest: +SKIP
        >>> image = pipe(f"{identity.token} in the snow").images[0]  # doctest: +SKIP
    """

    token: str
    clip_l: torch.Tensor
    clip_g: torch.Tensor
    lora: dict[str, torch.Tensor] | None = None
    lora_rank: int = 4
    lora_alpha: float = 4.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.token or any(c.isspace() for c in self.token):
            raise IdentityError(
                f"token must be a non-empty word without spaces, got {self.token!r}"
            )
        for name in ("clip_l", "clip_g"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.ndim != 2 or t.shape[0] < 1:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise IdentityError(f"{name} must be a tensor of shape (n, width), got {shape}")
        if self.clip_l.shape[0] != self.clip_g.shape[0]:
            raise IdentityError(
                f"clip_l and clip_g must have the same number of vectors, got "
                f"{self.clip_l.shape[0]} and {self.clip_g.shape[0]}"
            )

    @property
    def num_vectors(self) -> int:
        return int(self.clip_l.shape[0])

    @property
    def tokens(self) -> list[str]:
        """All tokens the identity adds to each tokenizer (diffusers' multi-vector names)."""
        return [self.token] + [f"{self.token}_{i}" for i in range(1, self.num_vectors)]

    # ------------------------------------------------------------------ files

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Writes the identity to `directory` atomically (a temp folder renamed into place)."""
        from diffusers import StableDiffusionXLPipeline

        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            save_file(
                {
                    "clip_l": self.clip_l.detach().float().cpu().contiguous(),
                    "clip_g": self.clip_g.detach().float().cpu().contiguous(),
                },
                str(tmp / EMBEDDINGS_FILE),
            )
            if self.lora is not None:
                # diffusers' own writer, so the file is exactly what load_lora_weights expects,
                # with the LoRA config stored as metadata (rank, alpha, targets).
                StableDiffusionXLPipeline.save_lora_weights(
                    str(tmp),
                    unet_lora_layers={
                        k: v.detach().float().cpu().contiguous() for k, v in self.lora.items()
                    },
                    unet_lora_adapter_metadata=self._lora_config(),
                )
            info = {
                "format_version": FORMAT_VERSION,
                "token": self.token,
                "num_vectors": self.num_vectors,
                "clip_l_width": int(self.clip_l.shape[1]),
                "clip_g_width": int(self.clip_g.shape[1]),
                "has_lora": self.lora is not None,
                "lora_rank": self.lora_rank,
                "lora_alpha": self.lora_alpha,
                "target_modules": list(self.target_modules),
                "metadata": self.metadata,
            }
            (tmp / IDENTITY_JSON).write_text(json.dumps(info, indent=2, default=str))
            if directory.exists():
                shutil.rmtree(directory)
            os.replace(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Identity:
        """Reads an identity written by `save` (safetensors only, no pickle)."""
        directory = Path(directory)
        info_path = directory / IDENTITY_JSON
        if not info_path.is_file():
            raise IdentityError(f"{directory} is not an identity directory: no {IDENTITY_JSON}")
        info = json.loads(info_path.read_text())
        emb_path = directory / EMBEDDINGS_FILE
        if not emb_path.is_file():
            raise IdentityError(f"{directory} has no {EMBEDDINGS_FILE}")
        with safe_open(str(emb_path), framework="pt") as f:
            keys = set(f.keys())
            if keys != {"clip_l", "clip_g"}:
                raise IdentityError(
                    f"{emb_path} must hold exactly 'clip_l' and 'clip_g', found {sorted(keys)}"
                )
            clip_l, clip_g = f.get_tensor("clip_l"), f.get_tensor("clip_g")
        lora = None
        lora_path = directory / LORA_FILE
        if info.get("has_lora", lora_path.is_file()):
            if not lora_path.is_file():
                raise IdentityError(f"{directory} says it has a LoRA but {LORA_FILE} is missing")
            with safe_open(str(lora_path), framework="pt") as f:
                prefix = "unet."
                lora = {k[len(prefix) :]: f.get_tensor(k) for k in f if k.startswith(prefix)}
        return cls(
            token=info["token"],
            clip_l=clip_l,
            clip_g=clip_g,
            lora=lora,
            lora_rank=int(info.get("lora_rank", 4)),
            lora_alpha=float(info.get("lora_alpha", info.get("lora_rank", 4))),
            target_modules=list(info.get("target_modules", ["to_q", "to_k", "to_v", "to_out.0"])),
            metadata=info.get("metadata", {}),
        )

    def _lora_config(self) -> dict[str, Any]:
        return {
            "r": self.lora_rank,
            "lora_alpha": self.lora_alpha,
            "target_modules": list(self.target_modules),
            "init_lora_weights": "gaussian",
        }

    # --------------------------------------------------------------- pipelines

    def check_fits(self, pipe: StableDiffusionXLPipeline) -> None:
        """Raises `IdentityError` when the embedding widths do not match the pipeline's encoders."""
        for name, encoder in (("clip_l", pipe.text_encoder), ("clip_g", pipe.text_encoder_2)):
            width = encoder.get_input_embeddings().weight.shape[1]
            got = getattr(self, name).shape[1]
            if got != width:
                raise IdentityError(
                    f"identity {self.token!r} has {name} vectors of width {got}, but the "
                    f"pipeline's {'text_encoder' if name == 'clip_l' else 'text_encoder_2'} "
                    f"expects {width}: was it learned on another base model?"
                )

    def apply_to(
        self,
        pipe: StableDiffusionXLPipeline,
        *,
        scale: float = 1.0,
        adapter_name: str = DEFAULT_ADAPTER_NAME,
    ) -> None:
        """Adds the tokens to both text encoders and activates the LoRA, with the same documented
        diffusers calls a user without this library would make."""
        self.check_fits(pipe)
        for rows, tokenizer, encoder in (
            (self.clip_l, pipe.tokenizer, pipe.text_encoder),
            (self.clip_g, pipe.tokenizer_2, pipe.text_encoder_2),
        ):
            if self.token in tokenizer.get_vocab():
                raise IdentityError(
                    f"token {self.token!r} is already in the pipeline's tokenizer: remove the "
                    "identity that uses it first (Identity.remove_from)"
                )
            pipe.load_textual_inversion(
                rows.to(encoder.dtype), token=self.token, text_encoder=encoder, tokenizer=tokenizer
            )
        if self.lora is not None:
            pipe.load_lora_weights(self.diffusers_lora_state_dict(), adapter_name=adapter_name)
            pipe.set_adapters([adapter_name], adapter_weights=[scale])

    def remove_from(
        self, pipe: StableDiffusionXLPipeline, *, adapter_name: str = DEFAULT_ADAPTER_NAME
    ) -> None:
        """Undoes `apply_to`: the tokens leave both tokenizers and encoders, the LoRA is deleted."""
        for tokenizer, encoder in (
            (pipe.tokenizer, pipe.text_encoder),
            (pipe.tokenizer_2, pipe.text_encoder_2),
        ):
            if self.token in tokenizer.get_vocab():
                pipe.unload_textual_inversion(
                    self.tokens, tokenizer=tokenizer, text_encoder=encoder
                )
        if self.lora is not None and adapter_name in _adapter_names(pipe):
            pipe.delete_adapters(adapter_name)

    def diffusers_lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The LoRA keyed as in ``pytorch_lora_weights.safetensors`` (``unet.`` prefix)."""
        if self.lora is None:
            return {}
        return {f"unet.{k}": v for k, v in self.lora.items()}


def _adapter_names(pipe: StableDiffusionXLPipeline) -> set[str]:
    names: set[str] = set()
    for adapters in pipe.get_list_adapters().values():
        names.update(adapters)
    return names
