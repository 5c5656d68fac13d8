"""The base of every settings model: strict fields (no unknown keys, no NaN, no boolean for a
number), keyword settings checked as a config section, and settings read as attributes."""

from __future__ import annotations

from typing import Any, ClassVar, get_args

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator
from typing_extensions import Self

from consistent_char.config_parsing import ConfigError, explain

__all__ = ["TOY_MODEL", "SettingsAttributes"]

#: The model name that stands for ToyWorld's shipped pipeline.
TOY_MODEL = "toy"


class _Strict(BaseModel):
    # No NaN or infinity anywhere: a guidance scale of nan draws black images without an error.
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False
    )

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_not_booleans(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic reads True as 1: a boolean where a number belongs is a mistake, not a value.
        field = cls.model_fields[str(info.field_name)].annotation
        if isinstance(value, bool) and {int, float} & {field, *get_args(field)}:
            raise ValueError(f"expected a number, got the boolean {value!r}")
        return value

    @classmethod
    def from_keywords(cls, settings: dict[str, Any], owner: str) -> Self:
        """Validates the keyword settings of a stage built from this section (`owner` names it).

        Raises:
            TypeError: A name that is no setting (as an unknown keyword argument would).
            ConfigError: A value the model refuses; the message names each field and why.
        """
        unknown = sorted(set(settings) - set(cls.model_fields))
        if unknown:
            raise TypeError(
                f"unknown {owner} setting(s) {unknown}; known: {', '.join(cls.model_fields)}"
            )
        try:
            return cls.model_validate(settings)
        except ValidationError as err:
            raise ConfigError(explain(err, cls)) from None


class SettingsAttributes:
    """Lets a stage read its settings (a pydantic model in ``self.settings``) as attributes, and
    checks an assigned setting as the constructor does. `SETTINGS` names the model."""

    SETTINGS: ClassVar[type[BaseModel]]
    settings: BaseModel

    def __getattr__(self, name: str) -> Any:
        # Only reached for names that are not attributes: the settings read as attributes.
        settings = self.__dict__.get("settings")
        if settings is not None and name in type(self).SETTINGS.model_fields:
            return getattr(settings, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in type(self).SETTINGS.model_fields:
            setattr(self.settings, name, value)  # checked as the constructor checks it
        else:
            super().__setattr__(name, value)
