"""Training and validation data, encoded once, shared by RestoreLCC and the baselines.

The reference trains on prompt + response with no EOS and loss on the response only (trl's
completion-only collator on the "text" field); validation is the held-out Alpaca split.
`restore.steps.training_data` draws RestoreLCC's samples by its `RestoreConfig` and encodes them here.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

from lcc_jax.data.batching import Batch, make_batches
from lcc_jax.data.sft import encode_pairs
from lcc_jax.errors import UserError
from lcc_jax.train.config import TrainConfig
from lcc_jax.train.trainer import epoch_batches

log = logging.getLogger(__name__)


class TrainingDataError(UserError):
    """Training data that cannot train anything (every response cut off by max_length)."""


@dataclasses.dataclass(frozen=True)
class TrainingData:
    """Encoded training samples (for `trainer.epoch_batches`) and the validation batches (or None)."""

    sequences: list[list[int]]
    loss_masks: list[list[float]]
    valid: list[Batch] | None
    pad_id: int

    def epoch_batches(self, train_config: TrainConfig):
        """`fit`'s train_batches_fn: a fresh shuffle per epoch by the config's seed and batch size."""
        return epoch_batches(self.sequences, self.loss_masks, train_config, pad_id=self.pad_id)


def pad_id(tokenizer: Any) -> int:
    """The tokenizer's pad token, else its EOS, else 0."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(tokenizer.eos_token_id or 0)


def encode_training_data(
    tokenizer: Any,
    samples: Sequence[Any],
    *,
    max_length: int,
    batch_size: int,
    valid_samples: Sequence[Any] | None = None,
    name: str = "the training data",
    valid_name: str = "the validation data",
) -> TrainingData:
    """Instruction samples (`.prompt`, `.response`) encoded for training, and `valid_samples` as validation batches.

    Refuses a training set in which no sample keeps a response token within `max_length`; an empty
    validation set only warns. `name` and `valid_name` say in messages which data it was.
    """
    pad = pad_id(tokenizer)
    # the reference trains on prompt.strip() + response (its capture keeps the prompt as it is)
    sequences, loss_masks = encode_pairs(tokenizer, [s.prompt.strip() for s in samples],
                                         [s.response for s in samples], max_len=max_length, add_eos=False)
    if not sequences:
        raise TrainingDataError(
            f"no training sample of {name!r} keeps a response token within --max-length {max_length}: "
            f"all {len(samples)} prompts are at least that long. Raise --max-length or use shorter prompts."
        )
    valid = None
    if valid_samples is not None:
        v_seq, v_mask = encode_pairs(tokenizer, [s.prompt.strip() for s in valid_samples],
                                     [s.response for s in valid_samples], max_len=max_length, add_eos=False)
        valid = make_batches(v_seq, batch_size, pad_id=pad, loss_masks=v_mask, order="length")
        if not valid:
            log.warning("no validation sample of %r keeps a response token within --max-length %d: "
                        "training without a validation loss", valid_name, max_length)
            valid = None
    return TrainingData(sequences, loss_masks, valid, pad)
