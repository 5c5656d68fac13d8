"""Trains every ToyWorld model from a seed: ``python -m recipes.toyworld.train --out DIR``.

The VAE, both text encoders and the UNet of the toy SDXL pipeline, the DINOv2 and the identity
probe that ``consistent_char.toy`` ships as package data, trained on ToyWorld's renders and then
evaluated into ``DIR/metrics.json``.

On CUDA the stages run in bf16 autocast with large batches; on a CPU with small ones. ``--scale``
multiplies every step count (``--scale 0.01`` is a smoke test). ``--time-budget SECONDS`` caps
each stage's share of the wall time (the learning-rate schedule follows whichever of steps or
time runs out first), at the price of bit-reproducibility.

Modules, in the order a run uses them:

- `plan`: each stage's steps, batch and learning rate, per device and ``--scale``;
- `trainer`: the run's rendered sets and trained models;
- `stages`: the four stages (``vae``, ``unet``, ``dino``, ``probe``) and their losses, with
  `augment` for the pixel augmentations;
- `loop`: the optimisation loop they share, with `checkpoint` for cut and resumed runs;
- `export`: the folders the package ships; `evaluate`: ``metrics.json``;
- `train`: the command line, and `log` its log lines.
"""
