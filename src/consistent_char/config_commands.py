"""Settings of the commands around the loop (editing with an identity, casting many subjects):
checked like a run's config, but not part of it, so that changing them never stops a run
from resuming."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from consistent_char.config_base import TOY_MODEL, _Strict

if TYPE_CHECKING:
    from consistent_char.config import ExtractorConfig

__all__ = ["CastConfig", "EditConfig"]


class EditConfig(_Strict):
    """Settings of local editing (`consistent_char.edit`) beyond the generator's own."""

    strength: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="How much of the masked region is redrawn: 1 starts it from pure noise "
        "(Blended Latent Diffusion); less keeps some of the input's layout there.",
    )


class CastConfig(_Strict):
    """How ``consistent-char cast`` runs its subjects on Ray (`RayBackend`); not part of a
    run's config, so that changing them never stops a subject's run from resuming."""

    gpus_per_subject: float | None = Field(
        None,
        ge=0,
        description="GPUs each subject's Ray task asks for (None: 1, or 0 on ToyWorld or with "
        "device cpu).",
    )
    cpus_per_subject: float = Field(1.0, gt=0, description="CPUs each subject's Ray task asks for.")
    max_retries: int = Field(
        3, ge=0, description="Times Ray retries a subject whose worker died; the retry resumes."
    )

    def with_defaults_for(self, config: ExtractorConfig) -> CastConfig:
        """These settings with `gpus_per_subject` chosen for `config` where it is None."""
        if self.gpus_per_subject is not None:
            return self
        on_cpu = config.model == TOY_MODEL or config.device == "cpu"
        return self.model_copy(update={"gpus_per_subject": 0.0 if on_cpu else 1.0})
