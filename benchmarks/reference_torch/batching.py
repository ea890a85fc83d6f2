"""Hugging Face-style right padding: pad to the batch's longest sequence, mask, response-only labels."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .data import Sample

PAD_ID = 0
IGNORE = -100  # the label Hugging Face's loss skips


def pad_right(sequences: Sequence[np.ndarray], pad_id: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), both (B, max T) int64 on the host, real tokens first."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(seq)
        mask[row, : len(seq)] = 1
    return ids, mask


def training_batch(samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and labels (IGNORE on prompt and padding), as a completion-only collator gives."""
    ids, mask = pad_right([s.ids for s in samples])
    labels = ids.clone()
    labels[mask == 0] = IGNORE
    for row, sample in enumerate(samples):
        labels[row, : sample.prompt_len] = IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
