"""How `refine` trains on a shared pipeline without changing it: the pipeline patching.

- The new tokens go into *copies* of the tokenizers, and each text encoder's input embedding is
  wrapped for the duration by `_EmbeddingWithNewRows`, which looks up the base rows as before and
  substitutes the new rows (float32 master copies) at the new token ids: no other row can change,
  and no embedding matrix is resized.
- The LoRA is injected with `unet.add_adapter(LoraConfig(...))` under a private adapter name and
  removed afterwards (peft's wrapper layers included).
- Every base parameter is frozen during training; `requires_grad`, `train()`/`eval()`, gradient
  checkpointing and the active adapters are restored on exit, on error too (`trainable`).

The ids the new tokens get in the copied tokenizers are the ids `Identity.apply_to` gives them
later (diffusers' `load_textual_inversion` appends them the same way), so what is trained is what
is generated.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from consistent_char.errors import InvalidValueError
from consistent_char.identity import Identity, IdentityError
from consistent_char.refiners.ti_lora.settings import RefinerSettings

#: The peft adapter name the LoRA is trained under (removed after each refine).
TRAIN_ADAPTER = "consistent_char_refine"
#: How far the second and later vectors of a new multi-vector token start from the initializer
#: word's row, as a fraction of that row's norm (`_initial_rows`).
INIT_SPREAD = 0.1


class _EmbeddingWithNewRows(nn.Module):
    """The encoder's own token embedding, with trainable rows at the new token ids.

    The base matrix is used read-only, so no other row can change; ids at or beyond its size
    (the new tokens) are looked up as a placeholder row and replaced.
    """

    def __init__(self, base: nn.Embedding, token_ids: list[int], rows: nn.Parameter) -> None:
        super().__init__()
        self.base = base
        self.token_ids = token_ids
        self.rows = rows

    @property
    def weight(self) -> torch.Tensor:
        # transformers reads `get_input_embeddings().weight` for shapes and dtypes.
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids.clamp(max=self.base.num_embeddings - 1))
        for k, token_id in enumerate(self.token_ids):
            mask = (input_ids == token_id).unsqueeze(-1)
            out = torch.where(mask, self.rows[k].to(out.dtype), out)
        return out


@dataclass
class _TrainingState:
    """What `refine` trains while the pipeline is patched: the new rows of both encoders (behind
    the tokenizer copies that know the new tokens) and the LoRA's parameters."""

    token: str
    tokens: list[str]
    tokenizers: list[Any]
    wrappers: list[_EmbeddingWithNewRows]
    rows: list[nn.Parameter]
    train_rows: bool
    pipe: Any
    lora_params: list[nn.Parameter] = field(default_factory=list)
    train_lora: bool = False
    lora_rank: int = 4
    lora_alpha: float = 4.0
    target_modules: list[str] = field(default_factory=list)
    has_lora: bool = False
    #: How many times `refine` trained the warm-start identity before (0 for a new one).
    earlier_refines: int = 0

    @classmethod
    def build(
        cls,
        pipe: Any,
        identity: Identity | None,
        token: str,
        settings: RefinerSettings,
        embeddings: list[nn.Module],
        seed: int,
        *,
        train_rows: bool,
    ) -> _TrainingState:
        """Copies the tokenizers with the new tokens added and wraps each encoder's embedding
        with the identity's rows, or (a new identity) rows from `initializer_token`."""
        n = identity.num_vectors if identity is not None else settings.num_vectors
        names = token_names(token, n)
        tokenizers, wrappers, rows = [], [], []
        pairs = zip((pipe.tokenizer, pipe.tokenizer_2), embeddings, strict=True)
        for k, (tokenizer, emb) in enumerate(pairs):
            if not isinstance(emb, nn.Embedding):
                raise TypeError(
                    f"text encoder {k + 1}'s input embedding is a {type(emb).__name__}, "
                    "expected torch.nn.Embedding"
                )
            # A copy: the shared tokenizer must not learn the tokens.
            tok = copy.deepcopy(tokenizer)
            added = tok.add_tokens(names)
            if added != n:
                raise ValueError(f"could not add the tokens {names} to tokenizer {k + 1}")
            ids = tok.convert_tokens_to_ids(names)
            if identity is not None:
                init = (identity.clip_l, identity.clip_g)[k]
            else:
                init = _initial_rows(tokenizer, emb, settings.initializer_token, n, seed)
            param = nn.Parameter(
                init.detach().to(emb.weight.device, torch.float32).clone(),
                requires_grad=train_rows,
            )
            tokenizers.append(tok)
            rows.append(param)
            wrappers.append(_EmbeddingWithNewRows(emb, ids, param))
        return cls(
            token=token,
            tokens=names,
            tokenizers=tokenizers,
            wrappers=wrappers,
            rows=rows,
            train_rows=train_rows,
            pipe=pipe,
            earlier_refines=int(identity.metadata.get("refine_count", 0)) if identity else 0,
        )

    def add_lora(
        self,
        unet: Any,
        identity: Identity | None,
        settings: RefinerSettings,
        seed: int,
        *,
        train: bool,
    ) -> None:
        """Adds the LoRA (the identity's, or peft's no-op initialisation drawn from `seed`) to
        the UNet under `TRAIN_ADAPTER`, its weights float32 whatever the UNet's dtype."""
        from peft import LoraConfig, set_peft_model_state_dict

        warm = identity is not None and identity.lora is not None
        if warm:
            assert identity is not None and identity.lora is not None
            rank, alpha, targets = identity.lora_rank, identity.lora_alpha, identity.target_modules
        else:
            rank, alpha = settings.lora_rank, settings.lora_alpha_value
            targets = settings.target_modules
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha,  # type: ignore[arg-type]  # peft scales by alpha / r: a float works
            target_modules=list(targets),
            init_lora_weights=True,
        )
        # peft draws lora_A from the global RNG: seed it so a seed gives one initialisation.
        torch.manual_seed(seed)
        try:
            unet.add_adapter(config, adapter_name=TRAIN_ADAPTER)
        except ValueError as err:
            raise IdentityError(f"cannot add a LoRA on {list(targets)} to the UNet: {err}") from err
        params = [p for n, p in unet.named_parameters() if f".{TRAIN_ADAPTER}." in n]
        if not params:
            raise IdentityError(f"no UNet module matches the LoRA target_modules {list(targets)}")
        for p in params:
            # float32 master weights whatever the UNet's dtype.
            p.data = p.data.float()
        if warm:
            assert identity is not None and identity.lora is not None
            state = {k: v.to(torch.float32) for k, v in identity.lora.items()}
            result = set_peft_model_state_dict(unet, state, adapter_name=TRAIN_ADAPTER)
            unexpected = list(getattr(result, "unexpected_keys", []) or [])
            missing = [
                k for k in (getattr(result, "missing_keys", []) or []) if f".{TRAIN_ADAPTER}." in k
            ]
            if unexpected or missing:
                raise IdentityError(
                    f"identity {identity.token!r}'s LoRA does not match this UNet: "
                    f"{len(unexpected)} unexpected key(s) (e.g. {unexpected[:2]}), "
                    f"{len(missing)} missing (e.g. {missing[:2]})"
                )
        for p in params:
            p.requires_grad_(train)
        self.lora_params = params
        self.train_lora = train
        self.lora_rank, self.lora_alpha, self.target_modules = rank, float(alpha), list(targets)
        self.has_lora = True

    def optimizer(
        self,
        embedding_lr: float,
        lora_lr: float,
        weight_decay: float,
        mode: str,
        *,
        capturable: bool = False,
    ) -> torch.optim.Optimizer:
        """AdamW over what `mode` trains: the rows at `embedding_lr`, the LoRA at `lora_lr`."""
        groups: list[dict[str, Any]] = []
        if self.train_rows:
            groups.append({"params": list(self.rows), "lr": embedding_lr})
        if self.train_lora:
            groups.append({"params": list(self.lora_params), "lr": lora_lr})
        if not groups:
            raise ValueError(f"mode {mode!r} leaves nothing to train")
        # One fused kernel for all tensors on CUDA: a LoRA on every attention projection of
        # SDXL is over a thousand small tensors.
        fused = self.rows[0].device.type == "cuda"
        return torch.optim.AdamW(
            groups, weight_decay=weight_decay, fused=fused or None, capturable=capturable
        )

    @torch.no_grad()
    def row_caps(self, ratio: float) -> list[torch.Tensor]:
        """`ratio` times the mean norm of each encoder's own rows, kept on the device (a
        read-back at every step would wait for the device)."""
        return [ratio * w.base.weight.float().norm(dim=-1).mean() for w in self.wrappers]

    @torch.no_grad()
    def cap_rows(self, caps: list[torch.Tensor]) -> None:
        """Scales each new row whose norm exceeds its encoder's cap down to the cap."""
        for cap, rows in zip(caps, self.rows, strict=True):
            norms = rows.norm(dim=-1, keepdim=True).clamp(min=1e-12)
            rows.mul_(torch.clamp(cap / norms, max=1.0))

    def tokenize(
        self, captions: list[str], *, with_token: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids of `captions` for both encoders; each must keep the identity's token
        (unless `with_token` is False: prior captions hold none)."""
        device = self.rows[0].device
        out = []
        for k, tok in enumerate(self.tokenizers):
            # The pipeline's own multi-vector expansion ("<t>" -> "<t> <t>_1 ...").
            expanded = [self.pipe.maybe_convert_prompt(c, tok) for c in captions]
            ids = tok(
                expanded,
                padding="max_length",
                max_length=tok.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            first = self.wrappers[k].token_ids[0]
            lost = [j for j in range(len(captions)) if not bool((ids[j] == first).any())]
            if lost and with_token:
                raise ValueError(
                    f"captions {lost} lose the token {self.token!r} to truncation at "
                    f"{tok.model_max_length} tokens: shorten them"
                )
            out.append(ids.to(device))
        return out[0], out[1]

    def encode(self, ids_1: torch.Tensor, ids_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL's prompt encoding: both encoders' penultimate hidden states, encoder 2's pooled."""
        pipe = self.pipe
        out_1 = pipe.text_encoder(ids_1, output_hidden_states=True)
        out_2 = pipe.text_encoder_2(ids_2, output_hidden_states=True)
        pooled = out_2[0]
        prompt_embeds = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
        return prompt_embeds, pooled

    def identity(self, metadata: dict[str, Any]) -> Identity:
        """The trained identity as detached CPU float32 copies (the pipeline's go on changing)."""
        lora = None
        if self.has_lora:
            from peft import get_peft_model_state_dict

            lora = {
                k: v.detach().to("cpu", torch.float32).clone()
                for k, v in get_peft_model_state_dict(
                    self.pipe.unet, adapter_name=TRAIN_ADAPTER
                ).items()
            }
        return Identity(
            token=self.token,
            clip_l=self.rows[0].detach().to("cpu", torch.float32).clone(),
            clip_g=self.rows[1].detach().to("cpu", torch.float32).clone(),
            lora=lora,
            lora_rank=self.lora_rank,
            lora_alpha=self.lora_alpha,
            target_modules=self.target_modules,
            metadata=metadata,
        )


@contextlib.contextmanager
def trainable(
    pipe: Any, settings: RefinerSettings, identity: Identity | None, token: str, seed: int
) -> Iterator[_TrainingState]:
    """Installs the trainable rows and LoRA on `pipe` and restores it on exit."""
    modules: dict[str, nn.Module] = {
        "unet": pipe.unet,
        "vae": pipe.vae,
        "text_encoder": pipe.text_encoder,
        "text_encoder_2": pipe.text_encoder_2,
    }
    requires_grad = {name: [p.requires_grad for p in m.parameters()] for name, m in modules.items()}
    training = {name: [s.training for s in m.modules()] for name, m in modules.items()}
    encoders = (pipe.text_encoder, pipe.text_encoder_2)
    embeddings = [enc.get_input_embeddings() for enc in encoders]
    checkpointing = bool(getattr(pipe.unet, "is_gradient_checkpointing", False))
    had_adapters = bool(getattr(pipe.unet, "peft_config", None))
    active = list(pipe.unet.active_adapters()) if had_adapters else []
    added_adapter = False
    try:
        for m in modules.values():
            m.requires_grad_(False)
            m.eval()
        state = _TrainingState.build(
            pipe, identity, token, settings, embeddings, seed, train_rows=settings.mode != "lora"
        )
        for enc, emb, wrapper in zip(encoders, embeddings, state.wrappers, strict=True):
            enc.set_input_embeddings(wrapper)
            del emb
        use_lora = settings.mode != "ti" or (identity is not None and identity.lora is not None)
        if use_lora:
            added_adapter = True
            state.add_lora(pipe.unet, identity, settings, seed, train=settings.mode != "ti")
            pipe.unet.train()
        if settings.gradient_checkpointing and not checkpointing:
            pipe.unet.enable_gradient_checkpointing()
        yield state
    finally:
        # Restore in reverse order; each step is safe if the matching install never ran.
        if settings.gradient_checkpointing and not checkpointing:
            pipe.unet.disable_gradient_checkpointing()
        if added_adapter:
            _remove_adapter(pipe.unet, TRAIN_ADAPTER, active)
        for enc, emb in zip(encoders, embeddings, strict=True):
            enc.set_input_embeddings(emb)
        for name, m in modules.items():
            for p, flag in zip(m.parameters(), requires_grad[name], strict=True):
                p.requires_grad_(flag)
            for s, flag in zip(m.modules(), training[name], strict=True):
                s.training = flag


def check_tokens_free(pipe: Any, names: Sequence[str]) -> None:
    """None of `names` may be a token (or a word) of the pipeline's tokenizers already."""
    for tokenizer in (pipe.tokenizer, pipe.tokenizer_2):
        vocab = tokenizer.get_vocab()
        # "cat</w>" is the word "cat": a token spelled like a word would hijack it.
        taken = [t for t in names if t in vocab or f"{t}</w>" in vocab]
        if taken:
            raise InvalidValueError(
                f"token(s) {taken} are already in the pipeline's tokenizer; choose another "
                "token (e.g. '<my-char>') or remove the identity that added them "
                "(Identity.remove_from)"
            )


def check_target_modules(unet: nn.Module, targets: Sequence[str]) -> None:
    """Every name in `targets` must name (as peft matches it: the whole module path or its end
    after a ".") at least one layer of `unet` that a LoRA can wrap."""
    wrappable = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)
    layers = [name for name, m in unet.named_modules() if isinstance(m, wrappable)]
    for target in targets:
        if not any(name == target or name.endswith("." + target) for name in layers):
            ends = []
            for name in layers:
                parts = name.split(".")
                end = ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]
                if end not in ends:
                    ends.append(end)
            raise InvalidValueError(
                f"refiner.target_modules names {target!r}, but no layer of the UNet that a LoRA "
                f"can wrap is called that; its layers end in {', '.join(ends[:10])}, ..."
            )


def token_names(token: str, n: int) -> list[str]:
    """diffusers' names of a multi-vector token's rows: ``token``, ``token_1``, ..."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def _initial_rows(
    tokenizer: Any, embedding: nn.Embedding, word: str, n: int, seed: int = 0
) -> torch.Tensor:
    """`n` float32 starting rows of a new token: the embedding of `word` (the mean of its
    sub-word tokens' rows) first, then for each further vector that row moved in a random
    direction, drawn from `seed`, by `INIT_SPREAD` times its norm."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"initializer_token {word!r} tokenizes to nothing")
    rows = embedding.weight.detach()[torch.tensor(ids, device=embedding.weight.device)]
    row = rows.float().mean(dim=0, keepdim=True)
    if n == 1:
        return row
    # n copies of one row would start the token as the word said n times, each vector moved
    # apart only by what its position feeds back. A small offset lets each start as a variant
    # of the word of its own. (The word's sub-word rows would not do: most initializer words
    # are one token.) Drawn on the CPU, so a seed gives the same rows on every device.
    directions = torch.randn(n - 1, row.shape[-1], generator=torch.Generator().manual_seed(seed))
    directions = directions / directions.norm(dim=-1, keepdim=True)
    offsets = INIT_SPREAD * row.norm() * directions.to(row.device)
    return torch.cat([row, row + offsets])


def _remove_adapter(unet: Any, name: str, previously_active: list[str]) -> None:
    """Removes adapter `name` from `unet` and makes `previously_active` active again."""
    if name in (getattr(unet, "peft_config", None) or {}):
        unet.delete_adapters(name)
    if getattr(unet, "peft_config", None):
        if previously_active:
            unet.set_adapter(previously_active)
    else:
        # delete_adapters leaves peft's wrappers (`to_q.base_layer`); unwrap to the original
        # modules.
        unet.unload_lora()
