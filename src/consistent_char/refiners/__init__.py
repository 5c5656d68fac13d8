"""Refiners: images of one character -> an `Identity` (`consistent_char.interfaces.Refiner`)."""

from consistent_char.refiners.ti_lora import TextualInversionLoRARefiner

__all__ = ["TextualInversionLoRARefiner"]
