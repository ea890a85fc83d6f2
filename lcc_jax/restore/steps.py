"""RestoreLCC step by step, in memory: `lcc_jax.restore` runs these in order; the job folder (`pipeline`)
runs the same functions and keeps each result on disk, so an interrupted job resumes.

    samples -> training_data, probing_pairs -> dense_captures (dense model) -> pruned_captures (pruned model)
            -> components -> probes -> init -> train -> fold

Each step takes the `RestoreConfig` and returns plain values (numpy arrays, dataclasses, a model), so a
researcher can stop after any of them, change one and go on.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from lcc_jax.data.instructions import load_instructions
from lcc_jax.restore.config import RestoreConfig
from lcc_jax.restore.job_folder import RestoreError
from lcc_jax.train import TrainingData, TrainingDataError, encode_training_data, fit

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
    from lcc_jax.data.negatives import make_pairs, negatives_embedder

    embedder = negatives_embedder(config.negatives, dense, tokenizer)
    return make_pairs(samples, embedder, limit=config.num_probe, model=dense, tokenizer=tokenizer)


def dense_captures(config: RestoreConfig, dense, tokenizer, pairs, mesh: Mesh | None = None):
    """CaptureSet of the DENSE model's last-token head outputs on q, q+r⁺ and q+r⁻."""
    from lcc_jax.restore.capture import capture_dense

    return capture_dense(dense, tokenizer, pairs, config.capture_batch_size, mesh=mesh,
                         max_length=config.capture_length)


def pruned_captures(config: RestoreConfig, pruned, tokenizer, pairs, dense, head_map=None,
                    mesh: Mesh | None = None):
    """`dense` (a CaptureSet) completed with the pruned model's head outputs on q (and the structured head map)."""
    from lcc_jax.restore.capture import capture_pruned

    pruned_q = capture_pruned(pruned, tokenizer, pairs, config.capture_batch_size, mesh=mesh,
                              max_length=config.capture_length)
    return dense.replace(pruned_prompt=pruned_q, head_map=head_map)


def components(config: RestoreConfig, captures):
    """Lost components per head: SVD of dense(q) − pruned(q), K = `config.components` summed into c."""
    from lcc_jax.restore.components import lost_components

    dense_q, _, _, pruned_q = captures.aligned()
    return lost_components(dense_q, pruned_q, k=config.components)


def probes(captures, components):
    """Contrastive probes of every head (ProbeResult; `.ranking` is best first)."""
    from lcc_jax.restore.probe import train_probes

    _, positive, negative, pruned_q = captures.aligned()
    return train_probes(pruned_q, components.component, positive, negative)


def init(config: RestoreConfig, components, probes):
    """The untrained Compensation on the top-k heads (or random ones), β and b ~ N(0, init_std), seeded."""
    from lcc_jax.restore.compensation import init_compensation

    return init_compensation(components.basis, probes.ranking, config.top_k, jax.random.key(config.seed),
                             std=config.init_std, mode=config.mode, random_heads=config.random_heads)


def train(config: RestoreConfig, model, data, compensation, *, mesh: Mesh | None = None,
          checkpoint_dir: str | None = None):
    """Train β and b of `compensation` on the pruned `model` (frozen): (trained Compensation, TrainResult).

    `data` is `training_data(...)`; with `checkpoint_dir`, training resumes from its latest checkpoint.
    """
    from lcc_jax.restore.compensation import merge_trainable, split_trainable

    trainable, frozen = split_trainable(compensation)
    settings = config.train_config()
    result = fit(model, trainable, apply_compensation, data.epoch_batches(settings), settings, valid_batches=data.valid,
                 checkpoint_dir=checkpoint_dir, mesh=mesh, constants=frozen)
    return merge_trainable(result.trainable, frozen), result


def apply_compensation(model, trainable, tokens, mask, *, constants, remat=False):
    """`fit`'s apply function for RestoreLCC: the pruned model with δ added at every head's o_proj input."""
    from lcc_jax.restore.compensation import to_dense

    delta = to_dense(trainable, constants, model.config)  # (layers, heads, head_dim)
    return model(tokens, mask, compensation=delta.astype(model.dtype), remat=remat).logits


def fold(model, compensation, masks: dict[str, Any]):
    """A new model with the compensation folded into o_proj's bias; refuses one whose zeros changed."""
    from lcc_jax.pruning.masks import masks_from_zeros
    from lcc_jax.restore.compensation import dense_compensation
    from lcc_jax.restore.fold import fold_compensation

    restored = fold_compensation(model, dense_compensation(compensation, model.config))
    after = masks_from_zeros(restored, list(masks))
    changed = [p for p in masks if bool(jnp.any(after[p] & ~masks[p]))]
    if changed:
        raise RestoreError(f"folding revived pruned weights in {changed}; this is a bug, please report it.")
    return restored
