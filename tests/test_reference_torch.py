"""The PyTorch reference pipeline (benchmarks/reference_torch) on the tiny shape, on the CPU.

What the speed comparison relies on: the o_proj hooks read and change exactly the right tensor,
training touches only β and b, Wanda and SparseGPT prune as their public code does, and the command
line writes the report the lcc_jax side pairs with.
"""

from __future__ import annotations

import functools
import json
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from benchmarks.reference_torch import data  # noqa: E402
from benchmarks.reference_torch.batching import training_batch  # noqa: E402
from benchmarks.reference_torch.capture import capture_batched, capture_reference  # noqa: E402
from benchmarks.reference_torch.cli import main  # noqa: E402
from benchmarks.reference_torch.hooks import Compensation, OProjCapture  # noqa: E402
from benchmarks.reference_torch.model import build_model  # noqa: E402
from benchmarks.reference_torch.shapes import get_shape, model_flops  # noqa: E402
from benchmarks.reference_torch.sparsegpt import SparseGPT  # noqa: E402
from benchmarks.reference_torch.train_step import make_compensation, make_optimizer, random_basis, train_step  # noqa: E402
from benchmarks.reference_torch.wanda import InputNorms, prune_wanda, wanda_mask  # noqa: E402

CPU = torch.device("cpu")
TINY = get_shape("tiny")


@functools.cache
def fp32_model():
    """The tiny model in fp32, so hook results can be compared with a manual computation exactly."""
    return build_model(TINY, CPU, torch.float32)


def manual_o_proj_inputs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, the (T, H·d_h) o_proj input computed by hand: norm, q/k/v, rotate-half RoPE, causal softmax, PV."""
    cfg = model.config
    heads, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    t = ids.shape[0]
    inv_freq = 1.0 / (TINY.rope_theta ** (torch.arange(0, d, 2).float() / d))
    angles = torch.outer(torch.arange(t).float(), inv_freq).repeat(1, 2)
    cos, sin = angles.cos(), angles.sin()

    def rope(x):
        return x * cos + torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1) * sin

    with torch.no_grad():
        hidden = model(ids[None], output_hidden_states=True).hidden_states
        out = []
        for index, layer in enumerate(model.model.layers):
            x = layer.input_layernorm(hidden[index][0])
            attn = layer.self_attn
            q = rope(attn.q_proj(x).view(t, heads, d).transpose(0, 1))
            k = rope(attn.k_proj(x).view(t, kv, d).transpose(0, 1)).repeat_interleave(heads // kv, 0)
            v = attn.v_proj(x).view(t, kv, d).transpose(0, 1).repeat_interleave(heads // kv, 0)
            scores = q @ k.transpose(-1, -2) / math.sqrt(d)
            scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
            out.append((scores.softmax(-1) @ v).transpose(0, 1).reshape(t, heads * d))
    return out


def test_shape_counts_match_the_built_model():
    model = fp32_model()
    linears = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert TINY.total_params() == model.num_parameters()
    assert TINY.matmul_params(lm_head=True) == linears  # the tied lm_head is its own nn.Linear module
    fwd = model_flops(TINY, [10, 20], backward=False)
    attention = 2 * TINY.num_layers * TINY.num_heads * TINY.head_dim * (10**2 + 20**2)
    assert fwd == 2 * linears * 30 + attention
    assert model_flops(TINY, [10, 20], backward=True) == 4 * linears * 30 + 3 * attention


def test_synthetic_data_is_deterministic_and_in_range():
    a = data.training_samples(16, TINY.vocab_size, seed=3)
    b = data.training_samples(16, TINY.vocab_size, seed=3)
    assert all((x.ids == y.ids).all() and x.prompt_len == y.prompt_len for x, y in zip(a, b))
    assert all(120 <= len(s) <= 500 and 0 < s.prompt_len < len(s) for s in a)
    assert all(s.ids.min() >= data.FIRST_TOKEN and s.ids.max() < TINY.vocab_size for s in a)
    lengths = data.capture_lengths(64, seed=0)
    assert lengths.min() >= 50 and lengths.max() <= 150
    q, pos, neg = data.probing_triples(8, TINY.vocab_size, seed=0, max_len=64)
    assert all((p[: len(x)] == x).all() and (n[: len(x)] == x).all() and len(p) <= 64 for x, p, n in zip(q, pos, neg))


def test_capture_equals_manual_o_proj_input_last_token():
    model = fp32_model()
    seqs = data.token_sequences([5, 9, 3], TINY.vocab_size, seed=1)
    expected = torch.stack([torch.cat([o[-1] for o in manual_o_proj_inputs(model, torch.as_tensor(s))])
                            for s in seqs]).reshape(3, TINY.total_heads, TINY.head_dim)
    reference = capture_reference(model, seqs, CPU)
    batched = capture_batched(model, seqs, CPU, batch_size=2)  # right padding inside a batch
    assert reference.shape == (3, TINY.total_heads, TINY.head_dim)
    torch.testing.assert_close(reference, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched, expected, atol=1e-5, rtol=1e-5)


def test_compensation_adds_o_proj_of_delta_on_chosen_heads_only():
    model = fp32_model()
    heads = [1, TINY.num_heads + 2]  # layer 0 head 1, layer 1 head 2
    generator = torch.Generator().manual_seed(0)
    comp = Compensation(heads, random_basis(2, TINY.head_dim, generator), TINY.num_heads, std=0.1, generator=generator)
    comp.attach(model)
    capture = OProjCapture(model, last_only=False)  # registered after: sees the compensated input
    try:
        proj = model.model.layers[1].self_attn.o_proj
        x = torch.randn(2, 3, TINY.num_heads * TINY.head_dim)
        with torch.no_grad():
            hooked = proj(x)
            delta = torch.einsum("i,id->d", comp.beta[1], comp.basis[1]) + comp.bias[1]
            full = torch.zeros(TINY.num_heads, TINY.head_dim)
            full[2] = delta
            torch.testing.assert_close(hooked, x @ proj.weight.T + proj.weight @ full.reshape(-1))
            seen = capture.pop()[0] - x  # layer 1's door got x + δ at head 2 only
        torch.testing.assert_close(seen, full.reshape(-1).expand_as(seen))
    finally:
        comp.detach_hooks()
        capture.remove()


def test_train_step_changes_only_beta_and_bias_and_lowers_loss():
    model = fp32_model()
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    comp = make_compensation(TINY, 0.5, CPU, seed=0)
    basis, beta, bias = comp.basis.clone(), comp.beta.detach().clone(), comp.bias.detach().clone()
    comp.attach(model)
    optimizer, scheduler = make_optimizer(comp, total_steps=100, lr=3e-2)
    batch = training_batch(data.training_samples(2, TINY.vocab_size, seed=0, low=16, high=32))
    try:
        with torch.enable_grad():
            losses = [float(train_step(model, comp, optimizer, scheduler, batch, CPU)) for _ in range(5)]
    finally:
        comp.detach_hooks()
    assert losses[-1] < losses[0]
    assert all(torch.equal(v, frozen[k]) for k, v in model.state_dict().items())
    assert torch.equal(comp.basis, basis)
    assert not torch.equal(comp.beta.detach(), beta) and not torch.equal(comp.bias.detach(), bias)
    assert all(p.grad is None for p in model.parameters())


def loop_wanda_mask(weight: torch.Tensor, norms_sq: torch.Tensor, prune_n: int = 0, prune_m: int = 0) -> torch.Tensor:
    """Wanda by hand: score |W_ij|·‖X_j‖, prune the lowest half of each row or the lowest n of each m."""
    rows, cols = weight.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for r in range(rows):
        score = [abs(float(weight[r, j])) * math.sqrt(float(norms_sq[j])) for j in range(cols)]
        groups = [range(g, g + prune_m) for g in range(0, cols, prune_m)] if prune_n else [range(cols)]
        drop = prune_n if prune_n else cols // 2
        for group in groups:
            for j in sorted(group, key=lambda j: score[j])[:drop]:
                mask[r, j] = True
    return mask


@pytest.mark.parametrize("prune_n,prune_m", [(0, 0), (2, 4)])
def test_wanda_mask_matches_loop(prune_n, prune_m):
    generator = torch.Generator().manual_seed(0)
    weight, norms_sq = torch.randn(6, 16, generator=generator), torch.rand(16, generator=generator) + 0.1
    mask = wanda_mask(weight, norms_sq, 0.5, prune_n, prune_m)
    assert torch.equal(mask, loop_wanda_mask(weight, norms_sq, prune_n, prune_m))
    assert (mask.sum(1) == 8).all()


def test_input_norms_are_mean_squared_column_norms_over_windows():
    windows = [torch.randn(1, 7, 5) for _ in range(3)]
    norms = InputNorms(torch.nn.Linear(5, 2))
    for w in windows:
        norms.add_batch(w)
    expected = sum((w[0] ** 2).sum(0) for w in windows) / 3
    torch.testing.assert_close(norms.scaler_row, expected)


def test_prune_wanda_on_model_matches_manual_first_layer_mask_and_halves_every_row():
    model = build_model(TINY, CPU, torch.float32)
    calibration = torch.from_numpy(data.calibration_tokens(3, 12, TINY.vocab_size, seed=0))
    with torch.no_grad():
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(calibration))  # q_proj's input
    q_proj = model.model.layers[0].self_attn.q_proj
    expected = loop_wanda_mask(q_proj.weight.detach(), (x**2).sum(1).mean(0))
    prune_wanda(model, calibration, CPU)
    assert torch.equal(q_proj.weight == 0, expected)
    for layer in model.model.layers:
        for linear in (m for m in layer.modules() if isinstance(m, torch.nn.Linear)):
            assert ((linear.weight == 0).sum(1) == linear.in_features // 2).all()


def sparsegpt_setup(seed: int = 0):
    """A 256→24 linear and correlated inputs (4 windows of 64 tokens)."""
    generator = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(256, 24, bias=False)
    layer.weight.data = torch.randn(24, 256, generator=generator)
    mix = torch.randn(256, 256, generator=generator) / 16 + torch.eye(256)
    windows = [torch.randn(1, 64, 256, generator=generator) @ mix for _ in range(4)]
    return layer, windows


def magnitude_prune(weight: torch.Tensor, prune_n: int, prune_m: int) -> torch.Tensor:
    score = weight.abs()
    if not prune_n:
        drop = torch.topk(score, weight.shape[1] // 2, dim=1, largest=False)[1]
        return weight.scatter(1, drop, 0)
    groups = score.reshape(weight.shape[0], -1, prune_m)
    drop = torch.topk(groups, prune_n, dim=-1, largest=False)[1]
    return weight.reshape(groups.shape).scatter(-1, drop, 0).reshape(weight.shape)


@pytest.mark.parametrize("prune_n,prune_m", [(0, 0), (2, 4)])
def test_sparsegpt_exact_sparsity_and_beats_magnitude(prune_n, prune_m):
    layer, windows = sparsegpt_setup()
    dense = layer.weight.data.clone()
    gpt = SparseGPT(layer)
    for w in windows:
        gpt.add_batch(w)
    expected_h = 2 * sum(w[0].T @ w[0] for w in windows) / len(windows)
    torch.testing.assert_close(gpt.H, expected_h, rtol=1e-4, atol=1e-3)
    gpt.fasterprune(0.5, prune_n, prune_m)
    zeros = layer.weight.data == 0
    if prune_n:
        assert (zeros.reshape(24, -1, 4).sum(-1) == 2).all()
    else:  # as the original: a block's threshold is itself pruned, so each 128-column block loses one more
        for block in zeros.split(128, dim=1):
            assert int(block.sum()) == block.numel() // 2 + 1
    x = torch.cat([w[0] for w in windows])

    def error(weight):
        return float(((x @ weight.T - x @ dense.T) ** 2).sum())

    assert error(layer.weight.data) < 0.8 * error(magnitude_prune(dense, prune_n, prune_m))


def test_cli_runs_every_stage_and_writes_the_report(tmp_path):
    out = tmp_path / "results.json"
    main(["--shape", "tiny", "--device", "cpu", "--stages", "capture,train,wanda,sparsegpt,job",
          "--capture-samples", "4", "--capture-batched-samples", "8", "--capture-batch", "4",
          "--capture-min-len", "8", "--capture-max-len", "24", "--capture-warmup", "1",
          "--train-steps", "2", "--train-warmup", "1", "--train-batch", "2", "--train-min-len", "16",
          "--train-max-len", "32", "--nsamples", "2", "--seqlen", "32", "--fraction", "0.1",
          "--probe-samples", "10", "--probe-max-len", "32", "--job-train-samples", "8", "--job-max-len", "32",
          "--out", str(out)])
    report = json.loads(out.read_text())
    assert set(report) == {"device", "versions", "peak_bf16_tflops", "records"}
    assert report["peak_bf16_tflops"] is None and report["versions"]["torch"] == torch.__version__
    keys = {"stage", "impl", "shape", "seconds", "tokens_per_s", "samples_per_s", "steps_per_s", "mfu",
            "model_flops", "peak_mem_gib", "extrapolated", "notes"}
    records = report["records"]
    assert all(keys <= set(r) and r["seconds"] > 0 and r["peak_mem_gib"] is None for r in records)
    kinds = [(r["stage"], r["impl"], r.get("variant"), r["extrapolated"]) for r in records]
    assert kinds == [
        ("capture", "torch_reference", "one_at_a_time", False), ("capture", "torch_batched", "batch4", False),
        ("train_step", "torch_reference", "batch2", False), ("wanda", "torch_reference", "unstructured", False),
        ("sparsegpt_layer", "torch_reference", "unstructured", False),
        ("sparsegpt_layer", "torch_reference", "2:4", False),
        ("sparsegpt_model", "torch_reference", "unstructured", False),
        ("job", "torch_reference", "reference", False), ("job", "torch_reference", "reference", True)]
    train = records[2]
    assert train["model_flops"] > 0 and train["steps_per_s"] > 0 and math.isfinite(train["loss_last"])
    measured, full = records[-2:]
    assert full["seconds"] > measured["seconds"]
    assert all(p["units"] <= p["full_units"] for p in full["phases"].values())
