"""Wanda (Sun et al. 2023) as locuslab/wanda's `prune_wanda` runs it, layer by layer.

Per layer: forward the calibration windows one at a time with hooks accumulating each linear's
squared input-column norms (a running mean over windows), score |W_ij| · ‖X_j‖, zero the lowest
scores of every output row (or the lowest n of every m consecutive inputs), then re-forward the
pruned layer so the next layer sees pruned inputs.
"""

from __future__ import annotations

import logging
import time

import torch
import transformers
from torch import nn

from .layerwise import collect_inputs, find_linears, first_layer_inputs, forward_layer

log = logging.getLogger(__name__)


class InputNorms:
    """Running mean over windows of the squared L2 norm of each input column (Wanda's `scaler_row`)."""

    def __init__(self, layer: nn.Linear):
        self.scaler_row = torch.zeros(layer.in_features, device=layer.weight.device)
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        batch = inp.shape[0] if inp.dim() == 3 else 1
        inp = inp.reshape(-1, inp.shape[-1]).t().float()
        self.scaler_row *= self.nsamples / (self.nsamples + batch)
        self.nsamples += batch
        self.scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / self.nsamples


def wanda_mask(weight: torch.Tensor, scaler_row: torch.Tensor, sparsity: float = 0.5,
               prune_n: int = 0, prune_m: int = 0) -> torch.Tensor:
    """Boolean (out, in) mask, True where Wanda prunes: the lowest |W|·sqrt(scaler_row) per row or per n:m group."""
    metric = weight.abs().float() * torch.sqrt(scaler_row.reshape(1, -1))
    mask = torch.zeros_like(metric, dtype=torch.bool)
    if prune_n:
        for start in range(0, metric.shape[1], prune_m):
            group = metric[:, start: start + prune_m]
            mask.scatter_(1, start + torch.topk(group, prune_n, dim=1, largest=False)[1], True)
    else:
        order = torch.sort(metric, dim=-1, stable=True)[1]
        mask.scatter_(1, order[:, : int(metric.shape[1] * sparsity)], True)
    return mask


@torch.no_grad()
def prune_wanda(model: transformers.LlamaForCausalLM, calibration: torch.Tensor, device: torch.device,
                sparsity: float = 0.5, prune_n: int = 0, prune_m: int = 0) -> None:
    """Prunes every decoder linear of `model` in place with Wanda on the (N, S) calibration ids."""
    start = time.perf_counter()
    inps, kwargs = first_layer_inputs(model, calibration, device)
    outs = torch.zeros_like(inps)
    for index, layer in enumerate(model.model.layers):
        linears = find_linears(layer)
        norms = {name: InputNorms(m) for name, m in linears.items()}
        collect_inputs(linears, norms, layer, inps, outs, kwargs)
        for name, linear in linears.items():
            linear.weight.data[wanda_mask(linear.weight.data, norms[name].scaler_row, sparsity, prune_n, prune_m)] = 0
        forward_layer(layer, inps, outs, kwargs)
        inps, outs = outs, inps
        log.info("wanda: layer %d/%d pruned, %.1f s so far", index + 1, len(model.model.layers),
                 time.perf_counter() - start)
