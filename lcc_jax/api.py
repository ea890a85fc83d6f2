"""Five verbs for research code, in memory and composable: load, prune, restore, evaluate, save.

    model, tokenizer, _ = lcc_jax.load("smollm2-135m")
    pruned = lcc_jax.prune(nnx.clone(model), tokenizer, sparsity="2:4")             # PruneResult
    result = lcc_jax.restore(model, pruned, tokenizer, top_k=1.0, learning_rate=5e-3)  # RestoreResult
    print(lcc_jax.evaluate(result.model, tokenizer, tasks="boolq").ppl)              # EvalResult
    lcc_jax.save_hf(result.model, tokenizer, "restored_hf/")                         # or save_orbax

Each verb takes its frozen config (`PruneConfig`, `RestoreConfig`, `EvalConfig`; None means the defaults, which
are the papers' settings) and keyword overrides of its fields: `restore(..., top_k=1.0)` runs with
`dataclasses.replace(config or RestoreConfig(), top_k=1.0)`. Each takes `mesh=` (`lcc_jax.make_mesh(...)`).
Nothing is written to disk except by the save verbs; `scripts/restore.py` (`restore.pipeline`) runs the same
steps into a resumable job folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from lcc_jax.fields import described
from lcc_jax.data.calibration import CalibrationConfig
from lcc_jax.errors import UserError
from lcc_jax.pruning.api import PruneConfig, PruneResult
from lcc_jax.restore.config import RestoreConfig
from lcc_jax.restore.job_folder import RestoreError

__all__ = ["EvalConfig", "EvalResult", "RestoreResult", "evaluate", "prune", "restore"]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------- prune


def prune(
    model,
    tokens_or_tokenizer=None,
    config: PruneConfig | None = None,
    *,
    calibration: CalibrationConfig | None = None,
    in_place: bool = True,
    mesh: Mesh | None = None,
    **overrides,
) -> PruneResult:
    """Prune `model` by `config` (default Wanda 50 %) with keyword overrides; returns a `PruneResult`
    (`.model`, `.masks` with True = keep, `.head_map` for structured pruning, `.seconds`).

    Unstructured and N:M pruning (magnitude, wanda, sparsegpt) prune `model` IN PLACE and return it as
    `.model`; structured pruning (flap) returns a new, smaller model and leaves `model` as it was. To keep the
    dense model (for `restore`), pass `in_place=False`: a copy is pruned (twice the memory while both live).
    `nnx.clone(model)` is no copy here: it shares the weight arrays, which pruning donates to its updates.

    `tokens_or_tokenizer`: (nsamples, seqlen) calibration tokens, or a tokenizer to draw them by `calibration`
    (default `CalibrationConfig()`: 128 x 2,048 tokens of the local Alpaca text, seed 0). Magnitude needs neither.
    """
    from lcc_jax.pruning.api import prune as prune_model

    config = dataclasses.replace(config or PruneConfig(), **overrides)
    tokens = None
    if config.needs_calibration and tokens_or_tokenizer is not None:
        tokens = _calibration_tokens(tokens_or_tokenizer, calibration)
    if not in_place and config.method != "flap":  # structured pruning builds a new model anyway
        model = _copy(model)
    return prune_model(model, tokens, config, mesh=mesh)


def _copy(model):
    """The same model with its own weight arrays (same shardings)."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, state))


def _calibration_tokens(source, calibration: CalibrationConfig | None) -> np.ndarray:
    if isinstance(source, (np.ndarray, jax.Array, list, tuple)):
        if calibration is not None:
            raise UserError("calibration= says how to draw tokens with a tokenizer; these are tokens already.")
        return np.asarray(source)
    return (calibration or CalibrationConfig()).tokens(source)


# ----------------------------------------------------------------------------------- restore


@dataclasses.dataclass(frozen=True)
class RestoreResult:
    """What `restore` found and trained; `model` is the restored model, ready to evaluate or save."""

    model: Any  # CausalLM: the pruned model with the compensation folded into o_proj's bias (sparsity unchanged)
    compensation: Any  # restore.compensation.Compensation: trained β and b on the chosen heads (unfolded)
    heads: np.ndarray  # (k,) the compensated heads, index l·H + h, best first by the probes (unless random_heads)
    components: Any  # restore.components.LostComponents: per-head lost components (SVD of dense − pruned)
    probes: Any  # restore.probe.ProbeResult: every head's probe accuracy and the ranking it gives
    history: dict[str, list[float]]  # training: loss, lr, grad_norm per step; valid_loss per epoch
    config: RestoreConfig
    timings: dict[str, float] = dataclasses.field(default_factory=dict)  # seconds per step

    @property
    def trainable_params(self) -> int:
        from lcc_jax.restore.compensation import num_trainable

        return num_trainable(self.compensation)


def restore(
    dense,
    pruned,
    tokenizer,
    config: RestoreConfig | None = None,
    *,
    mesh: Mesh | None = None,
    **overrides,
) -> RestoreResult:
    """RestoreLCC in memory: probe, find and train the compensation of `pruned`, fold it into o_proj's bias.

    `dense` is the model before pruning: its head outputs are the target, so it must still hold the dense
    weights (`lcc_jax.prune` prunes in place unless `in_place=False`). `pruned` is the `PruneResult` of `lcc_jax.prune`
    (its masks and, for structured pruning, head map), a `checkpoint.load_pruned` checkpoint, or a pruned
    model (masks then come from its zeros). `config` (default: the paper's setting; `preset("recipe")` for
    the ablation's) with keyword overrides. Neither input model is changed; nothing is written to disk.
    """
    from lcc_jax.restore import steps

    config = dataclasses.replace(config or RestoreConfig(), **overrides)
    model, masks, head_map = _pruned_parts(dense, pruned)
    steps.check_top_k(config, model.config, "the pruned model")
    timings: dict[str, float] = {}
    with _timed(timings, "data"):
        samples = steps.samples(config)
        data = steps.training_data(config, tokenizer, samples)
    with _timed(timings, "pairs"):
        pairs = steps.probing_pairs(config, samples, dense, tokenizer)
    with _timed(timings, "dense_capture"):
        captures = steps.dense_captures(config, dense, tokenizer, pairs, mesh)
    with _timed(timings, "pruned_capture"):
        captures = steps.pruned_captures(config, model, tokenizer, pairs, captures, head_map, mesh)
    with _timed(timings, "components"):
        components = steps.components(config, captures)
    with _timed(timings, "probes"):
        probes = steps.probes(captures, components)
    with _timed(timings, "train"):
        compensation, trained = steps.train(config, model, data, steps.init(config, components, probes), mesh=mesh)
    with _timed(timings, "fold"):
        restored = steps.fold(model, compensation, masks)
    result = RestoreResult(model=restored, compensation=compensation, heads=np.asarray(compensation.heads),
                           components=components, probes=probes, history=trained.history, config=config,
                           timings=timings)
    log.info("restored: %d heads, %d trainable parameters; %s", compensation.num_heads, result.trainable_params,
             ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    return result


def _pruned_parts(dense, pruned):
    """(pruned model, masks, head map) of a PruneResult, a pruned checkpoint or a bare model."""
    from lcc_jax.pruning.masks import masks_from_zeros

    model = getattr(pruned, "model", pruned)
    if model is dense:
        raise RestoreError(
            "the dense and the pruned model are the same object: lcc_jax.prune prunes in place, so the dense "
            "weights are gone. Prune with lcc_jax.prune(model, ..., in_place=False), or load the model twice."
        )
    if any(x.is_deleted() for x in jax.tree.leaves(nnx.state(dense)) if isinstance(x, jax.Array)):
        raise RestoreError(
            "the dense model's weights were deleted: it shared them with the model that was pruned (nnx.clone "
            "shares arrays, and pruning donates them). Prune with lcc_jax.prune(model, ..., in_place=False)."
        )
    head_map = getattr(pruned, "head_map", None)
    masks = getattr(pruned, "masks", None) or masks_from_zeros(model)
    d, p = dense.config, model.config
    if (d.num_layers, d.head_dim) != (p.num_layers, p.head_dim):
        raise RestoreError(
            f"the pruned model ({p.num_layers} layers, head_dim {p.head_dim}) is not a pruned version of the dense "
            f"one ({d.num_layers} layers, head_dim {d.head_dim})."
        )
    if p.num_heads != d.num_heads and head_map is None:
        raise RestoreError(
            f"the pruned model has {p.num_heads} heads per layer, the dense one {d.num_heads}: pass the PruneResult "
            "of lcc_jax.prune (or a scripts/prune.py checkpoint), which records which dense head each kept head is."
        )
    return model, masks, head_map


# ----------------------------------------------------------------------------------- evaluate


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What `evaluate` measures (defaults: the papers' full WikiText-2 test perplexity and 7-task suite)."""

    text: str | None = described("wikitext2", "perplexity text: wikitext2 | c4 | a text file; None skips perplexity")
    seqlen: int = described(2048, "tokens per perplexity chunk")
    limit_chunks: int | None = described(None, "only the first N chunks (default: all)")
    tasks: str | tuple[str, ...] | None = described("suite", "zero-shot tasks: suite | all | 'boolq,rte' | names; "
                                                    "None skips them")
    limit: int | None = described(None, "zero-shot: only the first N documents of each task (default: all)")
    batch_size: int = described(16, "zero-shot requests per forward pass")

    def __post_init__(self):
        if self.text is None and not self.tasks:
            raise UserError("EvalConfig with text=None and no tasks measures nothing.")
        for name in ("seqlen", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, not {getattr(self, name)}.")
        for name in ("limit_chunks", "limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1 (or None for all), not {getattr(self, name)}.")


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """Perplexity and zero-shot accuracy of one model (either None when its config skipped it)."""

    perplexity: Any  # eval.perplexity.PerplexityResult | None
    zeroshot: Any  # eval.zeroshot.ZeroShotResult | None: per task acc (and acc_norm); .mean, .suite_mean
    config: EvalConfig

    @property
    def ppl(self) -> float | None:
        return None if self.perplexity is None else self.perplexity.ppl

    @property
    def accuracy(self) -> float | None:
        """Mean zero-shot acc over the tasks evaluated."""
        return None if self.zeroshot is None else self.zeroshot.mean

    def to_dict(self) -> dict[str, Any]:
        return {"ppl": self.ppl, "perplexity": self.perplexity and self.perplexity.to_dict(),
                "zeroshot": self.zeroshot and self.zeroshot.to_dict(), "config": dataclasses.asdict(self.config)}


def evaluate(model, tokenizer, config: EvalConfig | None = None, *, mesh: Mesh | None = None,
             **overrides) -> EvalResult:
    """Perplexity (the pruning papers' protocol) and zero-shot accuracy (lm-eval prompts) of `model`."""
    from lcc_jax.eval.perplexity import perplexity
    from lcc_jax.eval.zeroshot import zeroshot

    config = dataclasses.replace(config or EvalConfig(), **overrides)
    ppl = None
    if config.text is not None:
        ppl = perplexity(model, tokenizer, config.text, config.seqlen, limit_chunks=config.limit_chunks, mesh=mesh)
    scores = None
    if config.tasks:
        scores = zeroshot(model, tokenizer, config.tasks, limit=config.limit, batch_size=config.batch_size, mesh=mesh)
    return EvalResult(perplexity=ppl, zeroshot=scores, config=config)


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - start, 3)
