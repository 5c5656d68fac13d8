"""The default refiner: textual inversion + LoRA on SDXL (`TextualInversionLoRARefiner`).

Θ is a new token in each of SDXL's two text encoders plus a LoRA on the UNet's attention
projections, trained together with SDXL's own denoising loss on a shared pipeline that is left as
it was. The modules, in the order a reader meets them:

- `refiner`: the class and its `refine`, the paper's ``Θ ← refine(Θ, S[c*])``;
- `settings`: every setting's default and check (`RefinerSettings`, built on `RefinerConfig`);
- `inputs`: the checks of what `refine` is given;
- `denoising`: the loss (SDXL's denoising loss, timesteps, prior preservation, caption dropout);
- `training`: the optimisation steps;
- `state`: how the pipeline is patched for training (new token rows, tokenizer copies, the
  LoRA) and restored;
- `encoding`: the training images as latents;
- `acceleration`: CUDA graphs, compiled blocks and autocast.
"""

from consistent_char.refiners.ti_lora.acceleration import CUDA_GRAPH_WARMUP_STEPS
from consistent_char.refiners.ti_lora.encoding import ENCODE_BATCH, ENCODE_PIXELS
from consistent_char.refiners.ti_lora.inputs import MAX_SEED
from consistent_char.refiners.ti_lora.refiner import TextualInversionLoRARefiner
from consistent_char.refiners.ti_lora.settings import MixedPrecision, RefineMode, RefinerSettings
from consistent_char.refiners.ti_lora.state import TRAIN_ADAPTER
from consistent_char.refiners.ti_lora.training import StepCallback

__all__ = [
    "CUDA_GRAPH_WARMUP_STEPS",
    "ENCODE_BATCH",
    "ENCODE_PIXELS",
    "MAX_SEED",
    "TRAIN_ADAPTER",
    "MixedPrecision",
    "RefineMode",
    "RefinerSettings",
    "StepCallback",
    "TextualInversionLoRARefiner",
]
