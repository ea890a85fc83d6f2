"""Sparsity specs, mask builders, applying/recovering masks, the sparsity audit, and mask sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import numpy_reference_prune as ref
from lcc_jax.config import ModelConfig
from lcc_jax.models import CausalLM
from lcc_jax.pruning import (
    PRUNABLE,
    SparsityError,
    SparsitySpec,
    apply_masks,
    magnitude_masks,
    masks_from_zeros,
    nm_mask,
    prunable_paths,
    sparsity_report,
    unstructured_mask,
)
from lcc_jax.pruning.masks import _unstructured_keep
from lcc_jax.sharding import flat_params, make_mesh, param_shardings

# --------------------------------------------------------------------------------------------- specs


@pytest.mark.parametrize(
    "text, ratio, nm",
    [
        ("50%", 0.5, None),
        ("0.5", 0.5, None),
        (" 12.5 % ", 0.125, None),
        ("0", 0.0, None),
        ("2:4", None, (2, 4)),
        ("4:8", None, (4, 8)),
    ],
)
def test_spec_parses_ratios_and_nm(text, ratio, nm):
    spec = SparsitySpec.parse(text)
    if nm is None:
        assert not spec.is_nm and spec.ratio == pytest.approx(ratio) and spec.fraction == pytest.approx(ratio)
    else:
        assert spec.is_nm and (spec.n, spec.m) == nm and spec.fraction == nm[0] / nm[1]
    assert SparsitySpec.parse(spec) is spec and hash(spec) == hash(SparsitySpec.parse(text))


BAD_SPECS = ["1.0", "1", "100%", "150%", "50", "3:2", "0:4", "4:4", "2:0", "abc", "2:4:8", "-0.1", "", "%"]


@pytest.mark.parametrize("text", BAD_SPECS)
def test_spec_rejects_bad_text(text):
    with pytest.raises(SparsityError):
        SparsitySpec.parse(text)


def test_spec_rejects_bad_fields():
    for kwargs in (dict(ratio=1.0), dict(ratio=-0.01), dict(n=4, m=4), dict(n=0, m=4), dict(ratio=0.5, n=2, m=4)):
        with pytest.raises(SparsityError):
            SparsitySpec(**kwargs)
    with pytest.raises(SparsityError, match="multiple of 4"):
        SparsitySpec.parse("2:4").check_input_dim(10, "q_proj")
    SparsitySpec.parse("2:4").check_input_dim(12)
    SparsitySpec.parse("50%").check_input_dim(11)


# --------------------------------------------------------------------------------------------- builders


def _scores(shape, seed, ties=False):
    rng = np.random.RandomState(seed)
    return rng.randint(0, 4, shape).astype(np.float32) if ties else rng.rand(*shape).astype(np.float32)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("ratio", [0.5, 0.3, 0.77])
def test_unstructured_global_matches_reference(ratio, ties):
    s = _scores((24, 10), 0, ties)  # (in, out)
    keep = np.asarray(unstructured_mask(jnp.asarray(s), ratio, per_output=False))
    pruned_ref = ref.magnitude_pruned(s.T, ratio).T  # scores are >= 0, so |s| = s
    np.testing.assert_array_equal(keep, ~pruned_ref)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("ratio", [0.5, 0.3, 0.77])
def test_unstructured_per_output_matches_reference(ratio, ties):
    s = _scores((24, 10), 1, ties)
    keep = np.asarray(unstructured_mask(jnp.asarray(s), ratio, per_output=True))
    np.testing.assert_array_equal(keep, ~ref.per_row_pruned(s.T, ratio).T)
    assert np.all((~keep).sum(axis=0) == int(24 * ratio))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_matches_reference_and_groups_hold_n_zeros(n, m, ties):
    s = _scores((32, 6), 2, ties)
    keep = np.asarray(nm_mask(jnp.asarray(s), n, m))
    np.testing.assert_array_equal(keep, ~ref.nm_pruned(s.T, n, m).T)
    assert np.all((~keep).reshape(32 // m, m, 6).sum(axis=1) == n)


def test_builders_work_per_matrix_on_stacks():
    s = _scores((3, 16, 5), 3)
    builders = (
        lambda x: unstructured_mask(x, 0.5, per_output=False),
        lambda x: unstructured_mask(x, 0.5, per_output=True),
        lambda x: nm_mask(x, 2, 4),
    )
    for fn in builders:
        stacked = np.asarray(fn(jnp.asarray(s)))
        for i in range(3):
            np.testing.assert_array_equal(stacked[i], np.asarray(fn(jnp.asarray(s[i]))))


def test_other_ratios_reuse_the_compiled_builder():
    s = jnp.asarray(_scores((24, 10), 5))
    unstructured_mask(s, 0.5, per_output=True)
    compiled = _unstructured_keep._cache_size()
    for ratio in (0.2, 0.61):  # OWL gives every layer its own ratio
        keep = np.asarray(unstructured_mask(s, ratio, per_output=True))
        np.testing.assert_array_equal(keep, ~ref.per_row_pruned(np.asarray(s).T, ratio).T)
    assert _unstructured_keep._cache_size() == compiled


def test_ratio_zero_keeps_everything_and_bad_nm_is_refused():
    s = jnp.asarray(_scores((8, 4), 4))
    assert bool(jnp.all(unstructured_mask(s, 0.0, per_output=False)))
    assert bool(jnp.all(unstructured_mask(s, 0.0, per_output=True)))
    with pytest.raises(SparsityError, match="multiple of 8"):
        nm_mask(s[:6], 4, 8)
    with pytest.raises(SparsityError):
        unstructured_mask(s, 1.0, per_output=True)


# --------------------------------------------------------------------------------------------- model level


def _tiny_model(seed=0, mesh=None):
    """A random tiny CausalLM built abstractly and filled from NumPy (fast), optionally sharded on `mesh`."""
    config = ModelConfig(
        model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
    )  # fmt: skip
    model = nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0)))
    shardings = param_shardings(model, mesh) if mesh is not None else {}
    rng = np.random.RandomState(seed)
    for path, var in flat_params(model).items():
        value = (rng.randn(*var.shape) * 0.02).astype(np.float32)
        var.set_value(jax.device_put(value, shardings[path]) if mesh is not None else jnp.asarray(value))
    return model


@pytest.fixture(scope="module")
def sharded_model():
    assert jax.device_count() == 8
    return _tiny_model(0, make_mesh("fsdp=4,tensor=2"))


@pytest.fixture(scope="module")
def masks_24(sharded_model):
    return magnitude_masks(sharded_model, "2:4")


@pytest.fixture(scope="module")
def pruned_50(sharded_model):
    model = nnx.clone(sharded_model)
    apply_masks(model, magnitude_masks(model, "50%"))
    return model


def test_prunable_paths_are_the_seven_linear_kernels(sharded_model):
    assert prunable_paths(sharded_model) == list(PRUNABLE)
    assert not any("embed" in p or "norm" in p or "lm_head" in p for p in PRUNABLE)


def test_masks_keep_the_weights_sharding(sharded_model, masks_24):
    flat = flat_params(sharded_model)
    assert set(masks_24) == set(PRUNABLE)
    for path, keep in masks_24.items():
        w = flat[path][...]
        assert keep.dtype == jnp.bool_ and keep.shape == w.shape
        assert keep.sharding == w.sharding, path
        assert len(w.sharding.device_set) == 8


def test_apply_masks_writes_exact_zeros_and_round_trips(sharded_model, masks_24):
    model = nnx.clone(sharded_model)
    before = {p: np.asarray(v[...]) for p, v in flat_params(model).items()}
    shardings = {p: v[...].sharding for p, v in flat_params(model).items()}
    apply_masks(model, masks_24)
    for path, var in flat_params(model).items():
        w = np.asarray(var[...])
        assert var[...].sharding == shardings[path], path
        if path in masks_24:
            keep = np.asarray(masks_24[path])
            assert np.all(w[~keep] == 0) and np.array_equal(w[keep], before[path][keep])
        else:
            np.testing.assert_array_equal(w, before[path])  # embeddings, norms, lm_head untouched
    recovered = masks_from_zeros(model)
    for path in masks_24:
        np.testing.assert_array_equal(np.asarray(recovered[path]), np.asarray(masks_24[path]))
        assert recovered[path].sharding == shardings[path]


def test_apply_masks_refuses_bad_masks(sharded_model):
    flat = flat_params(sharded_model)
    with pytest.raises(SparsityError, match="not a prunable kernel"):
        apply_masks(sharded_model, {"embed.embedding": jnp.ones(flat["embed.embedding"].shape, bool)})
    with pytest.raises(SparsityError, match="mask shape"):
        apply_masks(sharded_model, {"layers.attn.q_proj.kernel": jnp.ones((2, 3), bool)})
    with pytest.raises(SparsityError, match="dtype"):
        apply_masks(sharded_model, {"layers.attn.q_proj.kernel": jnp.ones(flat["layers.attn.q_proj.kernel"].shape)})


def test_sparsity_report_counts_zeros_per_matrix_layer_and_total(pruned_50):
    report = sparsity_report(pruned_50)
    flat = {p: np.asarray(v[...]) for p, v in flat_params(pruned_50).items()}
    zeros, size = 0, 0
    for path in PRUNABLE:
        w = flat[path]
        for layer in range(2):
            numel = w[layer].size
            # the reference's `<=` rule prunes int(numel * 0.5) + 1 weights when there are no ties
            assert report.per_matrix[path, layer] == (numel // 2 + 1) / numel
            assert report.per_matrix[path, layer] == np.mean(w[layer] == 0)
            zeros, size = zeros + int(np.sum(w[layer] == 0)), size + numel
    per_layer = {i: np.mean(np.concatenate([flat[p][i].ravel() for p in PRUNABLE]) == 0) for i in range(2)}
    assert report.per_layer == pytest.approx(per_layer)
    assert report.total == pytest.approx(zeros / size)
    assert report.nm_valid is None
    table = report.to_markdown()
    assert "q_proj" in table and "down_proj" in table and f"{100 * report.total:.2f}%" in table


def test_sparsity_report_checks_nm_groups(masks_24, pruned_50):
    report = sparsity_report(masks_24, "2:4")
    assert report.nm_valid and report.total == 0.5 and "valid in all 14" in report.to_markdown()
    assert sparsity_report(masks_24, "4:8").nm_valid  # 2:4 implies 4:8
    assert not sparsity_report(masks_24, "3:4").nm_valid
    assert not sparsity_report(pruned_50, "2:4").nm_valid
    broken = dict(masks_24)
    broken["layers.mlp.up_proj.kernel"] = masks_24["layers.mlp.up_proj.kernel"].at[1, 0:4, 5].set(True)
    report = sparsity_report(broken, "2:4")
    assert report.nm_failures == [("layers.mlp.up_proj.kernel", 1)]
    assert "INVALID" in report.to_markdown()
    odd = {"layers.attn.q_proj.kernel": jnp.zeros((1, 6, 4), bool)}  # 6 inputs cannot hold 4-groups
    assert sparsity_report(odd, "2:4").nm_valid is False
