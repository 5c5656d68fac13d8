"""`IterativeIdentityExtractor`: Algorithm 1 of "The Chosen One", composed from five stages.

    Θ ← no identity
    for i in 0 .. max_iterations-1:
        S ← generate(prompt_i, N seeds, Θ)    # i = 0: the user's prompt; later: with Θ's token
        E ← embed(S)
        if i > 0 and converged(E): stop
        clusters ← k-means++(E, K = N // d_size_c)
        c* ← most cohesive cluster with ≥ d_min_c members
        Θ ← refine(Θ, S[c*])                          # warm start from the previous Θ
    return Θ

Options beyond the paper, all off by default (`consistent_char.convergence` and the config's
descriptions say what each does): converge only near the character chosen at iteration 0
(``convergence.max_anchor_ratio``), stop when the spread stops falling
(``convergence.patience``) or the images over-saturate (``convergence.max_saturation_rise``),
return the best iteration's identity
(``convergence.return_best``), refine from the base model each time (``warm_start: false``)
and DreamBooth's prior preservation on iteration 0's images (``refiner.prior_preservation``).

Everything a run produces goes to its run directory as it is made, so `extract(..., resume=True)`
continues a cut run from its last finished step and reaches the same identity.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from consistent_char.clusterers.selection import choose_cluster, saved_members
from consistent_char.config import ExtractorConfig
from consistent_char.convergence import (
    PerVariationCriterion,
    anchor_distance,
    anchored,
    best_iteration,
    final_stop_reason,
    mean_saturation,
    saturated,
    stop_reason,
)
from consistent_char.generation import accepts, generate_images
from consistent_char.identity import Identity
from consistent_char.interfaces import (
    Clusterer,
    ConvergenceCriterion,
    Embedder,
    ExtractionResult,
    Generator,
    IterationRecord,
    Refiner,
)
from consistent_char.loop_state import (
    LoopState,
    check_embeddings,
    check_prompt,
    default_run_name,
    json_floats,
    load_identity,
    load_last_identity,
    mark_step,
    open_run,
)
from consistent_char.progress import ProgressCallback, ProgressEvent, ProgressReporter
from consistent_char.provenance import run_metadata
from consistent_char.report import build_report
from consistent_char.rundir import RunDirectory, RunState, Step
from consistent_char.seeds import image_seed, stage_seed

logger = logging.getLogger(__name__)


class IterativeIdentityExtractor:
    """Finds a consistent identity for a prompt by generate → embed → cluster → refine.

    Args:
        generator: Draws images (`Generator` protocol), e.g. `SDXLGenerator`.
        embedder: Maps images to vectors (`Embedder`), e.g. `DINOv2Embedder`.
        clusterer: k-means (`Clusterer`), e.g. `FaissKMeansClusterer`.
        refiner: Learns the identity (`Refiner`), e.g. `TextualInversionLoRARefiner`.
        criterion: Stops the loop (`ConvergenceCriterion`), e.g. `PairwiseDistanceCriterion`.
        config: Loop settings (N, d_size_c, d_min_c, max_iterations, seed, prompt template). The
            stage sections of the config are used only by `from_config`.

    Example:
        >>> config = ExtractorConfig.build({"model": "toy"})  # doctest: +SKIP
        >>> extractor = IterativeIdentityExtractor.from_config(config)  # doctest: +SKIP
        >>> result = extractor.extract("a creature", run_dir="runs/demo")  # doctest: +SKIP
        >>> result.identity.save("my_creature")  # doctest: +SKIP
    """

    def __init__(
        self,
        generator: Generator,
        embedder: Embedder,
        clusterer: Clusterer,
        refiner: Refiner,
        criterion: ConvergenceCriterion,
        *,
        config: ExtractorConfig | None = None,
    ):
        self.generator = generator
        self.embedder = embedder
        self.clusterer = clusterer
        self.refiner = refiner
        self.criterion = criterion
        self.config = config or ExtractorConfig()
        self._progress = ProgressReporter(None)

    @classmethod
    def from_config(cls, config: ExtractorConfig) -> IterativeIdentityExtractor:
        """Builds the default stages the config names and loads their models."""
        from consistent_char.stages import build_stages

        stages = build_stages(config)
        return cls(*stages, config=config)

    # ------------------------------------------------------------------ loop

    def extract(
        self,
        prompt: str,
        *,
        run_dir: str | os.PathLike[str] | None = None,
        resume: bool = False,
        callback: ProgressCallback | None = None,
    ) -> ExtractionResult:
        """Runs Algorithm 1 for `prompt` and returns the identity with the run's history.

        Args:
            prompt: What to draw, e.g. ``"a watercolor fox with a scarf"``.
            run_dir: Where images, embeddings, clusters, identities and the state go. Without
                one, nothing is written and a run cannot be resumed. It must be new, empty, or
                (with `resume`) a run; one process at a time writes it (`RunDirectory.lock`).
            resume: Continue the run in `run_dir` from its last finished step, after checking
                its files (`RunDirectory.verify`). Its config must equal this extractor's
                config (the error names the fields that differ).
            callback: Called with a `ProgressEvent` at each stage start, progress and end and
                after each iteration. An exception it raises stops the run; what was finished
                stays on disk for `resume`.

        Raises:
            consistent_char.errors.UserError: A bad prompt or run directory, a run another
                process is writing, or a refiner setting the models cannot take (a token
                already in the tokenizer, an unknown LoRA module), all found before any image
                is drawn.
        """
        prompt = check_prompt(prompt)
        run = RunDirectory(run_dir) if run_dir is not None else None
        if run is not None:
            run.check(prompt, self.config, resume=resume)
        # What a stage can find wrong before drawing anything (a taken token, a LoRA module the
        # UNet lacks) would otherwise surface only after iteration 0's images.
        check_ready = getattr(self.refiner, "check_ready", None)
        if callable(check_ready):
            check_ready()
        if run is None:
            return self._extract(prompt, None, resume, callback)
        with run.lock():
            return self._extract(prompt, run, resume, callback)

    def _extract(
        self,
        prompt: str,
        run: RunDirectory | None,
        resume: bool,
        callback: ProgressCallback | None,
    ) -> ExtractionResult:
        self._progress = ProgressReporter(callback)
        loop = self._start(prompt, run, resume)
        for i in range(loop.start, self.config.max_iterations):
            if loop.state.finished or self._iteration(loop, i):
                break
        return self._finish(loop)

    def _iteration(self, loop: LoopState, i: int) -> bool:
        """One pass of Algorithm 1's loop body; True when the loop stops at this iteration."""
        cfg = self.config
        record = loop.history[i] if i < len(loop.history) else None
        seconds: dict[str, float] = dict(record.seconds) if record else {}

        # 1. The prompt: the user's words at i = 0, then with the learned token (its LoRA is
        #    active too), so each iteration samples around the current identity. With
        #    prompt_variations, image j draws variation j mod their number.
        identity = loop.identity
        prompt_i, prompts_i = self._prompts(loop.prompt, loop.variations, identity)
        seeds = [image_seed(cfg.seed, i, j) for j in range(cfg.num_images)]

        # 2. S ← Generator(prompt_i, seeds, Θ)
        with self._progress.stage(i, "generate", cfg.num_images, seconds):
            images = generate_images(
                self.generator, loop.run, loop.state, i, prompts_i, seeds, identity, self._progress
            )
        if i == 0:
            loop.base_images = images  # the base model's own images of the prompt

        # 3. E ← Embedder(S)
        with self._progress.stage(i, "embed", len(images), seconds):
            embeddings = self._embed(loop, i, images)

        # 4. Convergence: the mean pairwise distance of E against d_conv (never at i = 0: there
        #    is no identity to return yet), and the optional guards of `_measure`.
        features = self._features(embeddings, loop.variations)  # what is clustered
        record = self._measure(loop, i, prompt_i, seeds, images, embeddings, features, seconds)
        conv = cfg.convergence
        reason = stop_reason(loop.history[:i] + [record], conv.patience, conv.max_saturation_rise)
        if reason is not None:
            self._stop(loop, i, record, reason)
            return True

        # 5. Cluster E into K = N // d_size_c groups (k-means++), then
        # 6. c* ← the most cohesive cluster with at least d_min_c members.
        with self._progress.stage(i, "cluster", 1, seconds):
            chosen = self._choose(loop, i, features, record)

        # 7. Θ ← Refiner(Θ, S[c*]): continue from the previous identity (warm start).
        #    With core_size, S[c*] is the chosen cluster's densest core_size images. With
        #    accumulate_chosen, on S[c*] and every earlier iteration's chosen images.
        members = [(images[j], loop.variations[j]) for j in chosen]
        if cfg.accumulate_chosen:
            members = loop.earlier + members
            loop.earlier = members
        with self._progress.stage(i, "refine", cfg.refiner.steps, seconds):
            start_from = identity if cfg.warm_start else None
            loop.identity = self._refine(
                loop.run, loop.state, i, start_from, members, self._prior(loop)
            )
        loop.learned[i] = loop.identity

        record.seconds = seconds
        loop.history = loop.history[:i] + [record]
        self._finish_iteration(loop.run, loop.state, i, "refined", loop.history, record)
        return False

    def _stop(self, loop: LoopState, i: int, record: IterationRecord, reason: str) -> None:
        """Ends the loop at iteration i, before clustering: its record is the last."""
        logger.info(
            "iteration %d: spread %.4f (%.4f): %s", i, record.spread, record.threshold, reason
        )
        loop.history = loop.history[:i] + [record]
        loop.converged = record.converged
        self._finish_iteration(loop.run, loop.state, i, "clustered", loop.history, record)

    def _start(self, prompt: str, run: RunDirectory | None, resume: bool) -> LoopState:
        """The loop's state at its first iteration: fresh, or read back from a cut run."""
        state = open_run(run, prompt, self.config, resume)
        variations = self._variations(prompt)  # image j's prompt, before the token
        criterion = self.criterion
        if self.config.convergence.per_variation and self.config.prompt_variations:
            criterion = PerVariationCriterion(self.criterion, tuple(variations))
        start = state.iteration if state.step != "refined" else state.iteration + 1
        start = max(start, 0)
        return LoopState(
            prompt=prompt,
            run=run,
            state=state,
            start=start,
            history=[IterationRecord.from_dict(r) for r in state.history],
            variations=variations,
            criterion=criterion,
            identity=load_last_identity(run, state),
            anchor=self._load_anchor(run, state),
            # With accumulate_chosen: the chosen members of the iterations before this one.
            earlier=self._earlier_chosen(run, state, start, variations),
            converged=state.converged,
        )

    def _embed(self, loop: LoopState, i: int, images: list[Image.Image]) -> np.ndarray:
        run, state = loop.run, loop.state
        if run is not None and state.done(i, "embedded"):
            return run.load_embeddings(i)
        embeddings = check_embeddings(self.embedder.embed(images), len(images))
        if run is not None:
            run.save_embeddings(i, embeddings)
            mark_step(run, state, i, "embedded", loop.history)
        return embeddings

    def _measure(
        self,
        loop: LoopState,
        i: int,
        prompt_i: str,
        seeds: list[int],
        images: list[Image.Image],
        embeddings: np.ndarray,
        features: np.ndarray,
        seconds: dict[str, float],
    ) -> IterationRecord:
        """Iteration i's record: the spread against the threshold, and whether it converged.

        The optional guards: converge only near iteration 0's chosen character
        (`max_anchor_ratio`), never on over-saturated images (`max_saturation_rise`). With
        `per_variation`, the spread is measured within each prompt variation and averaged.
        """
        conv = self.config.convergence
        history, anchor = loop.history, loop.anchor
        spread = float(loop.criterion.spread(embeddings))
        record = IterationRecord(
            iteration=i,
            prompt=prompt_i,
            seeds=seeds,
            spread=spread,
            threshold=float(loop.criterion.threshold([r.spread for r in history[:i]] + [spread])),
            converged=False,
            seconds=seconds,
            anchor_distance=None if anchor is None else anchor_distance(features, anchor[0]),
            # Measured only for the guard: 128 images at 1024² take about 2 s on this CPU.
            saturation=None if conv.max_saturation_rise is None else mean_saturation(images),
        )
        washed_out = i > 0 and saturated(record, history[0].saturation, conv.max_saturation_rise)
        kept = anchored(record, None if anchor is None else anchor[1], conv.max_anchor_ratio)
        record.converged = (
            i > 0
            and kept
            and not washed_out
            and bool(loop.criterion.converged(embeddings, history[:i]))
        )
        return record

    def _choose(
        self, loop: LoopState, i: int, features: np.ndarray, record: IterationRecord
    ) -> np.ndarray:
        """Clusters iteration i, records the choice, and returns the indices to learn from."""
        labels, choice = self._cluster(loop.run, loop.state, i, features, loop.variations)
        record.cluster_sizes = choice.sizes
        record.cluster_cohesions = json_floats(choice.cohesions)
        record.chosen_cluster = choice.index
        record.chosen_cohesion = choice.cohesion
        record.chosen_reason = choice.reason
        members = choice.members(labels)
        if i == 0:
            loop.anchor = (features[members].mean(axis=0), float(choice.cohesion))
        if loop.run is not None and not loop.state.done(i, "clustered"):
            mark_step(loop.run, loop.state, i, "clustered", loop.history[:i] + [record])
        return members

    def _prior(self, loop: LoopState) -> list[tuple[Image.Image, str]] | None:
        """Iteration 0's images with their prompts, for prior preservation."""
        if loop.base_images is None and self.config.refiner.prior_preservation > 0:
            assert loop.run is not None  # only a resumed run starts past iteration 0
            loop.base_images = loop.run.load_images(0, self.config.num_images)
        if loop.base_images is None:
            return None
        return list(zip(loop.base_images, loop.variations, strict=True))

    def _finish(self, loop: LoopState) -> ExtractionResult:
        """Picks the identity to return, saves it with the history, and writes the report."""
        conv = self.config.convergence
        identity, history, run = loop.identity, loop.history, loop.run
        if identity is None:  # only when a finished run is opened again with nothing learned
            raise RuntimeError("the run finished without learning an identity")
        if conv.return_best:
            best = best_iteration(
                history,
                None if loop.anchor is None else loop.anchor[1],
                conv.max_anchor_ratio,
                conv.max_saturation_rise,
            )
            if best is not None:
                # Iteration `best`'s images were drawn by the identity learned just before it.
                identity = loop.learned.get(best - 1) or load_identity(run, best - 1)
        identity.metadata = run_metadata(self.config, loop.prompt, history, loop.converged)
        if run is not None:
            identity.save(run.identity_dir)
            loop.state.finished = True
            loop.state.converged = loop.converged
            loop.state.history = [r.to_dict() for r in history]
            run.write_state(loop.state)
            # The report is a by-product: failing to draw it must never fail the run.
            try:
                build_report(run.root)
            except Exception:
                logger.warning("could not write the report of %s", run.root, exc_info=True)
        return ExtractionResult(
            identity=identity,
            history=history,
            converged=loop.converged,
            run_dir=str(run.root) if run is not None else None,
            stop_reason=final_stop_reason(history, conv.patience, conv.max_saturation_rise),
        )

    # ------------------------------------------------------------- the steps

    def _new_token(self) -> str:
        """The token a new identity will have: the refiner's own (a refiner built apart from
        the config may have another), else the config's ``refiner.token``."""
        token = getattr(self.refiner, "token", None)
        return token if isinstance(token, str) and token else self.config.refiner.token

    def _prompts(
        self, prompt: str, variations: list[str], identity: Identity | None
    ) -> tuple[str, list[str]]:
        """The iteration's prompt and each image's: as given, or with the identity's token."""
        if identity is None:
            return prompt, list(variations)
        token = identity.token
        return self._identity_prompt(prompt, token), [
            self._identity_prompt(p, token) for p in variations
        ]

    def _identity_prompt(self, prompt: str, token: str) -> str:
        return self.config.identity_prompt_template.format(token=token, prompt=prompt)

    def _features(self, embeddings: np.ndarray, variations: Sequence[str]) -> np.ndarray:
        """What is clustered: the embeddings, or with `centre_variations` each image's minus
        the mean of the images drawn from the same prompt variation; with the clusterer's
        ``distance: cosine``, scaled to unit length, so that Euclidean distances between them
        order pairs as cosine distances do."""
        if not self.config.centre_variations and self.config.clusterer.distance == "euclidean":
            return embeddings
        out = np.array(embeddings, dtype=np.float32, copy=True)
        if self.config.centre_variations:
            keys = np.asarray(variations)
            for key in set(variations):
                rows = keys == key
                out[rows] -= out[rows].mean(axis=0)
        if self.config.clusterer.distance == "cosine":
            norms = np.linalg.norm(out, axis=1, keepdims=True)
            # A zero row (an image equal to its variation's mean) has no direction; it stays 0.
            np.divide(out, norms, out=out, where=norms > 0)
        return out

    def _earlier_chosen(
        self, run: RunDirectory | None, state: RunState, start: int, variations: Sequence[str]
    ) -> list[tuple[Image.Image, str]]:
        """The chosen members (image, variation) of iterations 0 .. start-1 of a resumed run,
        read back from its folder; empty unless `accumulate_chosen` is set."""
        if run is None or state.finished or not self.config.accumulate_chosen:
            return []
        pool: list[tuple[Image.Image, str]] = []
        for i in range(start):
            saved = run.load_clusters(i)
            images = run.load_images(i, self.config.num_images)
            pool += [(images[j], variations[j]) for j in saved_members(saved)]
        return pool

    def _variations(self, prompt: str) -> list[str]:
        """Image j's prompt before the token: the prompt alone (Algorithm 1), or the
        configured variation j mod their number."""
        n, templates = self.config.num_images, self.config.prompt_variations
        if not templates:
            return [prompt] * n
        return [templates[j % len(templates)].format(prompt=prompt) for j in range(n)]

    def _cluster(
        self,
        run: RunDirectory | None,
        state: RunState,
        iteration: int,
        embeddings: np.ndarray,
        variations: Sequence[str],
    ) -> tuple[np.ndarray, Any]:
        cfg = self.config
        if run is not None and state.done(iteration, "clustered"):
            saved = run.load_clusters(iteration)
            labels = np.asarray(saved["labels"], dtype=np.int64)
            centroids = np.asarray(saved["centroids"], dtype=np.float32)
        else:
            labels, centroids = self.clusterer.cluster(
                embeddings, cfg.num_clusters, stage_seed(cfg.seed, iteration, "cluster")
            )
        groups = np.asarray(variations) if cfg.core_spans_variations else None
        choice = choose_cluster(embeddings, labels, centroids, cfg.d_min_c, cfg.core_size, groups)
        if choice.reason == "largest_fallback":
            logger.warning(
                "iteration %d: no cluster has d_min_c=%d members (sizes %s); taking the largest",
                iteration,
                cfg.d_min_c,
                choice.sizes,
            )
        if run is not None and not state.done(iteration, "clustered"):
            run.save_clusters(
                iteration,
                {
                    "k": cfg.num_clusters,
                    "labels": labels.tolist(),
                    "centroids": centroids.tolist(),
                    "sizes": choice.sizes,
                    "cohesions": json_floats(choice.cohesions),
                    "chosen": choice.index,
                    "reason": choice.reason,
                    "core": choice.core,
                },
            )
        return labels, choice

    def _refine(
        self,
        run: RunDirectory | None,
        state: RunState,
        iteration: int,
        identity: Identity | None,
        members: list[tuple[Image.Image, str]],
        base: list[tuple[Image.Image, str]] | None,
    ) -> Identity:
        """Θ ← Refiner(Θ, S[c*]). `members` and `base` pair each image with the prompt it was
        drawn from (before the token); a member's caption is that prompt with the token."""
        if run is not None and state.done(iteration, "refined"):
            return Identity.load(run.iteration_identity_dir(iteration))
        token = identity.token if identity is not None else self._new_token()
        kwargs: dict[str, Any] = {}
        if base and self.config.refiner.prior_preservation > 0:
            if not accepts(self.refiner.refine, "prior_images"):
                raise ValueError(
                    "refiner.prior_preservation is set, but this refiner's refine() takes no "
                    "prior_images"
                )
            # The base model's own images of the prompt: iteration 0's, without the token.
            kwargs["prior_images"] = [image for image, _ in base]
            kwargs["prior_captions"] = [text for _, text in base]
        if accepts(self.refiner.refine, "callback"):

            def progress(step: int, total: int, loss: float) -> None:
                self._progress.emit("progress", iteration, "refine", done=step, total=total)

            kwargs["callback"] = progress
        new = self.refiner.refine(
            identity,
            [image for image, _ in members],
            [self._identity_prompt(text, token) for _, text in members],
            seed=stage_seed(self.config.seed, iteration, "refine"),
            **kwargs,
        )
        if run is not None:
            new.save(run.iteration_identity_dir(iteration))
        return new

    # -------------------------------------------------------- run directory

    def _load_anchor(
        self, run: RunDirectory | None, state: RunState
    ) -> tuple[np.ndarray, float] | None:
        """Iteration 0's chosen cluster (centroid of its members, cohesion), once clustered."""
        if run is None or not state.done(0, "clustered"):
            return None
        # Recomputed from the saved clustering rather than read from the history, which a
        # resume may have cut back to before iteration 0 was recorded.
        variations = self._variations(state.prompt)
        features = self._features(run.load_embeddings(0), variations)
        labels, choice = self._cluster(run, state, 0, features, variations)
        chosen = features[choice.members(labels)]
        return chosen.mean(axis=0), float(choice.cohesion)

    def _finish_iteration(
        self,
        run: RunDirectory | None,
        state: RunState,
        iteration: int,
        step: Step,
        history: list[IterationRecord],
        record: IterationRecord,
    ) -> None:
        if run is not None:
            state.converged = record.converged
            mark_step(run, state, iteration, step, history)
        logger.info(
            "iteration %d: spread %.4f (threshold %.4f), chosen cluster %s of sizes %s",
            iteration,
            record.spread,
            record.threshold,
            record.chosen_cluster,
            record.cluster_sizes,
        )
        self._progress.emit("iteration_end", iteration, record=record)


__all__ = [
    "IterativeIdentityExtractor",
    "ProgressEvent",
    "default_run_name",
    "image_seed",
    "stage_seed",
]
