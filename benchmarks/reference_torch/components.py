"""Per-head lost components and contrastive probes, as RestoreLCC's `utils/components.py` computes them.

Both run per head in a Python loop on the host, in fp32, as the reference does with the
activations it has moved off the device.
"""

from __future__ import annotations

import torch
from torch import nn


def lost_components(delta: torch.Tensor, k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """(probe-time component c (d,), basis (d, d)) of one head's ΔZ = Z_dense − Z_pruned, (N, d).

    SVD ΔZ = U S Vᵀ; c = Σ_{i<k} mean(U[:, i]) · S_i · Vᵀ_i; the basis is Vᵀ zero-padded to d rows,
    each row L2-normalised.
    """
    U, S, Vt = torch.linalg.svd(delta.float(), full_matrices=False)
    c = (U.mean(0)[:k, None] * S[:k, None] * Vt[:k]).sum(0)
    d = Vt.shape[-1]
    basis = torch.zeros(d, d)
    basis[: Vt.shape[0]] = Vt
    return c, nn.functional.normalize(basis, dim=-1, p=2)


def probe_accuracy(positive: torch.Tensor, negative: torch.Tensor, generator: torch.Generator,
                   epochs: int = 200, lr: float = 0.01, val_fraction: float = 0.3) -> float:
    """Validation accuracy of a logistic probe separating paired (N, f) positive and negative features.

    Pairs are split 70/30 (a pair stays on one side); full-batch Adam, BCE on a sigmoid, 200 epochs.
    """
    n = positive.shape[0]
    order = torch.randperm(n, generator=generator)
    n_val = int(round(n * val_fraction))
    val_idx, train_idx = order[:n_val], order[n_val:]
    train_x = torch.cat([positive[train_idx], negative[train_idx]])
    train_y = torch.cat([torch.ones(len(train_idx)), torch.zeros(len(train_idx))])
    val_x = torch.cat([positive[val_idx], negative[val_idx]])
    val_y = torch.cat([torch.ones(len(val_idx)), torch.zeros(len(val_idx))])
    linear = nn.Linear(train_x.shape[-1], 1)
    optimizer = torch.optim.Adam(linear.parameters(), lr=lr)
    loss_fn = nn.BCELoss()
    for _ in range(epochs):
        optimizer.zero_grad()
        loss = loss_fn(torch.sigmoid(linear(train_x)).squeeze(-1), train_y)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        predictions = (torch.sigmoid(linear(val_x)).squeeze(-1) >= 0.5).float()
    return float((predictions == val_y).float().mean())


def head_score(dense: torch.Tensor, pruned: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
               generator: torch.Generator) -> tuple[float, torch.Tensor]:
    """(probe accuracy, basis) of one head from (N, d) activations: dense q, pruned q, dense q+r⁺, dense q+r⁻."""
    c, basis = lost_components(dense - pruned)
    shifted = pruned + c
    score = probe_accuracy(torch.cat([shifted, positive], -1), torch.cat([shifted, negative], -1), generator)
    return score, basis
