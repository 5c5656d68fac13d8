"""The generator's settings: one pydantic model holds every default and every check.

`GeneratorConfig` (the loop's ``generator`` section of `ExtractorConfig`) is the source;
`GeneratorSettings` adds the settings the loop leaves at their defaults, so a keyword given to
`SDXLGenerator` and a ``generator.*`` key of a config file are checked by the same field with the
same message.
"""

from __future__ import annotations

from pydantic import Field

from consistent_char.config import GeneratorConfig

__all__ = ["GeneratorSettings"]


class GeneratorSettings(GeneratorConfig):
    """Every setting of `SDXLGenerator` (its docstring says what each does).

    Example:
        >>> GeneratorSettings(guidance_scale=5).guidance_scale, GeneratorSettings().lora_scale
        (5.0, 1.0)
    """

    lora_scale: float = Field(
        1.0,
        ge=0.0,
        description="Strength of an identity's LoRA while it is applied (1: as learned).",
    )
    show_progress: bool = Field(False, description="Show diffusers' per-batch progress bar.")
