"""Helpers for testing stages: tiny real components (`tiny`) and the conformance suite."""

from consistent_char.testing.tiny import (
    TINY_WORDS,
    tiny_identity,
    tiny_sdxl_pipeline,
    tiny_training_images,
)

__all__ = ["TINY_WORDS", "tiny_identity", "tiny_sdxl_pipeline", "tiny_training_images"]
