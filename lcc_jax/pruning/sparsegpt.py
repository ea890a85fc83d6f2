"""SparseGPT (Frantar & Alistarh 2023) for one (in, out) kernel: prune and update the kept weights.

Follows the reference `fasterprune` (IST-DASLab/sparsegpt, as vendored in the Wanda repo) in our
layout: torch's weight columns are our kernel's rows (input features), so the algorithm walks the
input axis.

  * dead inputs (diag(H) == 0): H[j, j] = 1 and W[j, :] = 0;
  * damp = percdamp * mean(diag(H)) added to the diagonal;
  * U = upper Cholesky factor of H^-1 (U^T U = H^-1);
  * inputs in blocks of `blocksize`, one input at a time inside a block, with the error spread
    over the rest of the block at once and onto later blocks lazily (one matmul per block);
  * unstructured: each block's mask is fixed up front from W**2 / diag(U)**2 over the whole
    block, pruning every score <= the int(numel * ratio)-th smallest;
  * N:M: at every M-th input, the N lowest W**2 / diag(U)**2 of the next M inputs, on the
    weights as updated so far (ties: lower input index).

All in fp32; jitted per matrix with lax.fori_loop over blocks and over inputs inside a block.
The Hessian factor can be computed once and shared by the kernels that read the same input
(q/k/v, gate/up): `hessian_factor` then `sparsegpt_prune_factored`.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from lcc_jax.pruning.masks import place_like
from lcc_jax.pruning.patterns import SparsityError, SparsitySpec

_HIGHEST = lax.Precision.HIGHEST


class HessianFactor(NamedTuple):
    hinv: jax.Array  # (in, in) fp32 upper triangular U with U^T U = (H + damp I)^-1
    dead: jax.Array  # (in,) bool: inputs never active in calibration (diag(H) == 0)


class SparseGPTResult(NamedTuple):
    weight: jax.Array  # (in, out) in the input dtype: updated weights, exact zeros where pruned
    keep: jax.Array  # (in, out) bool, True = keep. Dead inputs' weights are zero even where kept.
    loss: jax.Array  # (out,) fp32: the reference's `Losses`, sum over inputs of (w - q)**2 / d**2 / 2


@partial(jax.jit, static_argnames=("percdamp",))
def _hessian_factor(hessian: jax.Array, percdamp: float) -> HessianFactor:
    h = hessian.astype(jnp.float32)
    idx = jnp.arange(h.shape[0])
    diag = jnp.diag(h)
    dead = diag == 0
    h = h.at[idx, idx].set(jnp.where(dead, 1.0, diag))
    damp = percdamp * jnp.mean(jnp.diag(h))
    h = h.at[idx, idx].add(damp)
    lower = jnp.linalg.cholesky(h)
    h_inv = jax.scipy.linalg.cho_solve((lower, True), jnp.eye(h.shape[0], dtype=jnp.float32))
    return HessianFactor(jnp.linalg.cholesky(h_inv, upper=True), dead)


def hessian_factor(hessian: jax.Array, percdamp: float = 0.01, *, check: bool = True) -> HessianFactor:
    """Dead-input fix, dampening, and the upper Cholesky factor of the inverse, from H (in, in).

    check=True (outside jit) raises if the damped H is not positive definite (one host sync), where
    torch's Cholesky would fail and JAX's would silently return NaNs; raise percdamp then.
    """
    if hessian.ndim != 2 or hessian.shape[0] != hessian.shape[1]:
        raise SparsityError(f"the Hessian must be (in, in), got {tuple(hessian.shape)}.")
    with jax.default_matmul_precision("highest"):
        factor = _hessian_factor(hessian, float(percdamp))
    if check and not isinstance(factor.hinv, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(factor.hinv))):
        raise SparsityError(
            f"SparseGPT: the damped Hessian (percdamp={percdamp}) is not positive definite; "
            "use more calibration data or a larger percdamp."
        )
    return factor


def _choose_nm(w1: jax.Array, d: jax.Array, pruned1: jax.Array, i, n: int, m: int) -> jax.Array:
    """Mark the n lowest W**2 / d**2 among block rows i..i+m (per output) as pruned."""
    d_out = w1.shape[1]
    group = lax.dynamic_slice(w1, (i, 0), (m, d_out))  # (m, out)
    dg = lax.dynamic_slice(d, (i,), (m,))
    score = group**2 / dg[:, None] ** 2
    lowest = jnp.argsort(score, axis=0, stable=True)[:n]  # (n, out)
    chosen = jnp.put_along_axis(jnp.zeros((m, d_out), bool), lowest, True, axis=0, inplace=False)
    current = lax.dynamic_slice(pruned1, (i, 0), (m, d_out))
    return lax.dynamic_update_slice(pruned1, current | chosen, (i, 0))


def _block(carry, i1, count: int, hinv: jax.Array, cut: jax.Array, n: int, m: int):
    """Prune inputs i1..i1+count, spread their error within the block, then onto later inputs.

    cut (unstructured): sorted position of the block's threshold, int(count * out * ratio), or -1 to prune nothing.
    """
    w, pruned, loss = carry  # (in, out), (in, out), (out,)
    d_in, d_out = w.shape
    w1 = lax.dynamic_slice(w, (i1, 0), (count, d_out))  # (count, out)
    h1 = lax.dynamic_slice(hinv, (i1, i1), (count, count))  # (count, count)
    d = jnp.diag(h1)  # (count,)
    if n == 0:
        score = w1**2 / d[:, None] ** 2
        thresh = jnp.sort(score.ravel())[jnp.maximum(cut, 0)]
        pruned1 = (score <= thresh) & (cut >= 0)
    else:
        pruned1 = jnp.zeros((count, d_out), bool)
    rows = jnp.arange(count)

    def column(i, state):
        w1, pruned1, err1, loss1 = state
        if n:
            pruned1 = lax.cond(i % m == 0, lambda p: _choose_nm(w1, d, p, i, n, m), lambda p: p, pruned1)
        w_i = lax.dynamic_index_in_dim(w1, i, keepdims=False)  # (out,)
        q = jnp.where(lax.dynamic_index_in_dim(pruned1, i, keepdims=False), 0.0, w_i)
        d_i = h1[i, i]
        err = (w_i - q) / d_i
        loss1 = loss1 + (w_i - q) ** 2 / d_i**2
        h_row = jnp.where(rows >= i, lax.dynamic_index_in_dim(h1, i, keepdims=False), 0.0)  # (count,)
        w1 = w1 - h_row[:, None] * err[None, :]
        w1 = lax.dynamic_update_index_in_dim(w1, q, i, 0)
        err1 = lax.dynamic_update_index_in_dim(err1, err, i, 0)
        return w1, pruned1, err1, loss1

    init = (w1, pruned1, jnp.zeros_like(w1), jnp.zeros((d_out,), jnp.float32))
    w1, pruned1, err1, loss1 = lax.fori_loop(0, count, column, init)
    w = lax.dynamic_update_slice(w, w1, (i1, 0))
    pruned = lax.dynamic_update_slice(pruned, pruned1, (i1, 0))
    later = lax.dynamic_slice(hinv, (i1, 0), (count, d_in))  # (count, in)
    later = jnp.where(jnp.arange(d_in)[None, :] >= i1 + count, later, 0.0)
    w = w - jnp.matmul(later.T, err1, precision=_HIGHEST)
    return w, pruned, loss + loss1 / 2


@partial(jax.jit, static_argnames=("n", "m", "blocksize"))
def _fasterprune(w, hinv, dead, cuts: jax.Array, *, n: int, m: int, blocksize: int):
    """cuts: (2,) int32, the unstructured threshold positions of a full block and of the last, partial one."""
    d_in, d_out = w.shape
    w32 = jnp.where(dead[:, None], 0.0, w.astype(jnp.float32))
    carry = (w32, jnp.zeros((d_in, d_out), bool), jnp.zeros((d_out,), jnp.float32))
    full, rest = divmod(d_in, blocksize)
    body = lambda b, c: _block(c, b * blocksize, blocksize, hinv, cuts[0], n, m)  # noqa: E731
    if full:
        carry = lax.fori_loop(0, full, body, carry)
    if rest:
        carry = _block(carry, full * blocksize, rest, hinv, cuts[1], n, m)
    w32, pruned, loss = carry
    return w32.astype(w.dtype), ~pruned, loss


def _check(w: jax.Array, d_in: int, spec: SparsitySpec, blocksize: int) -> None:
    if w.ndim != 2 or w.shape[0] != d_in:
        raise SparsityError(
            f"sparsegpt needs w (in, out) and H (in, in); got {tuple(w.shape)} and ({d_in}, {d_in})."
        )
    spec.check_input_dim(d_in, "sparsegpt kernel")
    if spec.is_nm and blocksize % spec.m:
        raise SparsityError(
            f"blocksize {blocksize} must be a multiple of M={spec.m} so N:M groups stay inside a block."
        )


def sparsegpt_prune_factored(
    w: jax.Array, factor: HessianFactor, spec: SparsitySpec | str, *, blocksize: int = 128
) -> SparseGPTResult:
    """SparseGPT on kernel w (in, out) given a precomputed `hessian_factor` of its input's Hessian."""
    spec = SparsitySpec.parse(spec)
    _check(w, factor.hinv.shape[0], spec, blocksize)
    n, m = (spec.n, spec.m) if spec.is_nm else (0, 0)
    ratio = 0.0 if spec.is_nm else spec.ratio
    d_in, d_out = w.shape
    # per-matrix ratios (OWL) change only these traced positions, never the compiled kernel
    cuts = [int(rows * d_out * ratio) if ratio > 0 else -1 for rows in (blocksize, d_in % blocksize)]
    with jax.default_matmul_precision("highest"):
        weight, keep, loss = _fasterprune(
            w, factor.hinv, factor.dead, jnp.asarray(cuts, jnp.int32), n=n, m=m, blocksize=blocksize
        )
    return SparseGPTResult(place_like(weight, w), place_like(keep, w), loss)


def sparsegpt_prune(
    w: jax.Array,
    hessian: jax.Array,
    spec: SparsitySpec | str,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    check: bool = True,
) -> SparseGPTResult:
    """SparseGPT on kernel w (in, out) with input Hessian H (in, in) (`HessianStats.hessian`).

    check: see `hessian_factor`.
    """
    spec = SparsitySpec.parse(spec)
    _check(w, hessian.shape[0], spec, blocksize)
    return sparsegpt_prune_factored(w, hessian_factor(hessian, percdamp, check=check), spec, blocksize=blocksize)
