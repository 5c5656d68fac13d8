"""The refiner's settings: one pydantic model holds every default and every check.

`RefinerConfig` (the loop's ``refiner`` section of `ExtractorConfig`) is the source; the refiner's
own `RefinerSettings` adds the settings the loop leaves at their defaults, so a keyword given to
`TextualInversionLoRARefiner` and a ``refiner.*`` key of a config file are checked by the same
field with the same message.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from consistent_char.config import RefineMode, RefinerConfig

__all__ = ["MixedPrecision", "RefineMode", "RefinerSettings"]

MixedPrecision = Literal["auto", "bf16", "no"]

_STEPS = RefinerConfig.model_fields["steps"]


class RefinerSettings(RefinerConfig):
    """Every setting of `TextualInversionLoRARefiner` (its docstring says what each does).

    Example:
        >>> RefinerSettings(steps=0).steps, RefinerSettings().lora_alpha_value
        (0, 4.0)
    """

    # The refiner may take no step at all (to read out or measure a warm start as it is); the
    # loop needs at least one, which `RefinerConfig` asks for.
    steps: int = Field(_STEPS.default, ge=0, description=_STEPS.description)
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay of the trained tensors.")
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="Micro-batches per optimisation step."
    )
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="Gradient clipping norm over the trained tensors (None: none)."
    )
    height: int | None = Field(
        None, ge=8, description="Training image height (None: the first image's)."
    )
    width: int | None = Field(
        None, ge=8, description="Training image width (None: the first image's)."
    )
    mixed_precision: MixedPrecision = Field(
        "auto", description="auto (bfloat16 autocast on CUDA, none on CPU), bf16 or no."
    )
    show_progress: bool = Field(False, description="Show a progress bar over the steps.")

    @property
    def lora_alpha_value(self) -> float:
        """The LoRA alpha in use: `lora_alpha`, or the rank when it is None (scale 1)."""
        return float(self.lora_rank if self.lora_alpha is None else self.lora_alpha)
