"""Compares the identities of two cast folders subject by subject, tensor for tensor.

    python research/cast/compare_casts.py runs/cast runs/cast-ray

Prints one line per subject (equal or the first tensor that differs) and exits 1 if any differ.
Used for docs/cast.md's check that a cast on Ray learns what a sequential cast learns.
"""

from __future__ import annotations

import sys

import torch

from consistent_char.cast import CastRecord
from consistent_char.identity import Identity


def _tensors(identity: Identity) -> dict[str, torch.Tensor]:
    lora = {f"lora.{k}": v for k, v in (identity.lora or {}).items()}
    return {"clip_l": identity.clip_l, "clip_g": identity.clip_g, **lora}


def main(first: str, second: str) -> int:
    a, b = CastRecord.read(first), CastRecord.read(second)
    differ = 0
    for record in a.subjects:
        other = b.subject(record.subject)
        x = _tensors(Identity.load(f"{first}/{record.run}/identity"))
        y = _tensors(Identity.load(f"{second}/{other.run}/identity"))
        bad = [k for k in x if k not in y or not torch.equal(x[k], y[k])] or sorted(set(y) - set(x))
        differ += bool(bad)
        what = f"differ ({bad[0]})" if bad else f"equal ({len(x)} tensors)"
        print(f"{record.subject!r}: {what}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
