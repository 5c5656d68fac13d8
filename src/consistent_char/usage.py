"""Using a learned identity after the run: prompts with its token, and a generator for it."""

from __future__ import annotations

from typing import Any

from consistent_char.config import ExtractorConfig, GeneratorConfig
from consistent_char.identity import Identity


def prompt_with_identity(identity: Identity, prompt: str) -> str:
    """Puts the identity's token into `prompt`.

    ``{token}`` in the prompt is replaced by the token; a prompt that already names the token is
    kept; any other prompt is wrapped in the run's identity prompt template.

    Example:
        >>> prompt_with_identity(identity, "{token} reading a book")  # doctest: +SKIP
        '<cc-char> reading a book'
    """
    if "{token}" in prompt:
        return prompt.replace("{token}", identity.token)
    if identity.token in prompt.split():
        return prompt
    template = str(identity.metadata.get("identity_prompt_template", "{token} {prompt}"))
    return template.format(token=identity.token, prompt=prompt)


def identity_generator(
    identity: Identity,
    *,
    model: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    lora_scale: float = 1.0,
) -> Any:
    """An `SDXLGenerator` on the identity's base model (or `model`), with the run's settings."""
    from consistent_char.generators.sdxl import SDXLGenerator
    from consistent_char.stages import resolve_device, resolve_dtype, resolve_model

    saved = identity.metadata.get("config") or {}
    gen = GeneratorConfig.model_validate(saved.get("generator", {}))
    base = model or identity.metadata.get("base_model")
    if not base:
        raise ValueError("the identity does not name its base model; pass --model")
    if base == "toy" and "generator" not in saved:
        gen = ExtractorConfig.build({"model": "toy"}).generator
    dev = resolve_device(device)
    generator = SDXLGenerator.from_pretrained(
        resolve_model(base),
        device=dev,
        dtype=resolve_dtype(dtype, dev),
        **{
            **gen.model_dump(),
            "num_inference_steps": num_inference_steps or gen.num_inference_steps,
            "guidance_scale": gen.guidance_scale if guidance_scale is None else guidance_scale,
        },
        lora_scale=lora_scale,
    )
    return generator
