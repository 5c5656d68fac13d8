"""Configuration as data: one pydantic model per stage and `ExtractorConfig` for the loop.

Every field has a description (the CLI's help comes from them), unknown keys are errors that list
the known ones, and impossible combinations (N smaller than `d_min_c`, K < 1, ...) are rejected
before any model loads.

Example:
    >>> cfg = ExtractorConfig.from_overrides({"num_images": 64, "refiner.steps": 200})
    >>> cfg.num_clusters
    3
"""

from __future__ import annotations

import os
from typing import Any, Literal

import yaml
from pydantic import (
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from consistent_char.config_base import TOY_MODEL, SettingsAttributes, _Strict
from consistent_char.config_commands import CastConfig, EditConfig
from consistent_char.config_parsing import (
    ConfigError,
    check_prompt_template,
    deep_merge,
    diff,
    explain,
    load_mapping,
    parse_assignment,
    set_dotted,
)

__all__ = [
    "DEFAULT_MODEL",
    "TOY_MODEL",
    "CastConfig",
    "ClustererConfig",
    "ConfigError",
    "ConvergenceConfig",
    "EditConfig",
    "EmbedderConfig",
    "ExtractorConfig",
    "GeneratorConfig",
    "RefineMode",
    "RefinerConfig",
    "SettingsAttributes",
    "check_prompt_template",
    "load_mapping",
    "parse_assignment",
    "toy_preset",
]

DEFAULT_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"


class GeneratorConfig(_Strict):
    """Settings of the default `SDXLGenerator`."""

    num_inference_steps: int = Field(35, ge=1, le=1000, description="Denoising steps per image.")
    guidance_scale: float = Field(7.5, ge=0.0, description="Classifier-free guidance scale.")
    guidance_rescale: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Rescale the guided prediction towards the conditional one's standard "
        "deviation (0: off), against the over-saturation of high guidance.",
    )
    height: int | None = Field(
        None, ge=8, multiple_of=8, description="Image height in pixels (None: the model's default)."
    )
    width: int | None = Field(
        None, ge=8, multiple_of=8, description="Image width in pixels (None: the model's default)."
    )
    batch_size: int | None = Field(
        None, ge=1, description="Images per pipeline call (None: chosen from free memory)."
    )
    negative_prompt: str | None = Field(None, description="Negative prompt for every image.")
    fuse_identity: bool | None = Field(
        None,
        description="Merge the identity's LoRA into the UNet for each call (None: on CUDA).",
    )
    scheduler: str | None = Field(
        None,
        description="A diffusers scheduler class to sample with, e.g. "
        "EulerAncestralDiscreteScheduler (None: the model's own).",
    )

    devices: list[str] | Literal["auto"] | None = Field(
        None,
        description="Devices that draw an iteration's images together, each a contiguous run "
        "of whole batches on its own copy of the pipeline, e.g. [cuda:0, cuda:1]: byte for byte "
        "one device's images at the same batch_size. The first is the run's device, where the "
        "refinement runs; "
        "auto: every visible CUDA device (None: the run's device alone).",
    )

    @field_validator("devices", mode="before")
    @classmethod
    def _a_device_list(cls, value: Any) -> Any:
        from consistent_char.generators.sharding import check_device_list

        check_device_list(value)  # checked with the config, before any model loads
        return value

    @field_validator("scheduler")
    @classmethod
    def _a_scheduler_class(cls, name: str | None) -> str | None:
        from consistent_char.generators.schedulers import scheduler_class

        scheduler_class(name)  # checked with the config, before any model loads
        return name


class EmbedderConfig(_Strict):
    """Which image embedder measures identity (DINOv2 in the paper)."""

    kind: Literal["dinov2", "dino", "clip", "pixels"] = Field(
        "dinov2", description="dinov2 (paper default), dino (DINOv1), clip, or pixels (baseline)."
    )
    model: str | None = Field(
        None, description="Hub id or local folder; None picks the kind's default model."
    )
    batch_size: int = Field(32, ge=1, description="Images per embedder forward pass.")


class ClustererConfig(_Strict):
    """Settings of the default FAISS k-means clusterer (k-means++ seeding)."""

    niter: int = Field(20, ge=1, description="Lloyd iterations after k-means++ seeding.")
    nredo: int = Field(1, ge=1, description="Independent runs; FAISS keeps the best objective.")
    use_gpu: bool = Field(
        False,
        description="Run k-means on the GPU(s) with a FAISS GPU build (the [gpu] extra); "
        "centroids may differ from the CPU's by rounding.",
    )
    distance: Literal["euclidean", "cosine"] = Field(
        "euclidean",
        description=(
            "How k-means, cluster cohesion and the densest core measure distance: 'euclidean' "
            "on the embedder's features as they are (the paper does not say which), or "
            "'cosine' on features scaled to unit length, with k-means keeping its centroids on "
            "the unit sphere (spherical k-means). The convergence spread reads the features "
            "as they are either way."
        ),
    )


#: What the refiner trains: tokens and LoRA (the paper), tokens only, or the LoRA only.
RefineMode = Literal["ti_lora", "ti", "lora"]


class RefinerConfig(_Strict):
    """Settings of the default textual inversion + LoRA refiner."""

    mode: RefineMode = Field(
        "ti_lora", description="ti_lora (paper), ti (tokens only) or lora (LoRA only)."
    )
    token: str = Field("<cc-char>", min_length=1, description="The identity's placeholder token.")
    initializer_token: str = Field(
        "person", min_length=1, description="Word whose embedding initialises the new token."
    )
    num_vectors: int = Field(1, ge=1, le=16, description="Embedding vectors per text encoder.")
    lora_rank: int = Field(4, ge=1, le=256, description="LoRA rank r on UNet attention.")
    lora_alpha: float | None = Field(
        None, gt=0, description="LoRA alpha (None: equal to the rank, i.e. scale 1)."
    )
    target_modules: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        min_length=1,
        description="UNet module names that get a LoRA.",
    )
    lora_lr: float = Field(3e-5, gt=0, description="Learning rate of the LoRA weights.")
    embedding_lr: float = Field(5e-3, gt=0, description="Learning rate of the new token rows.")
    steps: int = Field(500, ge=1, description="Optimisation steps per iteration.")
    batch_size: int = Field(1, ge=1, description="Images per training step.")
    max_timestep: int | None = Field(
        None,
        ge=1,
        description="Train on timesteps below this only (None: all of them).",
    )
    lr_decay: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Learning rates times lr_decay**k when warm-starting an identity refined "
        "k times already (1: no decay).",
    )
    row_norm_cap: float | None = Field(
        None,
        gt=0,
        description="Cap on each new token row's norm, as a multiple of the mean norm of the "
        "encoder's own rows (None: no cap).",
    )
    prior_preservation: float = Field(
        0.0,
        ge=0,
        description="Weight of DreamBooth's prior-preservation loss on the base model's own "
        "images of the prompt (iteration 0's), captioned without the token (0: off, as in the "
        "paper).",
    )
    caption_dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Fraction of training images whose caption is dropped (both prompt "
        "embeddings zeroed, SDXL's unconditional input): the unguided branch learns the "
        "identity too, so guidance does not amplify it again each iteration (0: off, as in the "
        "paper).",
    )
    controlnet: str | None = Field(
        None,
        description="A ControlNet (folder, hub id, or 'toy') the denoising loss runs through, "
        "each training image under its own control image (control_annotator): what the control "
        "carries, e.g. the pose, is explained by the ControlNet instead of learned into the "
        "LoRA, so the identity follows that ControlNet better (None: off, as in the paper).",
    )
    control_annotator: str | None = Field(
        None,
        description="'module:function' turning a list of training images into their control "
        "images (e.g. consistent_char.toy.pose:annotate for ToyWorld's pose ControlNet).",
    )
    control_scale: float = Field(1.0, gt=0, description="The ControlNet's scale in the loss.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute UNet activations in the backward pass (less memory, slower)."
    )
    compile_blocks: bool = Field(
        False,
        description="torch.compile the UNet's repeated transformer blocks while training "
        "(fewer ops dispatched per step; the first refine pays the compile time).",
    )
    cuda_graphs: bool = Field(
        False,
        description="Capture the training step in a CUDA graph after 3 eager steps and replay "
        "it (CUDA only; one launch per step instead of tens of thousands of ops).",
    )

    @field_validator("target_modules", mode="before")
    @classmethod
    def _modules_are_a_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            raise ValueError(
                f"give a list of module names, e.g. [{value}], not the string {value!r}"
            )
        return value

    @model_validator(mode="after")
    def _token_is_one_word(self) -> RefinerConfig:
        if any(c.isspace() for c in self.token):
            raise ValueError(f"token must be one word without spaces, got {self.token!r}")
        return self

    @model_validator(mode="after")
    def _control_has_an_annotator(self) -> RefinerConfig:
        if (self.controlnet is None) != (self.control_annotator is None):
            raise ValueError("set controlnet and control_annotator together, or neither")
        return self

    @model_validator(mode="after")
    def _one_way_to_cut_host_work(self) -> RefinerConfig:
        if self.cuda_graphs and self.compile_blocks:
            raise ValueError("set at most one of cuda_graphs and compile_blocks")
        return self


class ConvergenceConfig(_Strict):
    """When to stop: the mean pairwise distance of the iteration's embeddings falls below a
    threshold, absolute (`d_conv`) or relative to the first iteration (`d_conv_relative`)."""

    d_conv: float | None = Field(None, gt=0, description="Absolute spread threshold.")
    d_conv_relative: float | None = Field(
        0.6, gt=0, le=1, description="Threshold as a fraction of iteration 0's spread."
    )
    max_anchor_ratio: float | None = Field(
        None,
        gt=0,
        description="Count an iteration as converged (or as the best) only if its images lie, "
        "on average, within this multiple of iteration 0's chosen-cluster cohesion from that "
        "cluster's centroid: a loop that drifts away from the character it chose cannot "
        "converge (None: no such check, as in the paper).",
    )
    patience: int | None = Field(
        None,
        ge=1,
        description="Stop when the spread has not fallen below its lowest for this many "
        "iterations (None: run until converged or max_iterations, as in the paper).",
    )
    return_best: bool = Field(
        False,
        description="Return the identity whose images had the lowest spread (among those "
        "max_anchor_ratio and max_saturation_rise admit), not the last one learned.",
    )
    max_saturation_rise: float | None = Field(
        None,
        gt=0,
        description="Stop when an iteration's images are more saturated than iteration 0's by "
        "more than this fraction (0.15: 15%), as guided images washing out into a few "
        "colours are; such an iteration neither converges nor counts as the best. Needs "
        "return_best (None: no such check, as in the paper).",
    )
    per_variation: bool = Field(
        False,
        description="With prompt_variations: the spread is the mean of each variation's own "
        "spread (the paper's criterion per prompt), so the settings the variations ask for "
        "are not read as disagreement. Without variations it changes nothing.",
    )

    @model_validator(mode="before")
    @classmethod
    def _absolute_replaces_default(cls, data: Any) -> Any:
        # Setting d_conv alone means "use an absolute threshold": drop the relative default.
        if isinstance(data, dict) and data.get("d_conv") is not None:
            data = {"d_conv_relative": None, **data}
        return data

    @model_validator(mode="after")
    def _saturation_guard_returns_the_best(self) -> ConvergenceConfig:
        # The guard stops on images the last identity drew badly: returning that identity
        # would defeat it.
        if self.max_saturation_rise is not None and not self.return_best:
            raise ValueError(
                "max_saturation_rise needs return_best: true (the guard stops on washed-out "
                "images and returns the best identity before them)"
            )
        return self

    @model_validator(mode="after")
    def _exactly_one(self) -> ConvergenceConfig:
        if (self.d_conv is None) == (self.d_conv_relative is None):
            raise ValueError(
                "set exactly one of d_conv (absolute) and d_conv_relative (fraction of the first "
                f"spread); got d_conv={self.d_conv}, d_conv_relative={self.d_conv_relative}"
            )
        return self


class ExtractorConfig(_Strict):
    """Everything a run of `IterativeIdentityExtractor` needs; saved as `config.yaml` in the run."""

    model: str = Field(
        DEFAULT_MODEL, description="SDXL hub id, local diffusers folder, or 'toy' for ToyWorld."
    )
    device: str = Field("auto", description="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Model dtype; auto is bfloat16 on CUDA and float32 on CPU."
    )
    seed: int = Field(0, ge=0, lt=2**32, description="Seed for images, clustering and training.")
    num_images: int = Field(128, ge=2, description="N: images generated per iteration.")
    d_size_c: int = Field(20, ge=1, description="Target cluster size; K = N // d_size_c.")
    d_min_c: int = Field(10, ge=1, description="Clusters smaller than this are not chosen.")
    core_size: int | None = Field(
        None,
        ge=2,
        description="Rank the clusters by their densest core_size members (the member whose "
        "core_size - 1 nearest fellow members lie closest, with those members) and refine on "
        "that core alone; a cluster needs that many members to be chosen (None: the whole most "
        "cohesive cluster, as in the paper).",
    )
    max_iterations: int = Field(10, ge=1, le=100, description="Upper bound on iterations.")
    warm_start: bool = Field(
        True,
        description="Refine from the previous iteration's identity (Algorithm 1); false: from "
        "the base model every iteration, on the images the previous identity drew.",
    )
    identity_prompt_template: str = Field(
        "{token} {prompt}",
        description="Prompt after iteration 0; must contain {token} and {prompt}.",
    )
    prompt_variations: list[str] = Field(
        default_factory=list,
        description="Templates with {prompt} drawn in turn (image j uses variation j mod their "
        "number), e.g. '{prompt} in the snow'; each image's refinement caption names its own "
        "variation, so the token learns the character, not the setting (empty: the prompt "
        "alone, as in the paper).",
    )
    core_spans_variations: bool = Field(
        False,
        description="With core_size and prompt_variations, build each core from the nearest "
        "images of every variation in turn: the densest images of a cluster mostly share one "
        "variation's setting, and a refinement on one setting learns the character for that "
        "setting alone.",
    )
    centre_variations: bool = Field(
        False,
        description="Cluster the embeddings after subtracting, from each image's, the mean of "
        "the images drawn from the same prompt variation: what the variation adds (its "
        "setting) then no longer decides the clusters, the character does.",
    )
    accumulate_chosen: bool = Field(
        False,
        description="Refine on the chosen clusters of this and every earlier iteration, not "
        "on this iteration's alone, so iteration 0's images of the base model stay in the "
        "training set at every round (data accumulation against self-consuming drift).",
    )
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)  # type: ignore[arg-type]
    embedder: EmbedderConfig = Field(default_factory=EmbedderConfig)  # type: ignore[arg-type]
    clusterer: ClustererConfig = Field(default_factory=ClustererConfig)  # type: ignore[arg-type]
    refiner: RefinerConfig = Field(default_factory=RefinerConfig)  # type: ignore[arg-type]
    convergence: ConvergenceConfig = Field(default_factory=ConvergenceConfig)  # type: ignore[arg-type]

    @property
    def num_clusters(self) -> int:
        """K = N // d_size_c, the number of k-means clusters."""
        return self.num_images // self.d_size_c

    @model_validator(mode="after")
    def _consistent(self) -> ExtractorConfig:
        if self.num_images // self.d_size_c < 1:
            raise ValueError(
                f"K = num_images // d_size_c = {self.num_images} // {self.d_size_c} = 0; "
                "K must be at least 1: lower d_size_c or raise num_images"
            )
        if self.d_min_c > self.num_images:
            raise ValueError(
                f"d_min_c = {self.d_min_c} is larger than num_images = {self.num_images}: "
                "no cluster could ever be chosen"
            )
        if self.core_size is not None and self.core_size > self.num_images:
            raise ValueError(
                f"core_size = {self.core_size} is larger than num_images = {self.num_images}: "
                "no cluster could ever hold the core"
            )
        if self.core_spans_variations and (self.core_size is None or not self.prompt_variations):
            raise ValueError(
                "core_spans_variations shapes the densest core across the prompt variations: "
                "set core_size and prompt_variations too"
            )
        check_prompt_template(self.identity_prompt_template)
        for variation in self.prompt_variations:
            check_prompt_template(variation, fields=("prompt",), what="prompt variation")
        if self.convergence.per_variation and self.num_images < 2 * len(self.prompt_variations):
            raise ValueError(
                f"convergence.per_variation needs at least 2 images per prompt variation: "
                f"num_images = {self.num_images} for {len(self.prompt_variations)} variations"
            )
        return self

    def warnings(self) -> list[str]:
        """Settings that are possible but almost certainly not meant, one sentence each."""
        if self.num_clusters == 1:
            return [
                f"K = num_images // d_size_c = {self.num_images} // {self.d_size_c} = 1: one "
                "cluster holds every image, so the loop learns from all of them instead of "
                f"choosing a cohesive group; set num_images to at least {2 * self.d_size_c} or "
                "lower d_size_c"
            ]
        return []

    # ------------------------------------------------------------ construction

    @classmethod
    def build(cls, data: dict[str, Any] | None = None) -> ExtractorConfig:
        """Validates a nested dict; errors become one `ConfigError` naming each field."""
        data = dict(data or {})
        if data.get("model") == TOY_MODEL:
            data = deep_merge(toy_preset(), data)
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise ConfigError(explain(err, cls)) from None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> ExtractorConfig:
        """Loads a YAML or JSON file (JSON is YAML too)."""
        return cls.build(load_mapping(path))

    @classmethod
    def from_overrides(
        cls,
        overrides: dict[str, Any] | None = None,
        base: dict[str, Any] | None = None,
    ) -> ExtractorConfig:
        """Applies dotted-key overrides (``{"refiner.steps": 200}``) on top of `base`."""
        data: dict[str, Any] = dict(base or {})
        for key, value in (overrides or {}).items():
            set_dotted(data, key, value)
        return cls.build(data)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def get(self, dotted: str) -> Any:
        """The value of a dotted setting, e.g. ``config.get("refiner.steps")`` (None if absent).

        Example:
            >>> ExtractorConfig().get("refiner.steps")
            500
        """
        node: Any = self.to_dict()
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node

    def differences(self, other: ExtractorConfig) -> list[str]:
        """Dotted names of the fields whose values differ, e.g. ``["refiner.steps"]``."""
        return sorted(diff(self.to_dict(), other.to_dict()))

    def describe_differences(self, other: ExtractorConfig) -> str:
        """The differing fields with both values, this config's as the run's: ``"refiner.steps
        (run: 100, now: 200)"``; empty when there are none."""
        return ", ".join(
            f"{d} (run: {self.get(d)!r}, now: {other.get(d)!r})" for d in self.differences(other)
        )


def toy_preset() -> dict[str, Any]:
    """ToyWorld settings (`--model toy`): small, fast on a CPU, and sized to its world.

    - 64 images an iteration in K = 8 clusters of at least 5, so that a popular creature fills a
      cluster of its own; 20 denoising steps at guidance 3 with Euler's ancestral sampler, where
      the toy UNet draws its prior's variety.
    - Each image draws one of the five scenes (`prompt_variations`), so the token learns the
      creature rather than a background.
    - A short refinement (100 steps, LoRA rank 4) with the token's rows capped at the encoder's
      own row norm, so that the token cannot outweigh the rest of the prompt; the LoRA is fused
      while generating, so it costs nothing per denoising step.
    - Convergence at 0.45 of the first spread, where one creature's images across the scenes
      lie; beyond the paper (docs/algorithm.md), clusters ranked and refined on their densest 5
      (`core_size`), and the loop stopped on patience or saturation, returning its best identity.

    What these settings measure on ToyWorld is in docs/status.md.
    """
    from consistent_char.toy.captions import SCENE_PHRASES

    return {
        "model": TOY_MODEL,
        "num_images": 64,
        "d_size_c": 8,
        "d_min_c": 5,
        "core_size": 5,
        "max_iterations": 8,
        "prompt_variations": [f"{{prompt}} {phrase}" for phrase in SCENE_PHRASES.values()],
        "generator": {
            "num_inference_steps": 20,
            "guidance_scale": 3.0,
            "fuse_identity": True,
            "scheduler": "EulerAncestralDiscreteScheduler",
        },
        "embedder": {"kind": "dinov2", "model": TOY_MODEL, "batch_size": 64},
        "refiner": {
            "token": "<cc-char>",
            "initializer_token": "creature",
            "steps": 100,
            "batch_size": 4,
            "lora_rank": 4,
            "lora_lr": 5e-4,
            "embedding_lr": 1e-3,
            "row_norm_cap": 1.0,
        },
        "convergence": {
            "d_conv_relative": 0.45,
            "patience": 2,
            "return_best": True,
            "max_saturation_rise": 0.3,
        },
    }
