"""Using a learned identity after the run: prompts with its token, and a generator for it."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from consistent_char.config import (
    TOY_MODEL,
    ExtractorConfig,
    GeneratorConfig,
    check_prompt_template,
)
from consistent_char.identity import Identity, IdentityError

DEFAULT_TEMPLATE = "{token} {prompt}"


def prompt_with_identity(identity: Identity, prompt: str) -> str:
    """Puts the identity's token into `prompt`.

    ``{token}`` in the prompt is replaced by the token; a prompt that already names the token is
    kept; any other prompt is wrapped in the run's identity prompt template, which may hold only
    the fields ``{token}`` and ``{prompt}`` (`consistent_char.config.check_prompt_template`).

    Raises:
        IdentityError: The identity's template is malformed.

    Example:
        >>> prompt_with_identity(identity, "{token} reading a book")  # doctest: +SKIP
        '<cc-char> reading a book'
    """
    if "{token}" in prompt:
        return prompt.replace("{token}", identity.token)
    if identity.token in prompt.split():
        return prompt
    template = identity.metadata.get("identity_prompt_template", DEFAULT_TEMPLATE)
    try:
        check_prompt_template(template)
    except ValueError as err:
        raise IdentityError(f"identity {identity.token!r}: {err}") from None
    return str(template).format(token=identity.token, prompt=prompt)


def base_model(identity: Identity, model: str | None = None) -> tuple[str, str]:
    """The base model a generator for `identity` loads, and why: ``(model, reason)``.

    Raises:
        IdentityError: No `model` is given and the identity does not name its base model.

    Example:
        >>> base_model(identity)  # doctest: +SKIP
        ('stabilityai/stable-diffusion-xl-base-1.0', "the identity's base model")
    """
    if model is not None:
        return model, "given with --model"
    base = identity.metadata.get("base_model")
    if not isinstance(base, str) or not base.strip():
        raise IdentityError(
            f"identity {identity.token!r} does not name its base model; pass --model with the "
            "SDXL model it was learned on"
        )
    return base, "the identity's base model, from its identity.json"


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
    """An `SDXLGenerator` on the identity's base model (or `model`), with the run's settings.

    Every setting is checked before the model loads.

    Raises:
        IdentityError: No base model, or the identity's saved generator settings are invalid.
        consistent_char.errors.InvalidValueError: A bad device, step count or scale.
        consistent_char.stages.ModelNotFoundError: The model is neither a folder nor (offline)
            in the local cache.
    """
    from consistent_char.generators.sdxl import SDXLGenerator
    from consistent_char.generators.settings import GeneratorSettings
    from consistent_char.stages import resolve_device, resolve_dtype, resolve_model

    saved = identity.metadata.get("config")
    saved = saved if isinstance(saved, dict) else {}
    try:
        gen = GeneratorConfig.model_validate(saved.get("generator", {}))
    except ValidationError as err:
        raise IdentityError(
            f"identity {identity.token!r} has invalid generator settings in its identity.json "
            f"({err.errors()[0]['loc']}: {err.errors()[0]['msg']}); pass the settings as options"
        ) from None
    base, _ = base_model(identity, model)
    if base == TOY_MODEL and "generator" not in saved:
        gen = ExtractorConfig.build({"model": TOY_MODEL}).generator
    settings = {
        **gen.model_dump(),
        "num_inference_steps": gen.num_inference_steps
        if num_inference_steps is None
        else num_inference_steps,
        "guidance_scale": gen.guidance_scale if guidance_scale is None else guidance_scale,
        "lora_scale": lora_scale,
        # The devices the identity was learned on belong to that machine, not to the identity.
        "devices": None,
    }
    GeneratorSettings.from_keywords(settings, "SDXLGenerator")
    dev = resolve_device(device)
    generator = SDXLGenerator.from_pretrained(
        resolve_model(base), device=dev, dtype=resolve_dtype(dtype, dev), **settings
    )
    return generator
