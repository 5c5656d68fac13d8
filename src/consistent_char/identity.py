"""`Identity`: what the loop learns (Θ = new token embeddings τ + LoRA weights θ), and its files.

The on-disk format is plain diffusers, so a user needs nothing from this library to use it::

    identity/
      identity.json                     # token, prompt, base model, LoRA settings, history
      pytorch_lora_weights.safetensors  # pipe.load_lora_weights(dir)
      embeddings.safetensors            # {"clip_l": (n, 768), "clip_g": (n, 1280)}

Only safetensors is read or written; the files' names and checks are in `identity_format`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from consistent_char.identity_format import (
    EMBEDDINGS_FILE,
    FORMAT_VERSION,
    IDENTITY_FILES,
    IDENTITY_JSON,
    LORA_FILE,
    IdentityError,
    check_lora,
    check_save_target,
    read_info,
    read_tensors,
    swap_into_place,
)
from consistent_char.rundir import TEMP_SUFFIX, follow_umask

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLPipeline

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_ADAPTER_NAME",
    "EMBEDDINGS_FILE",
    "FORMAT_VERSION",
    "IDENTITY_FILES",
    "IDENTITY_JSON",
    "LORA_FILE",
    "Identity",
    "IdentityError",
    "default_adapter_name",
]

DEFAULT_ADAPTER_NAME = "consistent_char"


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
        tensors = {"clip_l": self.clip_l, "clip_g": self.clip_g, **(self.lora or {})}
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                kind = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
                raise IdentityError(
                    f"{name} holds {kind} values; an identity's vectors and LoRA weights are "
                    "floating-point tensors"
                )
            if not bool(torch.isfinite(t).all()):
                raise IdentityError(f"{name} holds NaN or infinite values")
        if isinstance(self.target_modules, str) or not all(
            isinstance(m, str) and m for m in self.target_modules
        ):
            raise IdentityError(
                f"target_modules must be a list of module names, e.g. ['to_q'], got "
                f"{self.target_modules!r}"
            )
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int):
            raise IdentityError(f"lora_rank must be an int >= 1, got {self.lora_rank!r}")
        if self.lora_rank < 1:
            raise IdentityError(f"lora_rank must be an int >= 1, got {self.lora_rank!r}")
        alpha = self.lora_alpha
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, (int, float))
            or not 0 < alpha < math.inf
        ):
            raise IdentityError(f"lora_alpha must be a finite number > 0, got {alpha!r}")

    @property
    def num_vectors(self) -> int:
        return int(self.clip_l.shape[0])

    @property
    def tokens(self) -> list[str]:
        """All tokens the identity adds to each tokenizer (diffusers' multi-vector names)."""
        return [self.token] + [f"{self.token}_{i}" for i in range(1, self.num_vectors)]

    @property
    def adapter_name(self) -> str:
        """The default LoRA adapter name in a pipeline: ``cc_`` + the token's letters and digits
        (``"<cc-fox>"`` → ``"cc_cc_fox"``)."""
        return default_adapter_name(self.token)

    # ------------------------------------------------------------------ files

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Writes the identity to `directory` atomically and returns `directory`.

        The files are written to a temporary folder beside `directory` and renamed into place,
        so a reader sees the old identity or the new one, never a mix. `directory` may be new,
        an empty folder, or an identity folder (it has ``identity.json``): an identity's files
        are replaced, and any other file in it (e.g. ``samples/``) is kept.

        Raises:
            OutputExistsError: `directory` is a file, or a folder that holds files and is not an
                identity: nothing there is changed.
            OutputNotWritableError: `directory` cannot be created (below a file, not writable).

        Example:
            >>> identity.save("runs/demo/my-identity")  # doctest: +SKIP
            PosixPath('runs/demo/my-identity')
        """
        directory = Path(directory)
        check_save_target(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(
            tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=TEMP_SUFFIX, dir=directory.parent)
        )
        try:
            follow_umask(tmp, directory=True)
            self._write_files(tmp)
            for path in tmp.iterdir():
                follow_umask(path)  # diffusers writes the LoRA file 0600 whatever the umask
            swap_into_place(tmp, directory)
        except BaseException:
            if tmp.is_dir():
                for name in IDENTITY_FILES:
                    (tmp / name).unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    tmp.rmdir()
            raise
        return directory

    def _write_files(self, folder: Path) -> None:
        from diffusers import StableDiffusionXLPipeline

        save_file(
            {
                "clip_l": self.clip_l.detach().float().cpu().contiguous(),
                "clip_g": self.clip_g.detach().float().cpu().contiguous(),
            },
            str(folder / EMBEDDINGS_FILE),
        )
        if self.lora is not None:
            # diffusers' own writer, so the file is exactly what load_lora_weights expects,
            # with the LoRA config stored as metadata (rank, alpha, targets).
            StableDiffusionXLPipeline.save_lora_weights(
                str(folder),
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
        (folder / IDENTITY_JSON).write_text(json.dumps(info, indent=2, default=str))

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Identity:
        """Reads an identity written by `save` (safetensors only, no pickle) and checks it.

        Vectors and LoRA weights stored as float16, bfloat16 or float64 are converted to
        float32 with a logged warning; integer values, NaN or infinity, missing or extra keys,
        and an ``identity.json`` that does not describe the files are refused.

        Raises:
            IdentityError: The folder is not an identity, or a file of it is damaged.

        Example:
            >>> identity = Identity.load("runs/demo/identity")  # doctest: +SKIP
        """
        directory = Path(directory)
        info = read_info(directory)
        emb_path = directory / EMBEDDINGS_FILE
        if not emb_path.is_file():
            raise IdentityError(f"{directory} has no {EMBEDDINGS_FILE}: the identity is incomplete")
        embeddings = read_tensors(emb_path, keys={"clip_l", "clip_g"})
        clip_l, clip_g = embeddings["clip_l"], embeddings["clip_g"]
        for name, width_key, t in (
            ("clip_l", "clip_l_width", clip_l),
            ("clip_g", "clip_g_width", clip_g),
        ):
            rows, width = info.get("num_vectors"), info.get(width_key)
            if t.ndim != 2 or rows not in (None, t.shape[0]) or width not in (None, t.shape[1]):
                raise IdentityError(
                    f"{emb_path}'s {name} has shape {tuple(t.shape)}, but {IDENTITY_JSON} says "
                    f"({rows}, {width}): the identity is damaged"
                )
        lora = None
        lora_path = directory / LORA_FILE
        if info["has_lora"]:
            if not lora_path.is_file():
                raise IdentityError(f"{directory} says it has a LoRA but {LORA_FILE} is missing")
            prefix = "unet."
            lora = {
                k[len(prefix) :]: v
                for k, v in read_tensors(lora_path).items()
                if k.startswith(prefix)
            }
            check_lora(lora, info["lora_rank"], lora_path)
        try:
            return cls(
                token=info["token"],
                clip_l=clip_l,
                clip_g=clip_g,
                lora=lora,
                lora_rank=info["lora_rank"],
                lora_alpha=info["lora_alpha"],
                target_modules=info["target_modules"],
                metadata=info["metadata"],
            )
        except IdentityError as err:
            raise IdentityError(f"{directory}: {err}") from None

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
        adapter_name: str | None = None,
    ) -> None:
        """Adds the tokens to both text encoders and activates the LoRA, with the same documented
        diffusers calls a user without this library would make.

        Either everything is applied or, if a step fails, nothing is left behind. Identities with
        distinct tokens can be applied to one pipeline together: each LoRA is its own adapter,
        and all applied ones stay active.

        Args:
            pipe: Any SDXL-architecture pipeline.
            scale: The LoRA's weight (1 is as trained).
            adapter_name: The LoRA's adapter name; ``None`` is `adapter_name`, derived from the
                token, so two identities never collide.

        Raises:
            IdentityError: The widths do not fit the pipeline, or a token is already in use.
        """
        adapter_name = adapter_name or self.adapter_name
        self.check_fits(pipe)
        for tokenizer in (pipe.tokenizer, pipe.tokenizer_2):
            vocab = tokenizer.get_vocab()
            # "cat</w>" is the word "cat": a token spelled like a word would hijack it.
            taken = [t for t in self.tokens if t in vocab or f"{t}</w>" in vocab]
            if taken:
                raise IdentityError(
                    f"token(s) {taken} already in the pipeline's tokenizer (as a token or a "
                    "word): remove the identity that uses them first (Identity.remove_from), or "
                    "give the identity a new token"
                )
        if self.lora is not None and adapter_name in _adapter_names(pipe):
            raise IdentityError(
                f"the pipeline already has a LoRA adapter named {adapter_name!r}: remove it "
                "first or pass another adapter_name"
            )
        try:
            # transformers samples the new embedding rows and peft the new LoRA layers from the
            # global RNG before the identity's values overwrite them: that must not move the
            # caller's RNG (a seeded loop around generation would drift).
            with _keep_global_rng(pipe):
                self._apply(pipe, scale, adapter_name)
        except BaseException:
            self.remove_from(pipe, adapter_name=adapter_name)
            raise

    def _apply(self, pipe: StableDiffusionXLPipeline, scale: float, adapter_name: str) -> None:
        for rows, tokenizer, encoder in (
            (self.clip_l, pipe.tokenizer, pipe.text_encoder),
            (self.clip_g, pipe.tokenizer_2, pipe.text_encoder_2),
        ):
            pipe.load_textual_inversion(
                rows.to(encoder.dtype), token=self.token, text_encoder=encoder, tokenizer=tokenizer
            )
        if self.lora is not None:
            # Loading a LoRA makes it the only active adapter: note the others first.
            previous = _active_adapter_scales(pipe)
            # peft freezes every parameter of the model it injects into; a pipeline being
            # fine-tuned by its user must get its trainable flags back.
            trainable = {n: p.requires_grad for n, p in pipe.unet.named_parameters()}
            # Not load_lora_weights(dict): from an in-memory dict diffusers infers the config
            # from the shapes and silently takes lora_alpha = r. The metadata carries alpha,
            # exactly as the "lora_adapter_metadata" header of the saved file does for
            # load_lora_weights(dir).
            pipe.load_lora_into_unet(
                self.diffusers_lora_state_dict(),
                network_alphas=None,
                unet=pipe.unet,
                adapter_name=adapter_name,
                _pipeline=pipe,
                metadata={f"unet.{k}": v for k, v in self._lora_config().items()},
            )
            _activate_adapter(pipe, adapter_name, scale, previous)
            for name, param in pipe.unet.named_parameters():
                flag = trainable.get(name.replace(".base_layer", ""))
                if flag is not None and "lora_" not in name:
                    param.requires_grad_(flag)

    def remove_from(
        self, pipe: StableDiffusionXLPipeline, *, adapter_name: str | None = None
    ) -> None:
        """Undoes `apply_to`: the tokens leave both tokenizers and encoders, the LoRA is deleted.

        Other identities applied to the pipeline stay as they are.
        """
        adapter_name = adapter_name or self.adapter_name
        with _keep_global_rng(pipe):
            for tokenizer, encoder in (
                (pipe.tokenizer, pipe.text_encoder),
                (pipe.tokenizer_2, pipe.text_encoder_2),
            ):
                if self.token in tokenizer.get_vocab():
                    # diffusers rebuilds the embedding as a fresh nn.Embedding: keep the flag.
                    trainable = encoder.get_input_embeddings().weight.requires_grad
                    pipe.unload_textual_inversion(
                        self.tokens, tokenizer=tokenizer, text_encoder=encoder
                    )
                    encoder.get_input_embeddings().weight.requires_grad_(trainable)
            if self.lora is not None and adapter_name in _adapter_names(pipe):
                pipe.delete_adapters(adapter_name)
            # delete_adapters leaves peft's wrapper layers in place (`to_q.base_layer`); with no
            # adapter left, unwrap them so the UNet is the plain module it was before apply_to.
            if not getattr(pipe.unet, "peft_config", None) and _has_peft_layers(pipe.unet):
                pipe.unet.unload_lora()

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


def _has_peft_layers(module: torch.nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


@contextlib.contextmanager
def _keep_global_rng(pipe: StableDiffusionXLPipeline) -> Iterator[None]:
    devices = [d for d in {pipe.unet.device, pipe.text_encoder.device} if d.type == "cuda"]
    with torch.random.fork_rng(devices=devices):
        yield


# ------------------------------------------------------------------ several identities, one pipe


def default_adapter_name(token: str) -> str:
    """The adapter name `Identity.apply_to` uses for `token`: peft names must be identifiers."""
    return "cc_" + ("_".join(re.findall(r"[0-9A-Za-z]+", token)) or "identity")


def _active_adapter_scales(
    pipe: StableDiffusionXLPipeline,
) -> list[tuple[str, list[tuple[Any, float]]]]:
    """The active adapters, each with its current scale in every UNet layer it wraps."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    sdxl: Any = pipe  # diffusers registers components and mixins at run time
    layers: list[Any] = [m for m in sdxl.unet.modules() if isinstance(m, BaseTunerLayer)]
    return [
        (name, [(m, m.scaling[name]) for m in layers if name in getattr(m, "scaling", {})])
        for name in sdxl.get_active_adapters()
    ]


def _activate_adapter(
    pipe: StableDiffusionXLPipeline,
    adapter_name: str,
    scale: float,
    previous: list[tuple[str, list[tuple[Any, float]]]],
) -> None:
    """Activates `adapter_name` at `scale` together with the `previous` active adapters.

    diffusers' `set_adapters` resets the scale of every adapter it is given, so the previous
    adapters' own per-layer scales (a user's per-block weights included) are put back after it.
    """
    sdxl: Any = pipe
    others = [(name, scales) for name, scales in previous if name != adapter_name]
    sdxl.set_adapters(
        [name for name, _ in others] + [adapter_name],
        adapter_weights=[1.0] * len(others) + [scale],
    )
    for name, scales in others:
        for module, value in scales:
            module.scaling[name] = value
