"""Conformance check for an `Identity`: it survives ``save`` and ``Identity.load`` unchanged, so
a run can be resumed and an identity shipped as files."""

from __future__ import annotations

import json
import tempfile
from typing import Any, cast

from consistent_char.identity import Identity
from consistent_char.testing.conformance._common import (
    ConformanceCase,
    bind,
    conformance_check,
    fail,
    run_all,
)

__all__ = ["IDENTITY_CHECKS", "check_identity", "check_identity_save_load_round_trip"]


def assert_round_trips(identity: Identity) -> None:
    """Fails naming what changed when `identity` is saved and loaded back."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        loaded = Identity.load(identity.save(f"{tmp}/identity"))
    if loaded.token != identity.token:
        fail(f"token {identity.token!r} came back as {loaded.token!r}")
    for name in ("clip_l", "clip_g"):
        a, b = getattr(identity, name).detach().float().cpu(), getattr(loaded, name)
        if a.shape != b.shape or not torch.equal(a, b.float()):
            fail(f"{name} changed in the round trip")
    if (identity.lora is None) != (loaded.lora is None):
        fail(f"the LoRA {'vanished' if loaded.lora is None else 'appeared'} in the round trip")
    if identity.lora is not None and loaded.lora is not None:
        if set(identity.lora) != set(loaded.lora):
            missing = sorted(set(identity.lora) ^ set(loaded.lora))[:3]
            fail(f"LoRA keys changed in the round trip, e.g. {missing}")
        for key, value in identity.lora.items():
            if not torch.equal(value.detach().float().cpu(), loaded.lora[key].float()):
                fail(f"LoRA weight {key} changed in the round trip")
    for attr in ("lora_rank", "lora_alpha", "target_modules"):
        if getattr(identity, attr) != getattr(loaded, attr):
            fail(f"{attr} {getattr(identity, attr)!r} came back as {getattr(loaded, attr)!r}")
    if loaded.metadata != json.loads(json.dumps(identity.metadata, default=str)):
        fail("metadata changed in the round trip")


def _as_identity(stage: Any) -> Identity:
    return cast(Identity, stage)


@conformance_check(_as_identity)
def check_identity_save_load_round_trip(identity: Identity) -> None:
    """Token, embedding rows, LoRA weights and settings, and metadata (as JSON) come back
    unchanged from ``identity.save`` and ``Identity.load``."""
    assert_round_trips(identity)


#: The `Identity` checks.
IDENTITY_CHECKS = (check_identity_save_load_round_trip,)


def identity_cases(identity: Identity) -> list[ConformanceCase]:
    """The `Identity` checks bound to `identity`."""
    return bind(IDENTITY_CHECKS, identity)


def check_identity(identity: Identity) -> list[str]:
    """Checks that `identity` survives ``save`` and ``Identity.load`` unchanged.

    Raises:
        AssertionError: ``[identity_save_load_round_trip] what changed``.
    """
    return run_all(identity_cases(identity))
