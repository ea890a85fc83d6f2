"""SparseGPT (Frantar & Alistarh 2023) as IST-DASLab's `SparseGPT` class and Wanda's driver run it.

Per linear: Hessian H = 2/n · Σ XᵀX accumulated in fp32 as a running mean over windows, dead
inputs fixed, damped by 1 % of its mean diagonal, inverted through Cholesky (upper factor of H⁻¹),
then columns are pruned block by block (128 wide): the mask of a block is chosen by w² / [H⁻¹]ᵢᵢ²
(one threshold over the whole block for unstructured sparsity, the lowest n of every m inputs for
n:m), each pruned column's error is spread over the block's later columns and, after the block,
over all later columns. As the original, the unstructured threshold is the sorted score at index
⌊numel · sparsity⌋ and `<=` keeps it in the mask, so each block loses one weight more than the
exact fraction. TF32 is off while it runs, as the original sets it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from typing import Any

import torch
import transformers
from torch import nn

from .layerwise import collect_inputs, find_linears, first_layer_inputs, forward_layer

log = logging.getLogger(__name__)


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """fp32 matmuls in true fp32 for the Hessians and the inverse, as the original module sets globally."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


class SparseGPT:
    """One linear's Hessian and its one-shot pruning with error compensation."""

    def __init__(self, layer: nn.Linear):
        self.layer = layer
        self.rows, self.columns = layer.weight.shape
        self.H: torch.Tensor | None = torch.zeros((self.columns, self.columns), device=layer.weight.device)
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        batch = inp.shape[0] if inp.dim() == 3 else 1
        x = inp.reshape(-1, self.columns).t()
        self.H *= self.nsamples / (self.nsamples + batch)
        self.nsamples += batch
        x = math.sqrt(2 / self.nsamples) * x.float()
        self.H += x.matmul(x.t())

    def fasterprune(self, sparsity: float, prune_n: int = 0, prune_m: int = 0, blocksize: int = 128,
                    percdamp: float = 0.01) -> float:
        """Prunes the layer's weight in place; returns the summed reconstruction-loss estimate."""
        W = self.layer.weight.data.clone().float()
        H, self.H = self.H, None
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        H.diagonal().add_(percdamp * torch.mean(torch.diag(H)))
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
        losses = torch.zeros(self.rows, device=W.device)
        for i1 in range(0, self.columns, blocksize):
            i2 = min(i1 + blocksize, self.columns)
            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Losses1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            if prune_n == 0:
                score = W1**2 / torch.diag(Hinv1).reshape((1, -1)) ** 2
                mask1 = score <= torch.sort(score.flatten())[0][int(score.numel() * sparsity)]
            else:
                mask1 = torch.zeros_like(W1, dtype=torch.bool)
            for i in range(i2 - i1):
                w = W1[:, i]
                d = Hinv1[i, i]
                if prune_n != 0 and i % prune_m == 0:
                    score = W1[:, i: i + prune_m] ** 2 / torch.diag(Hinv1)[i: i + prune_m].reshape((1, -1)) ** 2
                    mask1.scatter_(1, i + torch.topk(score, prune_n, dim=1, largest=False)[1], True)
                q = w.clone()
                q[mask1[:, i]] = 0
                Q1[:, i] = q
                Losses1[:, i] = (w - q) ** 2 / d**2
                err1 = (w - q) / d
                W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
                Err1[:, i] = err1
            W[:, i1:i2] = Q1
            losses += torch.sum(Losses1, 1) / 2
            W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
        self.layer.weight.data = W.reshape(self.layer.weight.shape).to(self.layer.weight.dtype)
        return float(losses.sum())


@torch.no_grad()
def prune_layer(layer: nn.Module, inps: torch.Tensor, outs: torch.Tensor, kwargs: dict[str, Any],
                device: torch.device, sparsity: float = 0.5, prune_n: int = 0, prune_m: int = 0) -> dict[str, float]:
    """Hessians of all the layer's linears from one dense forward, prune each, re-forward into `outs`.

    Returns the seconds each linear's `fasterprune` took (device-synchronized).
    """
    linears = find_linears(layer)
    gpts = {name: SparseGPT(m) for name, m in linears.items()}
    collect_inputs(linears, gpts, layer, inps, outs, kwargs)
    seconds = {}
    for name, gpt in gpts.items():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        gpt.fasterprune(sparsity, prune_n, prune_m, blocksize=128, percdamp=0.01)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds[name] = time.perf_counter() - start
    forward_layer(layer, inps, outs, kwargs)
    return seconds


@torch.no_grad()
def prune_sparsegpt(model: transformers.LlamaForCausalLM, calibration: torch.Tensor, device: torch.device,
                    sparsity: float = 0.5, prune_n: int = 0, prune_m: int = 0) -> None:
    """Prunes every decoder linear of `model` in place, layer by layer, on the (N, S) calibration ids."""
    start = time.perf_counter()
    with no_tf32():
        inps, kwargs = first_layer_inputs(model, calibration, device)
        outs = torch.zeros_like(inps)
        for index, layer in enumerate(model.model.layers):
            prune_layer(layer, inps, outs, kwargs, device, sparsity, prune_n, prune_m)
            inps, outs = outs, inps
            log.info("sparsegpt: layer %d/%d pruned, %.1f s so far", index + 1, len(model.model.layers),
                     time.perf_counter() - start)
