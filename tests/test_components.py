"""Lost components: the batched SVD matches a per-head NumPy loop of the reference's formula."""

from __future__ import annotations

import numpy as np
import pytest

from lcc_jax.restore.components import LostComponents, lost_components


def numpy_reference(delta: np.ndarray, k: int):
    """The reference's `obtain_main_components`, one head at a time, in NumPy (fp64)."""
    n, heads, d = delta.shape
    comps, bases, svals = [], [], []
    for h in range(heads):
        u, s, vt = np.linalg.svd(delta[:, h].astype(np.float64), full_matrices=False)
        comps.append(sum(u[:, i].mean() * s[i] * vt[i] for i in range(min(k, s.size))))
        padded = np.zeros((d, d))
        padded[: vt.shape[0]] = vt / np.maximum(np.linalg.norm(vt, axis=1, keepdims=True), 1e-12)
        bases.append(padded)
        svals.append(s)
    return np.stack(comps), np.stack(bases), np.stack(svals)


def same_rows_up_to_sign(a: np.ndarray, b: np.ndarray, atol: float):
    signs = np.sign(np.sum(a * b, axis=-1, keepdims=True))
    signs[signs == 0] = 1
    np.testing.assert_allclose(a, b * signs, atol=atol)


@pytest.mark.parametrize("n, k", [(40, 10), (40, 1), (5, 10)])
def test_batched_svd_matches_per_head_numpy_loop(n, k):
    rng = np.random.RandomState(n + k)
    heads, d = 6, 8
    dense = rng.randn(n, heads, d).astype(np.float32)
    pruned = (dense - rng.randn(n, heads, d) * np.linspace(0.1, 1.0, d) - 0.3).astype(np.float32)
    got = lost_components(dense, pruned, k=k, head_chunk=4)
    comp, basis, svals = numpy_reference(dense.astype(np.float64) - pruned, k)
    np.testing.assert_allclose(got.component, comp, atol=1e-4)
    np.testing.assert_allclose(got.singular_values, svals, rtol=1e-4, atol=1e-5)
    same_rows_up_to_sign(got.basis, basis, atol=1e-4)
    assert got.basis.shape == (heads, d, d)
    m = min(n, d)
    np.testing.assert_allclose(np.linalg.norm(got.basis[:, :m], axis=-1), 1.0, atol=1e-5)
    assert not got.basis[:, m:].any()  # fewer samples than head_dim: zero rows
    top = np.take_along_axis(got.basis[:, :m], np.abs(got.basis[:, :m]).argmax(-1)[..., None], -1)
    assert (top > 0).all()  # sign-canonical


def test_component_sums_k_reconstructed_means():
    """With K = rank, c = Σ_i mean(U_i) S_i v_i is the mean of ΔZ over samples (SVD reconstruction)."""
    rng = np.random.RandomState(0)
    dense = rng.randn(30, 3, 8).astype(np.float32)
    pruned = (0.5 * dense).astype(np.float32)
    got = lost_components(dense, pruned, k=8)
    np.testing.assert_allclose(got.component, (dense - pruned).mean(0), atol=1e-5)


def test_energy_per_layer_and_save_load(tmp_path):
    rng = np.random.RandomState(1)
    dense = rng.randn(12, 2 * 3, 4).astype(np.float32)  # 2 layers x 3 heads
    pruned = rng.randn(12, 6, 4).astype(np.float32)
    got = lost_components(dense, pruned)
    delta = (dense - pruned).astype(np.float64)
    np.testing.assert_allclose(got.layer_energy(2), (delta**2).reshape(12, 2, 3, 4).sum(axis=(0, 2, 3)), rtol=1e-4)
    got.save(tmp_path / "c.npz")
    back = LostComponents.load(tmp_path / "c.npz")
    np.testing.assert_array_equal(back.basis, got.basis)
    with pytest.raises(ValueError, match="must both be"):
        lost_components(dense, pruned[:, :3])
