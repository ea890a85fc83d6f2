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

import dataclasses
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from lcc_jax.data.calibration import CalibrationConfig
from lcc_jax.errors import UserError
from lcc_jax.eval.perplexity import perplexity
from lcc_jax.eval.zeroshot import zeroshot
from lcc_jax.fields import described
from lcc_jax.pruning.api import PruneConfig, PruneResult
from lcc_jax.pruning.api import prune as prune_model
from lcc_jax.restore.steps import RestoreResult, restore

__all__ = ["EvalConfig", "EvalResult", "RestoreResult", "evaluate", "prune", "restore"]


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
    config = dataclasses.replace(config or EvalConfig(), **overrides)
    ppl = None
    if config.text is not None:
        ppl = perplexity(model, tokenizer, config.text, config.seqlen, limit_chunks=config.limit_chunks, mesh=mesh)
    scores = None
    if config.tasks:
        scores = zeroshot(model, tokenizer, config.tasks, limit=config.limit, batch_size=config.batch_size, mesh=mesh)
    return EvalResult(perplexity=ppl, zeroshot=scores, config=config)
