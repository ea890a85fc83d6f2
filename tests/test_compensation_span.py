"""benchmarks.compensation_span: a folded compensation is one bias per layer, in the span its heads' o_proj rows reach."""

from __future__ import annotations

import json

import jax
import numpy as np

from benchmarks.compensation_span import o_proj_kernels, reachable_dimension
from lcc_jax.restore.fold import fold_compensation
from tests.model_utils import SMALL_CONFIG, random_model

CONFIG = SMALL_CONFIG  # 2 layers, 4 heads of 8, hidden 32: every layer's o_proj kernel is 32 x 32
HEADS = np.array([1, 2, 5])  # flat l·H + h: layer 0 heads 1 and 2, layer 1 head 1


def _folded_bias(model, heads: np.ndarray, seed: int) -> np.ndarray:
    """(layers, hidden): the o_proj bias after folding a random compensation on `heads` only."""
    delta = np.zeros((CONFIG.num_layers, CONFIG.num_heads, CONFIG.head_dim), np.float32)
    for flat in heads:
        delta[flat // CONFIG.num_heads, flat % CONFIG.num_heads] = np.random.default_rng(seed + flat).normal(
            size=CONFIG.head_dim)
    folded = fold_compensation(model, jax.numpy.asarray(delta))
    return np.asarray(folded.layers.attn.o_proj.bias[...], dtype=np.float64)


def test_folded_biases_fill_exactly_the_span_the_function_reports():
    model = random_model(CONFIG)
    kernels = o_proj_kernels(model)
    reach = reachable_dimension(kernels, HEADS, CONFIG.num_heads, CONFIG.head_dim)
    assert reach["per_layer"] == [16, 8] and reach["dimension"] == 24 and reach["layers_touched"] == 2
    biases = np.stack([_folded_bias(model, HEADS, seed) for seed in range(0, 400, 10)])  # (40, layers, hidden)
    for layer, dim in enumerate(reach["per_layer"]):
        # many random compensations on these heads: their folded biases span a space of exactly that dimension
        assert np.linalg.matrix_rank(biases[:, layer], tol=1e-6) == dim
    # and a head outside the set moves the bias out of that span
    other = _folded_bias(model, np.array([3]), seed=7)[0]
    basis = np.linalg.svd(biases[:, 0].T, full_matrices=False)[0][:, : reach["per_layer"][0]]  # float32 rounding aside
    residual = other - basis @ (basis.T @ other)
    assert np.linalg.norm(residual) > 1e-2 * np.linalg.norm(other)
    inside = _folded_bias(model, np.array([2]), seed=7)[0]  # a head of the set stays inside it
    assert np.linalg.norm(inside - basis @ (basis.T @ inside)) < 1e-5 * np.linalg.norm(inside)


def test_a_head_whose_o_proj_rows_are_zero_reaches_nothing():
    model = random_model(CONFIG)
    kernels = o_proj_kernels(model)
    kernels[0, 1 * CONFIG.head_dim:2 * CONFIG.head_dim] = 0.0  # layer 0, head 1 pruned away entirely
    reach = reachable_dimension(kernels, HEADS, CONFIG.num_heads, CONFIG.head_dim)
    assert reach["per_layer"] == [8, 8]
    every_head = reachable_dimension(kernels, np.arange(CONFIG.num_layers * CONFIG.num_heads), CONFIG.num_heads,
                                     CONFIG.head_dim)
    assert every_head["dimension"] == 2 * CONFIG.hidden_size - CONFIG.head_dim


def test_the_script_reports_members_beside_their_losses(tmp_path, monkeypatch):
    from benchmarks import compensation_span

    model = random_model(CONFIG)
    monkeypatch.setattr("lcc_jax.load", lambda source: (model, None, CONFIG))
    members = tmp_path / "seed0"
    members.mkdir()
    (members / "a.json").write_text(json.dumps({"member": "probe:full:0.25:1e-3", "heads": HEADS.tolist(),
                                                "valid_loss": 2.3, "ppl": 42.0, "trainable_params": 48}))
    (members / "b.json").write_text(json.dumps({"member": "probe:span2:0.25:1e-2", "heads": HEADS.tolist(),
                                                "valid_loss": 2.5, "ppl": 47.0, "trainable_params": 6}))
    (members / "notes.json").write_text(json.dumps({"not": "a member"}))
    out = tmp_path / "span.json"
    compensation_span.main(["tiny", "--members", str(members), "--out", str(out)])
    report = json.loads(out.read_text())
    dense = report["dense"]
    assert dense["rank_sum"] == dense["full_dimension"] == CONFIG.num_layers * CONFIG.hidden_size
    assert dense["members"] == {
        "probe:full:0.25:1e-3": {"heads": 3, "dimension": 24, "layers_touched": 2, "per_layer": [16, 8],
                                 "trainable": 48, "valid_loss": 2.3, "ppl": 42.0},
        # two lost directions per head: at most 2 x 3 dimensions, whatever the heads' rows reach
        "probe:span2:0.25:1e-2": {"heads": 3, "dimension": 6, "layers_touched": 2, "per_layer": None, "bound": True,
                                  "trainable": 6, "valid_loss": 2.5, "ppl": 47.0}}
