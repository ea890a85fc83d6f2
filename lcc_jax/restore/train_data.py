"""RestoreLCC's training and validation data, encoded once, shared by the pipeline and the baselines.

The reference trains on prompt + response with no EOS and loss on the response only (trl's
completion-only collator on the "text" field); validation is the held-out Alpaca split.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

from lcc_jax.data.batching import Batch, make_batches
from lcc_jax.errors import UserError
from lcc_jax.restore.config import RestoreConfig

log = logging.getLogger(__name__)


class TrainingDataError(UserError):
    """Training data that cannot train anything (every response cut off by max_length)."""


@dataclasses.dataclass(frozen=True)
class TrainingData:
    """Encoded training samples (for `train.epoch_batches`) and the validation batches (or None)."""

    sequences: list[list[int]]
    loss_masks: list[list[float]]
    valid: list[Batch] | None
    pad_id: int

    def epoch_batches(self, train_config):
        """`fit`'s train_batches_fn: a fresh shuffle per epoch by the config's seed and batch size."""
        from lcc_jax.restore.train import epoch_batches

        return epoch_batches(self.sequences, self.loss_masks, train_config, pad_id=self.pad_id)


def train_config(restore: RestoreConfig, learning_rate: float | None = None):
    """The trainer's configuration for RestoreLCC's budget (epochs, batch, accumulation, dtype, seed);
    `learning_rate` overrides the restore one (the baselines use their own)."""
    from lcc_jax.restore.train_config import TrainConfig

    r = restore
    return TrainConfig(learning_rate=r.learning_rate if learning_rate is None else learning_rate, epochs=r.epochs,
                       batch_size=r.batch_size, grad_accum=r.grad_accum, compute_dtype=r.compute_dtype,
                       remat=r.remat, seed=r.seed)


def pad_id(tokenizer: Any) -> int:
    """The tokenizer's pad token, else its EOS, else 0."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(tokenizer.eos_token_id or 0)


def training_data(restore: RestoreConfig, tokenizer: Any, samples: Sequence[Any] | None = None) -> TrainingData:
    """The first `num_train` samples of `train_data` (or `samples`) and `num_valid` validation samples, encoded.

    Refuses a training set in which no sample keeps a response token; an empty validation set only warns.
    """
    from lcc_jax.data.instructions import load_instructions
    from lcc_jax.data.sft import encode_pairs

    r = restore
    pad = pad_id(tokenizer)
    if samples is None:
        samples = load_instructions(r.train_data, r.train_split, limit=r.num_train)
    # the reference trains on prompt.strip() + response (its capture keeps the prompt as it is)
    sequences, loss_masks = encode_pairs(tokenizer, [s.prompt.strip() for s in samples],
                                         [s.response for s in samples], max_len=r.max_length, add_eos=False)
    if not sequences:
        raise TrainingDataError(
            f"no training sample of {r.train_data!r} keeps a response token within --max-length {r.max_length}: "
            f"all {len(samples)} prompts are at least that long. Raise --max-length or use shorter prompts."
        )
    valid = None
    if r.valid_data and r.valid_data != "none":
        valid_samples = load_instructions(r.valid_data, "validation", limit=r.num_valid)
        v_seq, v_mask = encode_pairs(tokenizer, [s.prompt.strip() for s in valid_samples],
                                     [s.response for s in valid_samples], max_len=r.max_length, add_eos=False)
        valid = make_batches(v_seq, r.batch_size, pad_id=pad, loss_masks=v_mask, order="length")
        if not valid:
            log.warning("no validation sample of %r keeps a response token within --max-length %d: "
                        "training without a validation loss", r.valid_data, r.max_length)
            valid = None
    return TrainingData(sequences, loss_masks, valid, pad)
