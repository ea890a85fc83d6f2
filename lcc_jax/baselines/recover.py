"""The strongest recovery that keeps the sparsity, in memory: LoRA on every projection with its merged update masked
by the pruning mask, trained on RestoreLCC's data and budget.

In the recovery benchmark and the ablation (README, Results: SmolLM2-135M at Wanda 50 %, SparseGPT 2:4 and FLAP
20 %, Qwen2.5-Coder-1.5B at Wanda 50 % and SparseGPT 2:4) this masked LoRA recovered more perplexity than every
RestoreLCC setting run beside it, LoFiT and bias-only, except at Qwen's SparseGPT 2:4, where RestoreLCC's recipe
won; and it keeps every pruned weight at zero, so the sparsity and the inference cost are those of the pruned model.
Its rate chosen on the Alpaca validation loss depends on the model: 1e-3 on SmolLM2 (Wanda 50 %, 3 seeds; it also
beat the recipe on the 7-task mean), 1e-4 on Qwen (Wanda 50 %, bf16; the lowest rate of that grid, where 1e-3 ends
worse than the pruned model). `learning_rate` stays 1e-4, the published LoRA rate; choose it on validation for a new
model (`benchmarks/gpu/lora_rate.sh`, `lcc_jax.benchmark.by_validation`). It changes the kept weights (2.4 M parameters on SmolLM2) where RestoreLCC only adds an o_proj bias (8,704 values).
`recover_lora` is that recovery as the benchmark runs it (`benchmark.methods`, method "masked_lora"); the other
LoRA-family presets are there for comparison and say, in the result's sparsity audit, how many pruned weights their
merge revives.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
from jax.sharding import Mesh

from lcc_jax.baselines.lora import PRESETS, LoraConfig, LoraResult, num_trainable, train_lora
from lcc_jax.baselines.merge import SparsitySurvival, merge_lora, surviving_sparsity
from lcc_jax.errors import UserError
from lcc_jax.pruning.masks import masks_from_zeros
from lcc_jax.restore.config import RestoreConfig
from lcc_jax.restore.steps import training_data

log = logging.getLogger(__name__)

LORA_LEARNING_RATE = 1e-4  # Wanda §5 / DoRA's LLaMA runs; the recovery benchmark's default for every LoRA method


class RecoverError(UserError):
    """A LoRA recovery that cannot run as asked."""


@dataclasses.dataclass(frozen=True)
class LoraRecovery:
    """What `recover_lora` trained; `model` is the recovered model, ready to evaluate or save."""

    model: Any  # CausalLM: the pruned model with the adapter merged into its kernels
    adapter: LoraConfig
    trainable_params: int
    history: dict[str, list[float]]  # training: loss, lr, grad_norm per step; valid_loss per epoch
    sparsity: SparsitySurvival  # the merged model against the pruning masks: `revived` is 0 for a masked adapter
    config: RestoreConfig  # the data and budget it trained on
    seconds: float  # training, compilation included


def recover_lora(
    pruned,
    tokenizer,
    config: RestoreConfig | None = None,
    *,
    adapter: str | LoraConfig = "masked",
    learning_rate: float = LORA_LEARNING_RATE,
    mesh: Mesh | None = None,
    **overrides,
) -> LoraRecovery:
    """Train a LoRA-family adapter on `pruned` and merge it (default: masked LoRA on every projection, r 8).

    `pruned`: the `PruneResult` of `lcc_jax.prune`, a `checkpoint.load_pruned` checkpoint or a pruned model (its
    zeros are then the mask). `config` (default `RestoreConfig()`) with keyword overrides sets the training data and
    budget exactly as for `lcc_jax.restore` (samples, validation, epochs, batch, length, dtype, seed); `adapter` is
    a name of `baselines.PRESETS` ("masked", "wanda", "all", "dora") or a `LoraConfig`. The input model is not
    changed; nothing is written to disk.
    """
    config = config or RestoreConfig()
    if "num_train" in overrides and "num_probe" not in overrides:  # nothing is probed here: num_train alone may shrink
        overrides["num_probe"] = config.unprobed_num_probe(overrides["num_train"], config.num_probe)
    config = dataclasses.replace(config, **overrides)
    lora = _adapter(adapter)
    model = getattr(pruned, "model", pruned)
    masks = getattr(pruned, "masks", None)
    if masks is None:  # a bare model: its zeros are the mask ({} from a structured prune: nothing left to mask)
        masks = masks_from_zeros(model)
    data = training_data(config, tokenizer)
    train_config = config.train_config(learning_rate)
    merged, result = train_merged_lora(model, masks, data.epoch_batches(train_config), data.valid, train_config, lora,
                                       config.seed, mesh)
    sparsity = surviving_sparsity(merged, masks)
    if sparsity.revived:
        log.warning("the merged adapter revived %s pruned weights: %s. adapter='masked' keeps every one at zero.",
                    f"{sparsity.revived:,}", sparsity.summary())
    else:
        log.info("recovered with %s: %s", "masked LoRA" if lora.masked else "LoRA", sparsity.summary())
    return LoraRecovery(model=merged, adapter=lora, trainable_params=num_trainable(result.trainable),
                        history=result.train.history, sparsity=sparsity, config=config,
                        seconds=result.train.seconds)


def train_merged_lora(model, masks, batches, valid, train_config, lora: LoraConfig, seed: int, mesh: Mesh | None
                      ) -> tuple[Any, LoraResult]:
    """Train `lora` on the frozen `model` and merge it: the one path of `recover_lora` and the recovery benchmark's
    LoRA-family cells. `masks` bound the merged update only when `lora.masked` ({} for a structured prune, whose
    removed weights are gone rather than zero)."""
    result = train_lora(model, batches, train_config, lora, jax.random.key(seed),
                        masks=masks if lora.masked else None, valid_batches=valid, mesh=mesh)
    return merge_lora(model, result.trainable, result.setup), result


def _adapter(adapter: str | LoraConfig) -> LoraConfig:
    if isinstance(adapter, LoraConfig):
        return adapter
    if adapter not in PRESETS:
        raise RecoverError(f"unknown adapter {adapter!r}: choose one of {', '.join(map(repr, PRESETS))} or pass a "
                           "lcc_jax.baselines.LoraConfig.")
    return PRESETS[adapter]
