"""The recovery baselines: LoRA, DoRA, masked LoRA, LoFiT and bias-only, on the shared trainer."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcc_jax.baselines import (
    LoraConfig,
    apply_compensation,
    apply_head_scaling,
    apply_lora,
    head_bias,
    init_bias_only,
    init_head_scaling,
    init_lora,
    merge_head_vectors,
    merge_lora,
    num_trainable,
    rank_heads,
    surviving_sparsity,
    train_lofit,
    train_lora,
)
from lcc_jax.baselines.lofit import LofitConfig, num_selection_params
from lcc_jax.baselines.lora import adapted_kernel, column_norm
from lcc_jax.config import ModelConfig
from lcc_jax.data.batching import make_batches
from lcc_jax.models import CausalLM
from lcc_jax.pruning.masks import PRUNABLE, apply_masks, nm_mask, sparsity_report
from lcc_jax.restore import compensation as restore_comp
from lcc_jax.restore.compensation import init_compensation
from lcc_jax.sharding import flat_params
from lcc_jax.train import TrainConfig
from lcc_jax.train.losses import next_token_nll
from tiny import hf_model, lcc_model, random_batch

CONFIG = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8)
FP32 = TrainConfig(learning_rate=1e-2, epochs=2, batch_size=4, compute_dtype="float32", log_every=100)
TOKENS = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 10)), jnp.int32)
MASK = jnp.ones((2, 10), jnp.int32).at[1, 7:].set(0)


@pytest.fixture(scope="module")
def model():
    return CausalLM(CONFIG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def pruned():
    """The same random model, 2:4-pruned in every prunable kernel by magnitude; (model, masks)."""
    m = CausalLM(CONFIG, rngs=nnx.Rngs(0))
    flat = flat_params(m)
    masks = {p: nm_mask(jnp.abs(flat[p][...]), 2, 4) for p in PRUNABLE}
    return apply_masks(m, masks), masks


@pytest.fixture(scope="module")
def batches():
    """Random prompts, responses mostly of tokens 1-3 (a learnable shift); 4 micro-batches of 4."""
    rng = np.random.default_rng(0)
    seqs, masks = [], []
    for _ in range(16):
        prompt = rng.integers(4, 64, rng.integers(3, 12)).tolist()
        response = rng.choice([1, 2, 3, 1, 2, 3, 40], rng.integers(4, 16)).tolist()
        seqs.append(prompt + response)
        masks.append([0.0] * len(prompt) + [1.0] * len(response))
    fixed = make_batches(seqs, 4, pad_id=0, loss_masks=masks, buckets=(32,), order="given")
    return lambda epoch: fixed


@nnx.jit
def _forward(m, tokens, mask, compensation=None):
    return m(tokens, mask, compensation=compensation).logits


@nnx.jit
def _adapted(m, trainable, setup, tokens, mask):
    return apply_lora(m, trainable, tokens, mask, constants=setup)


def _logits(m, compensation=None):
    return np.asarray(_forward(m, TOKENS, MASK, compensation))


def _lora_logits(m, trainable, setup, tokens=TOKENS, mask=MASK):
    return np.asarray(_adapted(m, trainable, setup, jnp.asarray(tokens), jnp.asarray(mask)))


def _randomise_b(trainable, key, std=0.3):
    """B (and m) away from their init, so the adapter does something."""
    out = {}
    for i, (name, p) in enumerate(trainable.items()):
        k1, k2 = jax.random.split(jax.random.fold_in(key, i))
        out[name] = {**p, "b": std * jax.random.normal(k1, (p["b"].size,)).reshape(p["b"].shape)}  # flat: fast
        if "m" in p:
            out[name]["m"] = p["m"] * (1 + 0.2 * jax.random.normal(k2, (p["m"].size,)).reshape(p["m"].shape))
    return out


@pytest.fixture(scope="module")
def twin():
    """A tiny random transformers Llama and its lcc_jax twin (needs torch, the `test` extra)."""
    pytest.importorskip("torch")
    hf = hf_model("llama")
    return hf, lcc_model(hf)


def _torch_logits(hf, tokens, mask):
    import torch

    with torch.no_grad():
        return hf(input_ids=torch.tensor(tokens).long(), attention_mask=torch.tensor(mask)).logits.numpy()


def _params(m):
    return {k: np.asarray(v[...]) for k, v in flat_params(m).items()}


# ------------------------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize("config", [LoraConfig(), LoraConfig(targets=("q", "k", "v", "o", "gate", "up", "down"),
                                                             use_dora=True, masked=True)], ids=["lora", "dora"])
def test_adapters_at_init_are_the_base_model(model, config):
    trainable, setup = init_lora(model, config, jax.random.key(0))
    assert all(float(jnp.abs(p["b"]).max()) == 0 for p in trainable.values())
    got = _lora_logits(model, trainable, setup)
    np.testing.assert_allclose(got, _logits(model), rtol=0, atol=1e-6)


def test_lora_logits_equal_x_w_plus_scaled_x_a_b(twin):
    """Against the low-rank path computed explicitly: torch hooks add scale·(x @ A) @ B to HF's q, v, down outputs."""
    import torch

    hf, ours = twin
    trainable, setup = init_lora(ours, LoraConfig(rank=4, alpha=8, targets=("q_proj", "v", "down")), jax.random.key(0))
    trainable = _randomise_b(trainable, jax.random.key(1))
    tokens, mask = random_batch()
    modules = {"q": "self_attn.q_proj", "v": "self_attn.v_proj", "down": "mlp.down_proj"}

    def low_rank(a, b):
        a, b = torch.tensor(np.asarray(a)), torch.tensor(np.asarray(b))
        return lambda module, args, out: out + 2.0 * (args[0] @ a) @ b  # x@W + scale·x@A@B

    handles = [layer.get_submodule(attr).register_forward_hook(low_rank(trainable[n]["a"][i], trainable[n]["b"][i]))
               for n, attr in modules.items() for i, layer in enumerate(hf.model.layers)]
    try:
        reference = _torch_logits(hf, tokens, mask)
    finally:
        for h in handles:
            h.remove()
    got = _lora_logits(ours, trainable, setup, tokens, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], reference[real], rtol=0, atol=2e-5)
    assert np.abs(reference - _torch_logits(hf, tokens, mask))[real].max() > 1e-3  # the adapter does something


def test_dora_matches_a_numpy_reference_in_torch_layout(model):
    trainable, setup = init_lora(model, LoraConfig(rank=4, alpha=8, targets=("o",), use_dora=True), jax.random.key(0))
    p = _randomise_b(trainable, jax.random.key(3))["o"]
    w = np.asarray(flat_params(model)["layers.attn.o_proj.kernel"][...], np.float64)
    got = np.asarray(adapted_kernel(jnp.asarray(w, jnp.float32), p, 2.0))
    for layer in range(CONFIG.num_layers):
        weight = w[layer].T  # torch (out, in)
        lora_a = np.asarray(p["a"][layer], np.float64).T  # lora_A.weight (r, in)
        lora_b = np.asarray(p["b"][layer], np.float64).T  # lora_B.weight (out, r)
        v = weight + 2.0 * lora_b @ lora_a
        norm = np.linalg.norm(v, axis=1)  # PEFT get_weight_norm: dim=1, one norm per output
        expected = (np.asarray(p["m"][layer]) / norm)[:, None] * v  # (out, in)
        np.testing.assert_allclose(got[layer], expected.T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(trainable["o"]["m"], np.linalg.norm(w, axis=1), rtol=1e-6)  # m = ‖W‖_c at init


def test_dora_norm_is_detached_as_in_peft(model):
    trainable, _ = init_lora(model, LoraConfig(rank=4, targets=("q",), use_dora=True), jax.random.key(0))
    p = _randomise_b(trainable, jax.random.key(4))["q"]
    w = flat_params(model)["layers.attn.q_proj.kernel"][...]
    probe = jax.random.normal(jax.random.key(5), (w.size,)).reshape(w.shape)
    norm = column_norm(adapted_kernel(w, {"a": p["a"], "b": p["b"]}, 2.0))  # a constant: no gradient

    def ours(b):
        return jnp.sum(adapted_kernel(w, {**p, "b": b}, 2.0) * probe)

    def constant_norm(b):
        return jnp.sum((w + 2.0 * jnp.einsum("lir,lro->lio", p["a"], b)) * (p["m"] / norm)[:, None] * probe)

    def through_norm(b):
        v = w + 2.0 * jnp.einsum("lir,lro->lio", p["a"], b)
        return jnp.sum(v * (p["m"] / column_norm(v))[:, None] * probe)

    np.testing.assert_allclose(jax.grad(ours)(p["b"]), jax.grad(constant_norm)(p["b"]), rtol=1e-5, atol=1e-6)
    assert not np.allclose(jax.grad(ours)(p["b"]), jax.grad(through_norm)(p["b"]), atol=1e-4)


def test_peft_parity_for_lora_and_dora(twin):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")

    _, ours = twin
    modules = {"q": "self_attn.q_proj", "v": "self_attn.v_proj", "down": "mlp.down_proj"}
    tokens, mask = random_batch()
    real = mask.astype(bool)

    def stacked(wrapped, attr, get):
        layers = wrapped.base_model.model.model.layers
        return np.stack([get(layer.get_submodule(attr)).detach().numpy() for layer in layers])

    for dora in (False, True):
        wrapped = peft.get_peft_model(hf_model("llama"), peft.LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, use_dora=dora, target_modules=["q_proj", "v_proj", "down_proj"]))
        trainable, setup = init_lora(ours, LoraConfig(rank=4, alpha=8, targets=tuple(modules), use_dora=dora),
                                     jax.random.key(0))
        torch.manual_seed(1)
        with torch.no_grad():
            for name, attr in modules.items():
                if dora:  # both start at ‖W‖_c
                    magnitude = stacked(wrapped, attr, lambda m: m.lora_magnitude_vector["default"].weight)
                    np.testing.assert_allclose(trainable[name]["m"], magnitude, rtol=1e-5)
            for name, param in wrapped.named_parameters():
                if "lora_B" in name or "lora_magnitude" in name:
                    param.add_(torch.randn_like(param) * 0.1)
        reference = _torch_logits(wrapped, tokens, mask)
        for name, attr in modules.items():  # torch (r, in) / (out, r) weights -> our (layers, in, r) / (layers, r, out)
            trainable[name]["a"] = jnp.asarray(stacked(wrapped, attr, lambda m: m.lora_A["default"].weight.T))
            trainable[name]["b"] = jnp.asarray(stacked(wrapped, attr, lambda m: m.lora_B["default"].weight.T))
            if dora:
                trainable[name]["m"] = jnp.asarray(
                    stacked(wrapped, attr, lambda m: m.lora_magnitude_vector["default"].weight))
        got = _lora_logits(ours, trainable, setup, tokens, mask)
        np.testing.assert_allclose(got[real], reference[real], rtol=0, atol=2e-5)


def test_fit_trains_only_the_adapter_and_the_masked_merge_keeps_every_zero(pruned, batches):
    model, masks = pruned
    before = _params(model)
    config = LoraConfig(rank=4, targets=("q", "o", "down"), use_dora=True, masked=True)
    init, _ = init_lora(model, config, jax.random.key(0))
    result = train_lora(model, batches, dataclasses.replace(FP32, learning_rate=3e-2), config, jax.random.key(0))
    losses = result.train.history["loss"]  # the same 4 batches in both epochs
    assert result.train.steps == 8 and all(b < a - 0.01 for a, b in zip(losses[:4], losses[4:])), losses
    assert all(np.array_equal(before[k], v) for k, v in _params(model).items())  # frozen weights bit-identical
    for name, p in result.trainable.items():
        assert float(jnp.abs(p["b"]).max()) > 0 and not np.allclose(p["m"], init[name]["m"])  # B and m trained
    merged = merge_lora(model, result.trainable, result.setup)
    np.testing.assert_allclose(_logits(merged), _lora_logits(model, result.trainable, result.setup), atol=1e-5)
    survival = surviving_sparsity(merged, masks)
    assert survival.survival == 1.0 and survival.revived == 0
    assert survival.surviving == survival.target == 0.5
    assert sparsity_report(merged, "2:4").nm_valid


def test_explicit_masks_equal_the_weights_zeros(pruned, model):
    pruned_model, masks = pruned
    config = LoraConfig(rank=4, targets=("q", "up"), masked=True)
    trainable, from_zeros = init_lora(pruned_model, config, jax.random.key(0))
    _, explicit = init_lora(pruned_model, config, jax.random.key(0), masks=masks)
    assert from_zeros.masks is None and set(explicit.masks) == {"q", "up"}
    trainable = _randomise_b(trainable, jax.random.key(1))
    np.testing.assert_array_equal(_lora_logits(pruned_model, trainable, from_zeros),
                                  _lora_logits(pruned_model, trainable, explicit))
    # masking at merge time: a dense-trained adapter merged under the masks keeps the zeros too
    dense_setup = init_lora(pruned_model, dataclasses.replace(config, masked=False), jax.random.key(0))[1]
    assert surviving_sparsity(merge_lora(pruned_model, trainable, dense_setup, masks=masks), masks).survival == 1.0


def test_dense_merge_reports_the_lost_sparsity(pruned):
    model, masks = pruned
    trainable, setup = init_lora(model, LoraConfig(), jax.random.key(0))  # q and v, unmasked
    merged = merge_lora(model, _randomise_b(trainable, jax.random.key(1)), setup)
    survival = surviving_sparsity(merged, masks)
    q, v = "layers.attn.q_proj.kernel", "layers.attn.v_proj.kernel"
    assert survival.per_matrix[q] == survival.per_matrix[v] == 0.0  # every pruned q/v weight revived
    assert all(survival.per_matrix[p] == 1.0 for p in masks if p not in (q, v))
    size = {p: int(m.size) for p, m in masks.items()}
    assert survival.revived == (size[q] + size[v]) // 2
    assert survival.surviving < survival.target == 0.5
    assert "revived" in survival.summary()
    assert surviving_sparsity(model, masks).survival == 1.0  # the pruned model itself is untouched


# ------------------------------------------------------------------------------ LoFiT and bias-only


def test_rank_heads_picks_the_largest_scaling_norms():
    scale = np.zeros((2, 4, 8), np.float32)
    scale[1, 2] = 0.5  # norm 0.5·√8, the largest
    scale[0, 3, 0] = -1.0  # norm 1
    scale[0, 0, :2] = 0.3  # norm 0.42
    scores, ranking = rank_heads(scale)
    assert scores.shape == (2, 4)
    assert ranking[:3].tolist() == [1 * 4 + 2, 3, 0]
    assert sorted(ranking.tolist()) == list(range(8))


def test_head_scaling_and_bias_match_lofit_reference_hooks(twin):
    """LoFiT's reference: o_proj input ← (A + 1) ⊙ z + v, per head, as a torch pre-hook on HF's o_proj."""
    import torch

    hf, ours = twin
    c = ours.config
    scale = init_head_scaling(c, jax.random.key(0), std=0.3)
    comp = head_bias([5, 0, 9], c, jax.random.key(1), std=0.3)
    tokens, mask = random_batch()
    real = mask.astype(bool)

    def reference(a, v):
        handles = [layer.self_attn.o_proj.register_forward_pre_hook(
            lambda mod, args, i=i: (args[0] * (1 + torch.tensor(a[i]).reshape(-1)) + torch.tensor(v[i]).reshape(-1),))
            for i, layer in enumerate(hf.model.layers)]
        try:
            return _torch_logits(hf, tokens, mask)
        finally:
            for h in handles:
                h.remove()

    a = np.asarray(scale["scale"])
    zero = np.zeros_like(a)
    v = zero.reshape(-1, c.head_dim).copy()
    v[np.asarray(comp.heads)] = np.asarray(comp.bias)
    v = v.reshape(a.shape)
    got = apply_head_scaling(ours, scale, jnp.asarray(tokens), jnp.asarray(mask), constants={"l1_lambda": 0.0})
    np.testing.assert_allclose(np.asarray(got)[real], reference(a, zero)[real], atol=2e-5)
    trainable, frozen = restore_comp.split_trainable(comp)
    got = apply_compensation(ours, trainable, jnp.asarray(tokens), jnp.asarray(mask), constants=frozen)
    np.testing.assert_allclose(np.asarray(got)[real], reference(zero, v)[real], atol=2e-5)


def test_lofit_bias_is_a_compensation_of_the_same_vectors_and_folds(pruned):
    model, masks = pruned
    comp = head_bias(np.array([6, 1]), CONFIG, jax.random.key(0), std=0.5)
    assert restore_comp.num_trainable(comp) == 2 * CONFIG.head_dim and comp.mode == "bias_only"
    dense = np.zeros((CONFIG.num_layers, CONFIG.num_heads, CONFIG.head_dim), np.float32)
    dense[1, 2], dense[0, 1] = comp.bias[0], comp.bias[1]  # head 6 = (layer 1, head 2), head 1 = (0, 1)
    trainable, frozen = restore_comp.split_trainable(comp)
    got = np.asarray(apply_compensation(model, trainable, TOKENS, MASK, constants=frozen))
    np.testing.assert_allclose(got, _logits(model, jnp.asarray(dense)), atol=1e-6)
    folded = merge_head_vectors(model, comp)
    np.testing.assert_allclose(_logits(folded), got, atol=1e-5)
    kernels = _params(folded)
    assert all(np.array_equal(kernels[p], np.asarray(flat_params(model)[p][...])) for p in masks)  # zeros kept


def test_bias_only_is_restorelcc_bias_only_mode():
    ranking = np.array([5, 2, 7, 0, 1, 3, 4, 6])
    basis = np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32)
    ours = init_bias_only(ranking, 3, CONFIG, jax.random.key(7))
    theirs = init_compensation(basis, ranking, 3, jax.random.key(7), mode="bias_only")
    assert ours.heads.tolist() == theirs.heads.tolist() == [5, 2, 7]
    np.testing.assert_array_equal(ours.bias, theirs.bias)
    np.testing.assert_array_equal(restore_comp.dense_compensation(ours, CONFIG),
                                  restore_comp.dense_compensation(theirs, CONFIG))
    assert restore_comp.num_trainable(ours) == 3 * CONFIG.head_dim
    assert init_bias_only(ranking, 0.25, CONFIG, jax.random.key(7)).heads.tolist() == [5, 2]


def test_l1_term_gives_the_gradient_of_mean_nll_plus_lambda_l1(model, batches):
    batch = batches(0)[0]
    tokens, attn, loss_mask = (jnp.asarray(x) for x in (batch.tokens, batch.attention_mask, batch.loss_mask))
    scale = init_head_scaling(CONFIG, jax.random.key(0), std=0.05)
    lam = 0.3

    @jax.jit
    @functools.partial(jax.grad, has_aux=True)
    def trainer_grad(t, lam):  # what fit differentiates per micro-batch (then divides by the step's targets)
        logits = apply_head_scaling(model, t, tokens, attn, constants={"l1_lambda": lam})
        return next_token_nll(logits, tokens, loss_mask, attn)

    grads, count = trainer_grad(scale, lam)
    nll_grads, _ = trainer_grad(scale, 0.0)
    assert int(count) == int(np.sum(batch.loss_mask[:, 1:] * batch.attention_mask[:, 1:]))
    # the reference's loss, mean NLL + λ·Σ|A|, has gradient ∇(NLL sum)/count + λ·sign(A)
    expected = nll_grads["scale"] / count + lam * jnp.sign(scale["scale"])
    np.testing.assert_allclose(grads["scale"] / count, expected, rtol=1e-5, atol=1e-7)


def test_train_lofit_selects_heads_then_trains_only_their_biases(model, batches):
    config = LofitConfig(top_k=3, l1_lambda=1e-3)
    before = _params(model)
    result = train_lofit(model, batches, dataclasses.replace(FP32, epochs=1), config, jax.random.key(0))
    selection = result.selection
    assert selection.train.steps == 4 and result.train.steps == 4
    assert selection.heads.tolist() == rank_heads(selection.scale)[1][:3].tolist()
    assert result.compensation.heads.tolist() == selection.heads.tolist()
    assert float(jnp.abs(result.compensation.beta).max()) == 0.0 and result.compensation.mode == "bias_only"
    init = head_bias(selection.heads, CONFIG, jax.random.split(jax.random.key(0))[1])
    assert not np.allclose(result.compensation.bias, init.bias)
    assert all(np.array_equal(before[k], v) for k, v in _params(model).items())


def test_trainable_counts_and_config_checks(model):
    layers, hidden, kv = CONFIG.num_layers, CONFIG.hidden_size, CONFIG.num_kv_heads * CONFIG.head_dim
    wanda, _ = init_lora(model, LoraConfig(), jax.random.key(0))  # q: 32 -> 32, v: 32 -> 16
    assert num_trainable(wanda) == layers * 8 * ((hidden + hidden) + (hidden + kv))
    dora, _ = init_lora(model, LoraConfig(use_dora=True), jax.random.key(0))
    assert num_trainable(dora) == num_trainable(wanda) + layers * (hidden + kv)
    assert num_selection_params(CONFIG) == num_trainable(init_head_scaling(CONFIG, jax.random.key(0))) == 64
    gaussian, _ = init_lora(model, LoraConfig(rank=4, init="gaussian"), jax.random.key(0))
    assert 0.15 < float(jnp.std(gaussian["q"]["a"])) < 0.35  # N(0, 1/r)
    kaiming = wanda["q"]["a"]
    assert float(jnp.abs(kaiming).max()) <= 1 / np.sqrt(hidden)  # U(±1/√in)
    assert LoraConfig(targets=("q_proj", "down_proj")).targets == ("q", "down")
    with pytest.raises(ValueError, match="dropout"):
        LoraConfig(dropout=0.05)
    with pytest.raises(ValueError, match="unknown target"):
        LoraConfig(targets=("lm_head",))
