"""The identity probe: a small CNN that reads every ToyWorld attribute back from an image.

Used by evaluation only, never by the loop. One classification head per attribute, an optional
validity head (is this a ToyWorld image at all?) and an optional pose head that regresses the
creature's pose (`consistent_char.toy.pose`), for probes trained on posed creatures.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from consistent_char.toy.pose import POSE, POSE_RANGES
from consistent_char.toy.world import ATTRIBUTES, IMAGE_SIZE

__all__ = ["POSE_KEY", "VALID", "IdentityProbe", "ProbeConfig"]


PROBE_CONFIG = "config.json"
PROBE_WEIGHTS = "model.safetensors"
#: The key of the validity logit in the probe's outputs.
VALID = "valid"
#: The key of the pose regression in the probe's outputs (`POSE` fields, each scaled so that
#: `POSE_RANGES` maps to [0, 1]).
POSE_KEY = "pose"


@dataclass
class ProbeConfig:
    """The probe's classes (attribute → values, in class-index order), its widths, and whether
    it has a validity head (is this a ToyWorld image at all?)."""

    attributes: dict[str, list[str]] = field(
        default_factory=lambda: {k: list(v) for k, v in ATTRIBUTES.items()}
    )
    channels: tuple[int, ...] = (32, 64, 128)
    hidden: int = 256
    image_size: int = IMAGE_SIZE
    validity: bool = True
    pose: bool = False


class IdentityProbe(nn.Module):
    """Classifies every ToyWorld attribute (identity and scene) of 64 px images, and tells
    ToyWorld images from images that are not (`predict_validity`: a creature without eyes, with
    faint eyes or a faint hat, blurred, or two creatures blended, as a loop that trains on its
    own images may come to draw).

    Used by evaluation only, never by the loop. Inputs are scaled to ``[-1, 1]``.

    Example:
        >>> probe = IdentityProbe.from_pretrained(consistent_char.toy.probe_dir())  # doctest: +SKIP
        >>> probe.predict([image])[0]["hat"]  # doctest: +SKIP
        'crown'
    """

    def __init__(self, config: ProbeConfig | None = None) -> None:
        super().__init__()
        self.config = config or ProbeConfig()
        layers: list[nn.Module] = []
        c_in = 3
        for c in self.config.channels:
            layers += [
                nn.Conv2d(c_in, c, 3, padding=1),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
                nn.Conv2d(c, c, 3, padding=1),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c_in = c
        layers += [nn.AdaptiveAvgPool2d(4), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.trunk = nn.Sequential(
            nn.Linear(c_in * 16, self.config.hidden), nn.ReLU(inplace=True), nn.Dropout(0.1)
        )
        self.heads = nn.ModuleDict(
            {a: nn.Linear(self.config.hidden, len(v)) for a, v in self.config.attributes.items()}
        )
        self.valid_head = nn.Linear(self.config.hidden, 1) if self.config.validity else None
        self.pose_head = nn.Linear(self.config.hidden, len(POSE)) if self.config.pose else None

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(N, 3, H, W)`` in ``[-1, 1]`` → logits by attribute (and ``"valid"``, one logit
        per image, when the probe has a validity head)."""
        h = self.trunk(self.features(pixels))
        out = {a: head(h) for a, head in self.heads.items()}
        if self.valid_head is not None:
            out[VALID] = self.valid_head(h)[:, 0]
        if self.pose_head is not None:
            out[POSE_KEY] = self.pose_head(h)
        return out

    @staticmethod
    def to_pixels(
        images: Sequence[Image.Image] | np.ndarray, size: int = IMAGE_SIZE
    ) -> torch.Tensor:
        """PIL images (resized to `size` if needed) or ``(N, H, W, 3)`` uint8 → ``[-1, 1]``."""
        if isinstance(images, np.ndarray):
            array = images
        else:
            array = np.stack(
                [
                    np.asarray(
                        im.convert("RGB")
                        if im.size == (size, size)
                        else im.convert("RGB").resize((size, size), Image.Resampling.BOX)
                    )
                    for im in images
                ]
            )
        return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 127.5 - 1.0

    @torch.no_grad()
    def _outputs(
        self, images: Sequence[Image.Image] | np.ndarray, batch_size: int
    ) -> dict[str, np.ndarray]:
        """Softmax probabilities by attribute (``(N, classes)``) and the validity probability
        (``(N,)``, under `VALID`, when the probe has the head)."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        out: dict[str, list[np.ndarray]] = {}
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            logits = self(self.to_pixels(chunk, self.config.image_size).to(device))
            for a, lg in logits.items():
                p = torch.sigmoid(lg) if a == VALID else lg if a == POSE_KEY else lg.softmax(-1)
                out.setdefault(a, []).append(p.float().cpu().numpy())
        self.train(was_training)
        if not out:
            empty = {a: np.zeros((0, len(v))) for a, v in self.config.attributes.items()}
            if self.pose_head is not None:
                empty[POSE_KEY] = np.zeros((0, len(POSE)))
            return {**empty, **({VALID: np.zeros(0)} if self.valid_head is not None else {})}
        return {a: np.concatenate(v) for a, v in out.items()}

    def predict_indices(
        self, images: Sequence[Image.Image] | np.ndarray, *, batch_size: int = 256
    ) -> dict[str, np.ndarray]:
        """Class indices by attribute, each an ``(N,)`` array."""
        probs = self._outputs(images, batch_size)
        return {a: probs[a].argmax(-1) for a in self.heads}

    def predict(
        self, images: Sequence[Image.Image] | np.ndarray, *, batch_size: int = 256
    ) -> list[dict[str, str]]:
        """One ``{attribute: value}`` dict per image."""
        return self._attributes(self._outputs(images, batch_size), len(images))

    def _attributes(self, probs: dict[str, np.ndarray], n: int) -> list[dict[str, str]]:
        names = self.config.attributes
        return [{a: names[a][int(probs[a][i].argmax())] for a in names} for i in range(n)]

    def predict_validity(
        self, images: Sequence[Image.Image] | np.ndarray, *, batch_size: int = 256
    ) -> np.ndarray:
        """The probability that each image is a ToyWorld image, ``(N,)``.

        Raises:
            ValueError: The probe was trained without a validity head.
        """
        if self.valid_head is None:
            raise ValueError("this probe has no validity head (trained without one)")
        return self._outputs(images, batch_size)[VALID]

    def predict_pose(
        self, images: Sequence[Image.Image] | np.ndarray, *, batch_size: int = 256
    ) -> np.ndarray:
        """The creature's pose in each image, ``(N, 4)`` in `POSE` order and units.

        Raises:
            ValueError: The probe was trained without a pose head.
        """
        return self.predict_with_pose(images, batch_size=batch_size)[1]

    def predict_with_pose(
        self, images: Sequence[Image.Image] | np.ndarray, *, batch_size: int = 256
    ) -> tuple[list[dict[str, str]], np.ndarray]:
        """`predict` and `predict_pose` from one pass over the images.

        Raises:
            ValueError: The probe was trained without a pose head.
        """
        if self.pose_head is None:
            raise ValueError("this probe has no pose head (trained without one)")
        probs = self._outputs(images, batch_size)
        lo, hi = _pose_bounds()
        return self._attributes(probs, len(images)), lo + probs[POSE_KEY] * (hi - lo)

    @staticmethod
    def pose_targets(poses: np.ndarray) -> torch.Tensor:
        """``(N, 4)`` poses in `POSE` units → the pose head's targets (ranges → [0, 1])."""
        lo, hi = _pose_bounds()
        return torch.as_tensor((np.asarray(poses) - lo) / (hi - lo), dtype=torch.float32)

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Writes ``config.json`` and ``model.safetensors`` (float32)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(out / PROBE_WEIGHTS))
        config = asdict(self.config)
        config["channels"] = list(self.config.channels)
        (out / PROBE_CONFIG).write_text(json.dumps(config, indent=2))
        return out

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike[str], *, device: str | torch.device = "cpu"
    ) -> IdentityProbe:
        """Loads a probe written by `save_pretrained` (safetensors only), in eval mode."""
        root = Path(directory)
        if not (root / PROBE_CONFIG).is_file() or not (root / PROBE_WEIGHTS).is_file():
            raise FileNotFoundError(
                f"{root} is not a probe directory: it needs {PROBE_CONFIG} and {PROBE_WEIGHTS}"
            )
        data = json.loads((root / PROBE_CONFIG).read_text())
        config = ProbeConfig(
            attributes={k: list(v) for k, v in data["attributes"].items()},
            channels=tuple(data["channels"]),
            hidden=int(data["hidden"]),
            image_size=int(data.get("image_size", IMAGE_SIZE)),
            validity=bool(data.get("validity", False)),
            pose=bool(data.get("pose", False)),
        )
        probe = cls(config)
        probe.load_state_dict(load_file(str(root / PROBE_WEIGHTS)))
        return probe.to(device).eval()


def _pose_bounds() -> tuple[np.ndarray, np.ndarray]:
    """The low and high ends of `POSE_RANGES`, in `POSE` order."""
    return tuple(np.asarray([POSE_RANGES[k][i] for k in POSE]) for i in (0, 1))  # type: ignore[return-value]
