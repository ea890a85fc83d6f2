"""Last-token per-head activations at the o_proj input: one sample at a time (the reference) or batched.

`capture_reference` follows RestoreLCC's `obtain_act`: each text alone through the full causal LM with
`output_hidden_states=True`, a collector cloning every layer's whole o_proj input, everything moved
to the host, and the last token sliced there. `capture_batched` is the plain batched alternative:
right-padded batches, and a hook that keeps only each row's last real token on the device.
Both return (N, L·H, d_h) fp32 on the host.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import transformers

from .batching import pad_right
from .hooks import OProjCapture

log = logging.getLogger(__name__)


def _heads(model: transformers.LlamaForCausalLM) -> tuple[int, int]:
    return model.config.num_attention_heads, model.config.head_dim


@torch.no_grad()
def capture_reference(model: transformers.LlamaForCausalLM, sequences: Sequence[np.ndarray],
                      device: torch.device) -> torch.Tensor:
    """(N, L·H, d_h): one forward per sequence, whole activations to the host, last token taken there."""
    heads, head_dim = _heads(model)
    collector = OProjCapture(model, last_only=False)
    acts = []
    try:
        for ids in sequences:
            output = model(input_ids=torch.as_tensor(ids)[None].to(device), output_hidden_states=True)
            torch.stack(output.hidden_states).squeeze().cpu()  # the reference copies these to the host too
            states = torch.stack([s[0] for s in collector.pop()]).cpu().float()  # (L, T, H·d_h)
            acts.append(states[:, -1].reshape(-1, heads, head_dim).reshape(-1, head_dim))
    finally:
        collector.remove()
    return torch.stack(acts)


@torch.no_grad()
def capture_batched(model: transformers.LlamaForCausalLM, sequences: Sequence[np.ndarray],
                    device: torch.device, batch_size: int = 32) -> torch.Tensor:
    """(N, L·H, d_h): right-padded batches in the given order, last real token kept on the device."""
    heads, head_dim = _heads(model)
    collector = OProjCapture(model, last_only=True)
    acts = []
    try:
        for start in range(0, len(sequences), batch_size):
            ids, mask = pad_right(sequences[start: start + batch_size])
            collector.last_index = (mask.sum(1) - 1).to(device)
            model(input_ids=ids.to(device), attention_mask=mask.to(device))
            states = torch.stack(collector.pop(), dim=1)  # (B, L, H·d_h)
            acts.append(states.reshape(states.shape[0], -1, head_dim).float().cpu())
    finally:
        collector.remove()
    return torch.cat(acts)
