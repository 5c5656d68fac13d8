"""Small user-written stages for loop tests: solid-colour images whose colour an identity pins.

They follow the stage protocols only (no base class), as a user's own stages would.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from consistent_char.extractor import stage_seed
from consistent_char.identity import Identity

SIZE = 8


class ColourGenerator:
    """Without an identity: a random colour per seed. With one: its colour, plus noise that
    shrinks as the identity is refined more often (stored in clip_l[0, 3])."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], Identity | None]] = []

    def generate(
        self, prompts: Sequence[str], seeds: Sequence[int], identity: Identity | None = None
    ) -> list[Image.Image]:
        self.calls.append((list(prompts), identity))
        images = []
        for prompt, seed in zip(prompts, seeds, strict=True):
            rng = np.random.default_rng(seed)
            if identity is None:
                colour = rng.uniform(0, 255, 3)
            else:
                if identity.token not in prompt:
                    raise AssertionError(f"identity {identity.token} not in prompt {prompt!r}")
                centre = identity.clip_l[0, :3].numpy()
                noise = 60.0 / (1.0 + float(identity.clip_l[0, 3]))
                colour = np.clip(centre + rng.normal(0, noise, 3), 0, 255)
            pixels = np.broadcast_to(colour.astype(np.uint8), (SIZE, SIZE, 3))
            images.append(Image.fromarray(np.ascontiguousarray(pixels)))
        return images


class MeanColourEmbedder:
    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        return np.stack([np.asarray(im, np.float32).mean(axis=(0, 1)) / 255.0 for im in images])


class MeanColourRefiner:
    """Learns the mean colour of the chosen images; warm start adds one to the 'strength'."""

    def __init__(self, token: str = "<fake>") -> None:
        self.token = token
        self.calls: list[tuple[Identity | None, int, list[str]]] = []
        self.returned: list[Identity] = []

    def refine(
        self,
        identity: Identity | None,
        images: Sequence[Image.Image],
        captions: Sequence[str],
        *,
        seed: int,
    ) -> Identity:
        self.calls.append((identity, len(images), list(captions)))
        mean = np.stack([np.asarray(im, np.float32).mean(axis=(0, 1)) for im in images]).mean(0)
        strength = 0.0 if identity is None else float(identity.clip_l[0, 3]) + 1.0
        row = torch.tensor([[*mean.tolist(), strength]], dtype=torch.float32)
        new = Identity(
            token=identity.token if identity else self.token,
            clip_l=row,
            clip_g=torch.cat([row, row], dim=1),
            lora={"down.lora_A.weight": torch.full((2, 4), float(seed % 97))},
            lora_rank=2,
            lora_alpha=2.0,
        )
        self.returned.append(new)
        return new


class ScriptedRefiner(MeanColourRefiner):
    """MeanColourRefiner whose refine at iteration k (known from its seed, so a resumed run
    gets the same script) sets the identity's 'strength' (how tightly the generator draws it)
    to strengths[k] and shifts its colour by shifts[k]; it records the prior images given."""

    def __init__(self, strengths, shifts=None, token="<fake>"):
        super().__init__(token=token)
        self.strengths, self.shifts = strengths, shifts or [0.0] * len(strengths)
        self.priors: list[tuple[int, list[str]] | None] = []
        self.seeds = [stage_seed(0, i, "refine") for i in range(len(strengths))]

    def refine(self, identity, images, captions, *, seed, prior_images=None, prior_captions=None):
        k = self.seeds.index(seed)
        new = super().refine(identity, images, captions, seed=seed)
        new.clip_l[0, 3] = self.strengths[k]
        new.clip_l[0, :3] = (new.clip_l[0, :3] + self.shifts[k]).clamp(0, 255)
        self.priors.append(None if prior_images is None else (len(prior_images), prior_captions))
        return new


class FakeCUDAGraph:
    """Stands in for `torch.cuda.CUDAGraph` on the CPU: `replay` runs the step again and
    writes its result into the output the capture handed out, as a replay writes graph
    memory. (What it cannot stand in for: a replay re-running the *recorded kernels*, so a
    step that took a per-step value from Python instead of its input tensors would pass here.)"""

    def __init__(self, step, output: torch.Tensor) -> None:
        self.step, self.output, self.replays = step, output, 0

    def replay(self) -> None:
        self.replays += 1
        self.output.copy_(self.step())


def fake_cuda_graphs(monkeypatch, calls: list[str] | None = None) -> None:
    """Lets `TextualInversionLoRARefiner(cuda_graphs=True)` run on the CPU: the device check
    passes, warm-up steps run on the current stream and the capture returns a `FakeCUDAGraph`
    (a capture records the step without running it)."""
    from consistent_char.refiners.ti_lora.acceleration import _StepRunner

    log = calls if calls is not None else []

    def warmup(self):
        log.append("warmup")
        return self.step()

    def capture(self):
        log.append("capture")
        output = torch.zeros(())
        return FakeCUDAGraph(self.step, output), output

    monkeypatch.setattr(_StepRunner, "check_device", staticmethod(lambda device: None))
    monkeypatch.setattr(_StepRunner, "_on_side_stream", warmup)
    monkeypatch.setattr(_StepRunner, "_capture", capture)
