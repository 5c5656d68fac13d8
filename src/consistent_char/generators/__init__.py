"""Generators: prompts + seeds (+ identity) -> images (`consistent_char.interfaces.Generator`)."""

from consistent_char.generators.sdxl import SDXLGenerator

__all__ = ["SDXLGenerator"]
