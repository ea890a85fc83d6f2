"""Slow, loop-based NumPy references for the pruning methods, written from the algorithms.

Everything here uses the PyTorch layout: a weight is (out, in), one row per output, and "pruned"
arrays are True where a weight is removed. Tests transpose to compare with lcc_jax's (in, out)
kernels and keep masks. SparseGPT runs in float64.
"""

from __future__ import annotations

import math

import numpy as np


def magnitude_pruned(w: np.ndarray, ratio: float) -> np.ndarray:
    """One threshold for the whole matrix: t = sorted |W| at int(numel * ratio); prune |W| <= t."""
    score = np.abs(w)
    flat = sorted(score.ravel().tolist())
    t = flat[int(score.size * ratio)]
    pruned = np.zeros(w.shape, bool)
    for r in range(w.shape[0]):
        for c in range(w.shape[1]):
            pruned[r, c] = score[r, c] <= t
    return pruned


def per_row_pruned(score: np.ndarray, ratio: float) -> np.ndarray:
    """In each row, prune the int(in * ratio) lowest scores; ties to the lower index (stable sort)."""
    k = int(score.shape[1] * ratio)
    pruned = np.zeros(score.shape, bool)
    for r in range(score.shape[0]):
        order = sorted(range(score.shape[1]), key=lambda c: (score[r, c], c))
        for c in order[:k]:
            pruned[r, c] = True
    return pruned


def nm_pruned(score: np.ndarray, n: int, m: int) -> np.ndarray:
    """In each row, in every group of m consecutive columns, prune the n lowest (ties: lower index)."""
    pruned = np.zeros(score.shape, bool)
    for r in range(score.shape[0]):
        for start in range(0, score.shape[1], m):
            group = sorted(range(start, start + m), key=lambda c: (score[r, c], c))
            for c in group[:n]:
                pruned[r, c] = True
    return pruned


def wanda_scaler_row(batches: list[np.ndarray]) -> np.ndarray:
    """Running mean of squared input norms: s <- s*n/(n+b); n <- n+b; s += sum_tokens x^2 / n.

    Each batch is (batch, seq, in) (adds `batch` samples) or (tokens, in) (adds one).
    """
    s, n = None, 0
    for x in batches:
        b = x.shape[0] if x.ndim == 3 else 1
        x = x.reshape(-1, x.shape[-1]).astype(np.float64)
        if s is None:
            s = np.zeros(x.shape[1])
        s *= n / (n + b)
        n += b
        for j in range(x.shape[1]):
            s[j] += np.sum(x[:, j] ** 2) / n
    return s


def hessian(batches: list[np.ndarray]) -> np.ndarray:
    """H <- H*n/(n+b); n <- n+b; x <- sqrt(2/n) x; H += x^T x (x: tokens x in)."""
    h, n = None, 0
    for x in batches:
        b = x.shape[0] if x.ndim == 3 else 1
        x = x.reshape(-1, x.shape[-1]).astype(np.float64)
        if h is None:
            h = np.zeros((x.shape[1], x.shape[1]))
        h *= n / (n + b)
        n += b
        x = math.sqrt(2 / n) * x
        h += x.T @ x
    return h


def sparsegpt(
    w: np.ndarray,
    h: np.ndarray,
    ratio: float = 0.0,
    n: int = 0,
    m: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SparseGPT in float64, column by column. w (out, in), h (in, in) -> (new w, pruned, loss per row)."""
    w = w.astype(np.float64).copy()
    h = h.astype(np.float64).copy()
    rows, cols = w.shape
    for j in range(cols):  # dead inputs
        if h[j, j] == 0:
            h[j, j] = 1.0
            w[:, j] = 0.0
    damp = percdamp * np.mean(np.diag(h))
    for j in range(cols):
        h[j, j] += damp
    h_inv = np.linalg.inv(h)
    h_inv = (h_inv + h_inv.T) / 2
    u = np.linalg.cholesky(h_inv).T  # upper, u^T u = h_inv

    pruned = np.zeros(w.shape, bool)
    loss = np.zeros(rows)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        if n == 0 and ratio > 0:
            score = [(w[r, c] ** 2 / u[c, c] ** 2) for r in range(rows) for c in range(i1, i2)]
            t = sorted(score)[int(len(score) * ratio)]
            for r in range(rows):
                for c in range(i1, i2):
                    pruned[r, c] = w[r, c] ** 2 / u[c, c] ** 2 <= t
        err_block = np.zeros((rows, i2 - i1))
        for c in range(i1, i2):
            if n and (c - i1) % m == 0:
                for r in range(rows):
                    group = sorted(range(c, c + m), key=lambda k: (w[r, k] ** 2 / u[k, k] ** 2, k))
                    for k in group[:n]:
                        pruned[r, k] = True
            d = u[c, c]
            q = np.where(pruned[:, c], 0.0, w[:, c])  # (rows,)
            err = (w[:, c] - q) / d
            loss += (w[:, c] - q) ** 2 / d**2 / 2
            w[:, c + 1 : i2] -= np.outer(err, u[c, c + 1 : i2])  # rest of the block now
            w[:, c] = q
            err_block[:, c - i1] = err
        w[:, i2:] -= err_block @ u[i1:i2, i2:]  # later blocks once per block
    return w, pruned, loss


def owl_sparsities(outlier_ratios: list[float], target: float, lam: float = 0.08) -> list[float]:
    """Min-max scale ratios to [0, 2*lam], centre on 1 - target (densities); sparsity = 1 - density, <= 0 -> 0.01."""
    lo, hi = min(outlier_ratios), max(outlier_ratios)
    scaled = [(r - lo) * (1 / (hi - lo) * lam * 2) for r in outlier_ratios]
    mean = sum(scaled) / len(scaled)
    out = []
    for s in scaled:
        sparsity = 1 - (s - mean + (1 - target))
        out.append(0.01 if sparsity <= 0 else sparsity)
    return out


def outlier_ratio(scores: list[np.ndarray], m: float) -> float:
    flat = np.concatenate([s.ravel() for s in scores]).astype(np.float64)
    threshold = flat.mean() * m
    return sum(1 for v in flat if v > threshold) / flat.size
