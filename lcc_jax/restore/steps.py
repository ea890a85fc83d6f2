"""RestoreLCC step by step, in memory: `lcc_jax.restore` runs these in order; the job folder (`pipeline`)
runs the same functions and keeps each result on disk, so an interrupted job resumes.

    samples -> training_data, probing_pairs -> dense_captures (dense model) -> pruned_captures (pruned model)
            -> components -> probes -> init -> train -> fold

Each step takes the `RestoreConfig` and returns plain values (numpy arrays, dataclasses, a model), so a
researcher can stop after any of them, change one and go on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from lcc_jax.data.instructions import load_instructions
from lcc_jax.data.negatives import make_pairs, negatives_embedder
from lcc_jax.pruning.masks import masks_from_zeros
from lcc_jax.restore.capture import capture_dense, capture_pruned, model_embedder
from lcc_jax.restore.compensation import (
    dense_compensation,
    init_compensation,
    lowest_layer,
    merge_trainable,
    num_trainable,
    split_trainable,
    to_dense,
)
from lcc_jax.restore.components import lost_components
from lcc_jax.restore.config import RestoreConfig
from lcc_jax.restore.fold import fold_compensation
from lcc_jax.restore.job_folder import RestoreError
from lcc_jax.restore.probe import ProbeConfig, spread_over_layers, train_probes
from lcc_jax.train import TrainingData, TrainingDataError, encode_training_data, fit, precompile_fit

log = logging.getLogger(__name__)


def check_top_k(config: RestoreConfig, model_config, name: str) -> None:
    """Refuse a `top_k` count the model cannot give (before hours of capture and pruning)."""
    top_k, total = config.top_k, model_config.total_heads
    if not top_k.is_fraction and top_k > total:
        raise RestoreError(
            f"--top-k {int(top_k)} asks for more heads than {name} has: {model_config.num_layers} layers x "
            f"{model_config.num_heads} heads = {total}. Pass a count up to {total}, or a fraction such as 0.25."
        )


def samples(config: RestoreConfig) -> list:
    """The first `num_train` samples of `train_data` (the probing pairs are the first `num_probe` of them)."""
    return load_instructions(config.train_data, config.train_split, limit=config.num_train)


def training_data(config: RestoreConfig, tokenizer, train_samples=None) -> TrainingData:
    """`train_samples` (default: `samples(config)`) and `num_valid` samples of `valid_data` encoded for training
    (`train.data.encode_training_data`); refuses a training set in which no sample keeps a response token."""
    if train_samples is None:
        train_samples = samples(config)
    valid = None
    if config.valid_data and config.valid_data != "none":
        valid = load_instructions(config.valid_data, "validation", limit=config.num_valid)
    try:
        return encode_training_data(tokenizer, train_samples, max_length=config.max_length,
                                    batch_size=config.batch_size, valid_samples=valid, name=config.train_data,
                                    valid_name=config.valid_data)
    except TrainingDataError as e:
        raise RestoreError(str(e)) from e


def probing_pairs(config: RestoreConfig, samples, dense, tokenizer) -> list:
    """The first `num_probe` samples as contrastive pairs; negatives as `config.negatives` says (the dense
    model's hidden states when it names the model, or when all-MiniLM-L6-v2 is missing)."""

    def fallback():
        return model_embedder(dense, tokenizer)

    embedder = negatives_embedder(config.negatives, fallback)
    return make_pairs(samples, embedder, limit=config.num_probe, fallback=fallback)


def dense_captures(config: RestoreConfig, dense, tokenizer, pairs, mesh: Mesh | None = None):
    """CaptureSet of the DENSE model's last-token head outputs on q, q+r⁺ and q+r⁻."""
    return capture_dense(dense, tokenizer, pairs, config.capture_batch_size, mesh=mesh,
                         max_length=config.capture_length)


def pruned_captures(config: RestoreConfig, pruned, tokenizer, pairs, dense, head_map=None,
                    mesh: Mesh | None = None):
    """`dense` (a CaptureSet) completed with the pruned model's head outputs on q (and the structured head map)."""
    pruned_q = capture_pruned(pruned, tokenizer, pairs, config.capture_batch_size, mesh=mesh,
                              max_length=config.capture_length)
    return dense.replace(pruned_prompt=pruned_q, head_map=head_map)


def components(config: RestoreConfig, captures):
    """Lost components per head: SVD of dense(q) − pruned(q), K = `config.components` summed into c."""
    dense_q, _, _, pruned_q = captures.aligned()
    return lost_components(dense_q, pruned_q, k=config.components)


def probes(captures, components, seed: int = 0):
    """Contrastive probes of every head (ProbeResult; `.ranking` is best first), initialised from `seed`."""
    _, positive, negative, pruned_q = captures.aligned()
    return train_probes(pruned_q, components.component, positive, negative, ProbeConfig(init_seed=seed))


def init(config: RestoreConfig, components, probes, num_layers: int):
    """The untrained Compensation on the top-k heads (or random ones), β and b ~ N(0, init_std), seeded."""
    return init_compensation(components.basis, head_ranking(config, probes, num_layers), config.top_k,
                             jax.random.key(config.seed), std=config.init_std, mode=config.mode,
                             random_heads=config.random_heads)


def head_ranking(config: RestoreConfig, probes, num_layers: int) -> np.ndarray:
    """(L·H,) heads best first: the probes' ranking, in rounds over the `num_layers` layers with `spread_heads`."""
    ranking = probes.ranking
    if not config.spread_heads:
        return ranking
    if len(ranking) % num_layers:
        raise RestoreError(f"--spread-heads needs the same number of heads in every layer; {len(ranking)} heads "
                           f"do not divide into {num_layers} layers. Leave --spread-heads off for this model.")
    return spread_over_layers(ranking, len(ranking) // num_layers)


def train(config: RestoreConfig, model, data, compensation, *, mesh: Mesh | None = None,
          checkpoint_dir: str | None = None):
    """Train β and b of `compensation` on the pruned `model` (frozen): (trained Compensation, TrainResult).

    `data` is `training_data(...)`; with `checkpoint_dir`, training resumes from its latest checkpoint.
    """
    trainable, frozen = split_trainable(compensation)
    settings = config.train_config()
    result = fit(model, trainable, apply_compensation, data.epoch_batches(settings), settings, valid_batches=data.valid,
                 checkpoint_dir=checkpoint_dir, mesh=mesh, constants=frozen,
                 stop_backward_at=lowest_layer(compensation, model.config))
    trained = jax.tree.map(lambda x: x.astype(jnp.float32), result.trainable)  # exact for bfloat16 parameters
    return merge_trainable(trained, frozen), result


def precompile_train(config: RestoreConfig, model, data, compensation, *, mesh: Mesh | None = None):
    """Compile `train`'s step for these arguments on a thread (`train.precompile_fit`); returns its Future.

    `train` with the same arguments then compiles nothing (or waits for what is still compiling).
    """
    trainable, frozen = split_trainable(compensation)
    settings = config.train_config()
    return precompile_fit(model, trainable, apply_compensation, data.epoch_batches(settings), settings, mesh=mesh,
                          constants=frozen, stop_backward_at=lowest_layer(compensation, model.config))


def apply_compensation(model, trainable, tokens, mask, *, constants, remat=False, stop_backward_at=0):
    """`fit`'s apply function for RestoreLCC: the pruned model with δ added at every head's o_proj input."""
    delta = to_dense(trainable, constants, model.config)  # (layers, heads, head_dim)
    return model(tokens, mask, compensation=delta.astype(model.dtype), remat=remat,
                 stop_backward_at=stop_backward_at).logits


def fold(model, compensation, masks: dict[str, Any]):
    """A new model with the compensation folded into o_proj's bias; refuses one whose zeros changed."""
    restored = fold_compensation(model, dense_compensation(compensation, model.config))
    after = masks_from_zeros(restored, list(masks))
    changed = [p for p in masks if bool(jnp.any(after[p] & ~masks[p]))]
    if changed:
        raise RestoreError(f"folding revived pruned weights in {changed}; this is a bug, please report it.")
    return restored


# ----------------------------------------------------------------------------------- all of them


@dataclasses.dataclass(frozen=True)
class RestoreResult:
    """What `restore` found and trained; `model` is the restored model, ready to evaluate or save."""

    model: Any  # CausalLM: the pruned model with the compensation folded into o_proj's bias (sparsity unchanged)
    compensation: Any  # restore.compensation.Compensation: trained β and b on the chosen heads (unfolded)
    heads: np.ndarray  # (k,) the compensated heads, index l·H + h, in the order `head_ranking` gave them
    components: Any  # restore.components.LostComponents: per-head lost components (SVD of dense − pruned)
    probes: Any  # restore.probe.ProbeResult: every head's probe accuracy and the ranking it gives
    history: dict[str, list[float]]  # training: loss, lr, grad_norm per step; valid_loss per epoch
    config: RestoreConfig
    timings: dict[str, float] = dataclasses.field(default_factory=dict)  # seconds per step

    @property
    def trainable_params(self) -> int:
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
    config = dataclasses.replace(config or RestoreConfig(), **overrides)
    model, masks, head_map = _pruned_parts(dense, pruned)
    check_top_k(config, model.config, "the pruned model")
    timings: dict[str, float] = {}
    with _timed(timings, "data"):
        drawn = samples(config)
        data = training_data(config, tokenizer, drawn)
    with _timed(timings, "pairs"):
        pairs = probing_pairs(config, drawn, dense, tokenizer)
    with _timed(timings, "dense_capture"):
        captures = dense_captures(config, dense, tokenizer, pairs, mesh)
    with _timed(timings, "pruned_capture"):
        captures = pruned_captures(config, model, tokenizer, pairs, captures, head_map, mesh)
    with _timed(timings, "components"):
        lost = components(config, captures)
    with _timed(timings, "probes"):
        probed = probes(captures, lost, config.probe_seed)
    with _timed(timings, "train"):
        compensation, trained = train(config, model, data, init(config, lost, probed, model.config.num_layers),
                                      mesh=mesh)
    with _timed(timings, "fold"):
        restored = fold(model, compensation, masks)
    result = RestoreResult(model=restored, compensation=compensation, heads=np.asarray(compensation.heads),
                           components=lost, probes=probed, history=trained.history, config=config,
                           timings=timings)
    log.info("restored: %d heads, %d trainable parameters; %s", compensation.num_heads, result.trainable_params,
             ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    return result


def _pruned_parts(dense, pruned):
    """(pruned model, masks, head map) of a PruneResult, a pruned checkpoint or a bare model."""
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


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - start, 3)
