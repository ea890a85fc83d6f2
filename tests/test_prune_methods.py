"""Magnitude, Wanda, SparseGPT, OWL and the calibration statistics against slow NumPy references.

The references (tests/numpy_reference_prune.py) use the PyTorch (out, in) layout with pruned=True;
lcc_jax kernels are (in, out) with keep=True, hence the transposes and negations below.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import numpy_reference_prune as ref
from lcc_jax.pruning import (
    HessianStats,
    SparsityError,
    WandaStats,
    hessian_factor,
    magnitude_mask,
    outlier_ratio,
    owl_sparsities,
    sparsegpt_prune,
    sparsegpt_prune_factored,
    wanda_mask,
    wanda_scores,
)
from lcc_jax.pruning.sparsegpt import _fasterprune
from lcc_jax.sharding import make_mesh


def _kernel(d_in, d_out, seed):
    return np.random.RandomState(seed).randn(d_in, d_out).astype(np.float32)  # (in, out)


def _batches(d_in, seed, dead=()):
    """Calibration inputs with correlated features: two 3-d batches and one 2-d batch; `dead` features are 0."""
    rng = np.random.RandomState(seed)
    mix = np.eye(d_in) + 0.3 * rng.randn(d_in, d_in) / np.sqrt(d_in)
    out = []
    for shape in ((2, 40, d_in), (3, 24, d_in), (50, d_in)):
        x = (rng.randn(*shape) @ mix * rng.uniform(0.5, 2.0, d_in)).astype(np.float32)
        x[..., list(dead)] = 0.0
        out.append(x)
    return out


SPECS = [("50%", dict(ratio=0.5)), ("37%", dict(ratio=0.37)), ("2:4", dict(n=2, m=4)), ("4:8", dict(n=4, m=8))]


def _ref_pruned(score_torch, kw, per_row):
    if "n" in kw:
        return ref.nm_pruned(score_torch, kw["n"], kw["m"])
    return ref.per_row_pruned(score_torch, kw["ratio"]) if per_row else ref.magnitude_pruned(score_torch, kw["ratio"])


# --------------------------------------------------------------------------------------------- magnitude


@pytest.mark.parametrize("spec, kw", SPECS)
def test_magnitude_matches_reference(spec, kw):
    w = _kernel(64, 24, 0)
    keep = np.asarray(magnitude_mask(jnp.asarray(w), spec))
    np.testing.assert_array_equal(keep, ~_ref_pruned(np.abs(w.T), kw, per_row=False).T)


# --------------------------------------------------------------------------------------------- statistics


def test_wanda_stats_follow_the_running_update():
    batches = _batches(16, 1)
    stats = WandaStats.init(16)
    for x in batches:
        stats = stats.update(jnp.asarray(x))
    assert int(stats.nsamples) == 2 + 3 + 1  # sequences, and one per 2-d batch
    np.testing.assert_allclose(np.asarray(stats.scaler_row), ref.wanda_scaler_row(batches), rtol=1e-5)


def test_hessian_stats_follow_the_running_update():
    batches = _batches(16, 2)
    stats = HessianStats.init(16)
    for x in batches:
        stats = stats.update(jnp.asarray(x))
    assert int(stats.nsamples) == 6
    h = ref.hessian(batches)
    np.testing.assert_allclose(np.asarray(stats.hessian), h, rtol=1e-5, atol=1e-5 * np.abs(h).max())


def test_token_mask_drops_padding_from_the_sums():
    x = _batches(8, 3)[0]  # (2, 40, 8)
    mask = np.ones(x.shape[:2], np.int32)
    mask[1, 30:] = 0
    zeroed = x * mask[..., None]
    wanda = WandaStats.init(8).update(jnp.asarray(x), jnp.asarray(mask))
    hess = HessianStats.init(8).update(jnp.asarray(x), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(wanda.scaler_row), ref.wanda_scaler_row([zeroed]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(hess.hessian), ref.hessian([zeroed]), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------- wanda


@pytest.mark.parametrize("spec, kw", SPECS)
def test_wanda_matches_reference(spec, kw):
    w = _kernel(64, 24, 4)
    stats = WandaStats.init(64)
    for x in _batches(64, 5):
        stats = stats.update(jnp.asarray(x))
    scaler = np.asarray(stats.scaler_row)
    score_torch = np.abs(w.T) * np.sqrt(scaler)[None, :]  # (out, in), fp32 like the reference
    np.testing.assert_array_equal(np.asarray(wanda_scores(jnp.asarray(w), stats.scaler_row)), score_torch.T)
    keep = np.asarray(wanda_mask(jnp.asarray(w), stats.scaler_row, spec))
    np.testing.assert_array_equal(keep, ~_ref_pruned(score_torch, kw, per_row=True).T)


def test_wanda_mask_on_a_sharded_stack_keeps_sharding():
    mesh = make_mesh("fsdp=4,tensor=2")
    sharding = NamedSharding(mesh, PartitionSpec(None, "fsdp", "tensor"))
    w = jax.device_put(np.stack([_kernel(32, 16, 6), _kernel(32, 16, 7)]), sharding)  # (layers, in, out)
    scaler = jnp.asarray(np.random.RandomState(8).rand(2, 32).astype(np.float32))
    keep = wanda_mask(w, scaler, "2:4")
    assert keep.sharding == w.sharding
    for layer in range(2):
        np.testing.assert_array_equal(np.asarray(keep[layer]), np.asarray(wanda_mask(w[layer], scaler[layer], "2:4")))
    with pytest.raises(SparsityError, match="scaler_row"):
        wanda_mask(w, scaler[0], "2:4")


# --------------------------------------------------------------------------------------------- sparsegpt

DEAD = (3, 100, 200, 201, 202)


@pytest.fixture(scope="module")
def hessian_320():
    """A Hessian over 320 inputs (2 full blocks of 128 and one of 64) with dead inputs, fp32."""
    return ref.hessian(_batches(320, 9, dead=DEAD)).astype(np.float32)


@pytest.mark.parametrize("spec, kw", [("50%", dict(ratio=0.5)), ("2:4", dict(n=2, m=4))])
def test_sparsegpt_matches_reference(hessian_320, spec, kw):
    w = _kernel(320, 40, 10)
    out = sparsegpt_prune(jnp.asarray(w), jnp.asarray(hessian_320), spec)
    w_ref, pruned_ref, loss_ref = ref.sparsegpt(w.T, hessian_320, **kw)
    keep, new_w = np.asarray(out.keep), np.asarray(out.weight)
    np.testing.assert_array_equal(keep, ~pruned_ref.T)
    assert np.abs(new_w - w_ref.T).max() <= 1e-4 * np.abs(w_ref).max()
    np.testing.assert_allclose(np.asarray(out.loss), loss_ref, rtol=1e-3)
    assert np.all(new_w[~keep] == 0) and np.all(new_w[list(DEAD)] == 0)
    if "n" in kw:
        assert np.all((~keep).reshape(80, 4, 40).sum(axis=1) == 2)
    else:
        assert abs(np.mean(~keep) - 0.5) < 0.01
    factor = hessian_factor(jnp.asarray(hessian_320))
    shared = sparsegpt_prune_factored(jnp.asarray(w), factor, spec)  # q/k/v share one H
    np.testing.assert_array_equal(np.asarray(shared.weight), new_w)


def test_sparsegpt_other_ratios_reuse_the_compiled_kernel(hessian_320):
    w = _kernel(320, 40, 10)
    factor = hessian_factor(jnp.asarray(hessian_320))
    sparsegpt_prune_factored(jnp.asarray(w), factor, "50%")
    compiled = _fasterprune._cache_size()
    out = sparsegpt_prune_factored(jnp.asarray(w), factor, "37%")  # OWL gives every layer its own ratio
    w_ref, pruned_ref, _ = ref.sparsegpt(w.T, hessian_320, ratio=0.37)
    np.testing.assert_array_equal(np.asarray(out.keep), ~pruned_ref.T)
    assert np.abs(np.asarray(out.weight) - w_ref.T).max() <= 1e-4 * np.abs(w_ref).max()
    dense = sparsegpt_prune_factored(jnp.asarray(w), factor, "0%")
    assert bool(jnp.all(dense.keep))
    np.testing.assert_array_equal(np.asarray(dense.weight), np.where(np.isin(np.arange(320), DEAD)[:, None], 0, w))
    assert _fasterprune._cache_size() == compiled


def test_sparsegpt_keeps_sharding_and_refuses_bad_input(hessian_320):
    mesh = make_mesh("fsdp=4,tensor=2")
    w = jax.device_put(_kernel(320, 40, 14), NamedSharding(mesh, PartitionSpec("fsdp", "tensor")))
    h = jnp.asarray(hessian_320)
    out = sparsegpt_prune(w, h, "2:4")
    assert out.weight.sharding == w.sharding and out.keep.sharding == w.sharding
    np.testing.assert_array_equal(np.asarray(out.keep), np.asarray(sparsegpt_prune(np.asarray(w), h, "2:4").keep))
    with pytest.raises(SparsityError, match="multiple of 8"):
        sparsegpt_prune(w[:12], h[:12, :12], "4:8")
    with pytest.raises(SparsityError, match="blocksize"):
        sparsegpt_prune(w, h, "2:4", blocksize=6)
    with pytest.raises(SparsityError, match="w \\(in, out\\)"):
        sparsegpt_prune(w[:16], h, "2:4")
    with pytest.raises(SparsityError, match="positive definite"):
        sparsegpt_prune(w, -h, "50%")


# --------------------------------------------------------------------------------------------- owl


def test_owl_sparsities_match_reference_and_average_to_target():
    ratios = list(np.random.RandomState(16).uniform(0.5, 4.0, 12))
    got = owl_sparsities(ratios, 0.5)
    np.testing.assert_allclose(got, ref.owl_sparsities(ratios, 0.5), rtol=0, atol=1e-15)
    assert np.mean(got) == pytest.approx(0.5) and np.ptp(got) == pytest.approx(0.16)
    assert np.argmin(got) == np.argmax(ratios)  # more outliers, less pruning
    np.testing.assert_allclose(owl_sparsities([100 * r for r in ratios], 0.5), got, atol=1e-12)  # percent or fraction
    np.testing.assert_allclose(owl_sparsities(ratios, 0.05, lam=0.2), ref.owl_sparsities(ratios, 0.05, lam=0.2))
    assert np.min(owl_sparsities(ratios, 0.05, lam=0.2)) == 0.01
    assert list(owl_sparsities([2.0, 2.0, 2.0], 0.6)) == [0.6, 0.6, 0.6]
    with pytest.raises(SparsityError, match="lower lambda"):
        owl_sparsities(ratios, 0.95, lam=0.08)


def test_outlier_ratio_matches_reference():
    rng = np.random.RandomState(17)
    scores = [np.abs(rng.standard_cauchy(shape)).astype(np.float32) for shape in ((32, 16), (48, 8))]
    for m in (3.0, 5.0):
        got = outlier_ratio([jnp.asarray(s) for s in scores], m)
        assert got == pytest.approx(ref.outlier_ratio(scores, m), abs=1e-6)
        assert 0 < got < 0.5
    assert outlier_ratio(jnp.asarray(scores[0])) == pytest.approx(ref.outlier_ratio(scores[:1], 5.0), abs=1e-6)
