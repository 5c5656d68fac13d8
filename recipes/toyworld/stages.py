"""The four stages: what each model learns from and its loss.

1. ``vae``: the AutoencoderKL, on reconstruction (MSE + L1) and a small KL term (on crops on a
   CPU: it is fully convolutional). Its latent scaling factor is set to ``1 / std(latents)``.
2. ``unet``: both text encoders and the UNet jointly, on latents encoded once: epsilon prediction
   with min-SNR weighting, SDXL's added conditioning (size/crop time ids + the pooled projection
   of ``text_encoder_2``), captions from the grammar naming random attribute subsets, 10% of
   captions dropped by zeroing both embeddings (what ``force_zeros_for_empty_prompt`` assumes),
   and an EMA of the weights, which is what ships.
3. ``dino``: the DINOv2, without identity labels: SimCLR on its CLS embedding, where the two
   views of a creature are two renders of it in independently drawn contexts (scene, position,
   size) plus pixel augmentations (affine, brightness, blur, noise, VAE round trip), so that
   identity, not context, dominates the embedding.
4. ``probe``: the identity probe, with ground-truth labels, on augmented renders.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from consistent_char.toy.models import (
    VALID,
    IdentityProbe,
    build_dinov2,
    build_scheduler,
    build_text_encoders,
    build_tokenizers,
    build_unet,
    build_vae,
    dinov2_pixels,
    word_token_table,
    words_to_ids,
)
from consistent_char.toy.world import ATTRIBUTES
from recipes.toyworld.augment import augment, to01, with_round_trip
from recipes.toyworld.checkpoint import Checkpoint, stage_done
from recipes.toyworld.log import log
from recipes.toyworld.loop import LossFn, autocast, randint, seed_of
from recipes.toyworld.trainer import Trainer

# ----------------------------------------------------------------------------- 1. VAE


def train_vae(trainer: Trainer) -> None:
    """Trains (or loads) the VAE and sets its latent scaling factor."""
    torch.manual_seed(seed_of(trainer.seed, 10))
    vae = build_vae(trainer.plan.model).to(trainer.device)
    if trainer.channels_last:
        vae = vae.to(memory_format=torch.channels_last)
    checkpoint = Checkpoint(trainer.ckpt_dir, "vae")
    images = None if stage_done(trainer.ckpt_dir, "vae") else trainer.images()
    trained = trainer.train_stage(
        "vae", modules={"vae": vae}, loss_fn=_vae_loss(trainer, vae, images), checkpoint=checkpoint
    )
    trainer.vae = trained["vae"].eval()
    for p in trainer.vae.parameters():
        p.requires_grad_(False)
    exported = (checkpoint.state() or {}).get("scaling_factor")
    if exported is not None:
        # A VAE taken as finished from an export keeps the scaling that the exported UNet
        # was trained with: one computed on this run's images would differ slightly.
        trainer.scaling_factor = float(exported)
        log("vae", f"scaling_factor {trainer.scaling_factor:.4f} (from the export)")
        return
    # Latents of unit variance, as SDXL's 0.13025 does for its VAE.
    sample = trainer.images()[: min(4096, trainer.images().shape[0])]
    latents = encode_latents(trainer, sample, scaled=False)
    trainer.scaling_factor = float(1.0 / latents.float().std())
    log(
        "vae",
        f"latent std {latents.float().std():.4f} → scaling_factor {trainer.scaling_factor:.4f}",
    )


def _vae_loss(trainer: Trainer, vae: Any, images: torch.Tensor | None) -> LossFn:
    """MSE + 0.5·L1 + a small KL term on (cropped) images of the world-prior set."""
    plan, device = trainer.plan, trainer.device
    crop = plan.vae_crop

    def loss_fn(step: int, rng: np.random.Generator, gen: torch.Generator) -> torch.Tensor:
        assert images is not None
        idx = randint(images.shape[0], plan.vae.batch, gen)
        x = to01(images[idx]) * 2 - 1
        if crop is not None and crop < x.shape[-1]:
            oy, ox = (int(v) for v in rng.integers(0, x.shape[-1] - crop + 1, 2))
            x = x[:, :, oy : oy + crop, ox : ox + crop]
        with autocast(device, trainer.bf16):
            posterior = vae.encode(x).latent_dist
            mean, logvar = posterior.mean.float(), posterior.logvar.float()
            z = mean + torch.exp(0.5 * logvar) * torch.randn(
                mean.shape, generator=gen, device=device
            )
            recon = vae.decode(z).sample.float()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        err = recon - x
        return err.pow(2).mean() + 0.5 * err.abs().mean() + plan.vae_kl_weight * kl

    return loss_fn


def load_vae(trainer: Trainer) -> None:
    """Loads the finished VAE, which every later stage needs."""
    if trainer.vae is None:
        state = Checkpoint(trainer.ckpt_dir, "vae").state()
        if state is None or not state.get("done"):
            raise RuntimeError("the vae stage is not finished: run --stage vae first")
        train_vae(trainer)


@torch.no_grad()
def encode_latents(
    trainer: Trainer, images_uint8: torch.Tensor, *, scaled: bool = True, batch: int = 1024
) -> torch.Tensor:
    """Posterior means of the VAE (× the scaling factor), float32, on the device."""
    device = trainer.device
    out = []
    for start in range(0, images_uint8.shape[0], batch):
        x = to01(images_uint8[start : start + batch].to(device)) * 2 - 1
        # The training targets: in bf16 only where that is the price of speed (CUDA).
        with autocast(device, trainer.bf16 and device.type == "cuda"):
            out.append(trainer.vae.encode(x).latent_dist.mode().float())
    latents = torch.cat(out)
    if scaled:
        assert trainer.scaling_factor is not None
        latents = latents * trainer.scaling_factor
    return latents


# ----------------------------------------------------------------------------- 2. UNet


def train_unet(trainer: Trainer) -> None:
    """Trains (or loads) both text encoders and the UNet; their EMA copies are what ships."""
    plan, device = trainer.plan, trainer.device
    load_vae(trainer)
    tokenizer, tokenizer_2 = build_tokenizers(trainer.ckpt_dir / "tokenizers")
    torch.manual_seed(seed_of(trainer.seed, 20))
    text_encoder, text_encoder_2 = build_text_encoders(tokenizer, tokenizer_2, plan.model)
    unet = build_unet(plan.model)
    text_encoder, text_encoder_2, unet = (
        m.to(device) for m in (text_encoder, text_encoder_2, unet)
    )
    if trainer.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    checkpoint = Checkpoint(trainer.ckpt_dir, "unet")
    modules = {"text_encoder": text_encoder, "text_encoder_2": text_encoder_2, "unet": unet}
    trained = trainer.train_stage(
        "unet",
        modules=modules,
        loss_fn=_unet_loss(trainer, modules, (tokenizer, tokenizer_2), checkpoint),
        checkpoint=checkpoint,
        ema_modules=("text_encoder", "text_encoder_2", "unet"),
        ema_decay=plan.ema_decay,
    )
    trainer.unet_parts = {**trained, "tokenizer": tokenizer, "tokenizer_2": tokenizer_2}


def _unet_training_set(
    trainer: Trainer, checkpoint: Checkpoint
) -> tuple[torch.Tensor, torch.Tensor]:
    """The world-prior set's latents and captions (word indices); empty once the stage is done."""
    state = checkpoint.state()
    if state is not None and state.get("done"):
        return torch.zeros(0), torch.zeros(0)
    t = time.perf_counter()
    latents = encode_latents(trainer, trainer.images())
    log(
        "unet",
        f"encoded {latents.shape[0]} latents {tuple(latents.shape[1:])} "
        f"in {time.perf_counter() - t:.1f}s",
    )
    return latents, torch.from_numpy(trainer.data().captions).to(trainer.device)


def _unet_loss(
    trainer: Trainer, modules: dict[str, Any], tokenizers: tuple[Any, Any], checkpoint: Checkpoint
) -> LossFn:
    """Min-SNR-weighted epsilon prediction on random captions, some dropped or empty."""
    plan, device = trainer.plan, trainer.device
    latents, captions = _unet_training_set(trainer, checkpoint)
    tables = [word_token_table(tok).to(device) for tok in tokenizers]
    specials = [(tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) for tok in tokenizers]
    alphas = build_scheduler().alphas_cumprod.to(device=device, dtype=torch.float32)
    res = plan.model.image_size
    time_ids = torch.tensor([res, res, 0, 0, res, res], device=device, dtype=torch.float32)

    def loss_fn(step: int, rng: np.random.Generator, gen: torch.Generator) -> torch.Tensor:
        b = plan.unet.batch
        idx = randint(latents.shape[0], b, gen)
        which = randint(captions.shape[1], b, gen)
        words = captions[idx, which].long()
        u = torch.rand(b, generator=gen, device=device)
        words = torch.where((u < plan.caption_empty)[:, None], 0, words)
        keep = (u >= plan.caption_drop + plan.caption_empty) | (u < plan.caption_empty)
        ids = [words_to_ids(words, table, *sp) for table, sp in zip(tables, specials, strict=True)]
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen, device=device)
        t = torch.randint(0, alphas.shape[0], (b,), generator=gen, device=device)
        ab = alphas[t].view(b, 1, 1, 1)
        noisy = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        with autocast(device, trainer.bf16):
            prompt_embeds, pooled = encode_prompt_ids(
                modules["text_encoder"], modules["text_encoder_2"], ids[0], ids[1]
            )
            k = keep.to(prompt_embeds.dtype)
            prompt_embeds = prompt_embeds * k[:, None, None]
            pooled = pooled * k[:, None]
            pred = modules["unet"](
                noisy,
                t,
                encoder_hidden_states=prompt_embeds,
                added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.expand(b, 6)},
            ).sample
        per_sample = (pred.float() - noise).pow(2).mean(dim=(1, 2, 3))
        snr = (ab / (1 - ab)).view(b)
        weight = snr.clamp(max=plan.min_snr_gamma) / snr
        return (weight * per_sample).mean()

    return loss_fn


def encode_prompt_ids(
    text_encoder: Any, text_encoder_2: Any, ids: torch.Tensor, ids_2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``StableDiffusionXLPipeline.encode_prompt`` computes: both encoders' penultimate
    hidden states, concatenated, and ``text_encoder_2``'s pooled projection."""
    h1 = text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    out2 = text_encoder_2(ids_2, output_hidden_states=True)
    return torch.cat([h1, out2.hidden_states[-2]], dim=-1), out2.text_embeds


# ----------------------------------------------------------------------------- 3. DINOv2


def train_dino(trainer: Trainer) -> None:
    """Trains (or loads) the DINOv2 with SimCLR on pairs of one creature in two contexts."""
    plan, device = trainer.plan, trainer.device
    load_vae(trainer)
    torch.manual_seed(seed_of(trainer.seed, 30))
    model = build_dinov2(image_size=plan.model.image_size).to(device)
    images = (
        None
        if stage_done(trainer.ckpt_dir, "dino")
        else torch.from_numpy(trainer.uniform().images).to(device)
    )

    def loss_fn(step: int, rng: np.random.Generator, gen: torch.Generator) -> torch.Tensor:
        assert images is not None
        b = plan.dino.batch
        pairs = randint(images.shape[0] // 2, b, gen)
        views = []
        for j in (0, 1):
            x = to01(images[2 * pairs + j])
            x = with_round_trip(trainer.vae, x, plan.recon_fraction, device, trainer.bf16)
            views.append(augment(x, gen))
        with autocast(device, trainer.bf16):
            z = model(pixel_values=dinov2_pixels(torch.cat(views))).pooler_output.float()
        return nt_xent(z, plan.dino_temperature)

    trained = trainer.train_stage(
        "dino",
        modules={"dino": model},
        loss_fn=loss_fn,
        checkpoint=Checkpoint(trainer.ckpt_dir, "dino"),
    )
    trainer.dino = trained["dino"].eval()


def nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss: row ``i`` of the first half and row ``i`` of the second are positives."""
    n = z.shape[0] // 2
    z = F.normalize(z, dim=-1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    target = torch.arange(2 * n, device=z.device).roll(n)
    return F.cross_entropy(sim, target)


# ----------------------------------------------------------------------------- 4. probe


def train_probe(trainer: Trainer) -> None:
    """Trains (or loads) the identity probe on labelled, augmented renders, valid and not."""
    plan, device = trainer.plan, trainer.device
    load_vae(trainer)
    torch.manual_seed(seed_of(trainer.seed, 40))
    probe = IdentityProbe().to(device)
    checkpoint = Checkpoint(trainer.ckpt_dir, "probe")
    state = checkpoint.state()
    images = labels = valid = torch.zeros(0)
    if state is None or not state.get("done"):
        probe_set = trainer.probe_set()
        images = torch.from_numpy(probe_set.images).to(device)
        labels = torch.from_numpy(probe_set.labels).to(device)
        valid = torch.from_numpy(probe_set.valid).to(device)

    def loss_fn(step: int, rng: np.random.Generator, gen: torch.Generator) -> torch.Tensor:
        idx = randint(images.shape[0], plan.probe.batch, gen)
        x = with_round_trip(
            trainer.vae, to01(images[idx]), plan.recon_fraction, device, trainer.bf16
        )
        x = augment(x, gen, max_shift=0.06, scale=(0.93, 1.07))
        with autocast(device, trainer.bf16):
            logits = probe(x * 2 - 1)
        target, ok = labels[idx], valid[idx]
        # Attributes are learned from valid images only: a blend or a blur has none.
        w = ok.float() / ok.float().sum().clamp(min=1.0)
        loss = F.binary_cross_entropy_with_logits(logits[VALID].float(), ok.float())
        for k, a in enumerate(ATTRIBUTES):
            ce = F.cross_entropy(logits[a].float(), target[:, k], reduction="none")
            loss = loss + (w * ce).sum()
        return loss

    trained = trainer.train_stage(
        "probe", modules={"probe": probe}, loss_fn=loss_fn, checkpoint=checkpoint
    )
    trainer.probe = trained["probe"].eval()


#: Each stage's training, by name (`recipes.toyworld.plan.STAGES`).
TRAIN_STAGE: dict[str, Callable[[Trainer], None]] = {
    "vae": train_vae,
    "unet": train_unet,
    "dino": train_dino,
    "probe": train_probe,
}
