"""RestoreLCC stage by stage against a small PyTorch re-statement of the reference semantics.

One tiny random Llama (2 layers x 4 heads, so L != H and the reference's head-index bug would show)
lives twice: in transformers (`LlamaForCausalLM`, eager attention, fp32) and in lcc_jax, with the same
weights; a 50 % magnitude-pruned copy likewise. The PyTorch side below is our own re-statement of the
method as DESIGN.md describes it (written from the description, not from the authors' code):

  (a) pairs: r⁻ = the most cosine-similar other response of the whole pool (same embedder given to both);
  (b) last-token o_proj inputs, read with a forward pre-hook on every o_proj, one text at a time, unpadded;
  (c) per head ΔZ = Z_dense(q) − Z_pruned(q) (fp32, not centred), SVD, c = Σ_{i<K} mean_n U[n,i]·S_i·v_i,
      basis = rows of Vᵀ, L2-normalised, zero-padded to d x d;
  (d) per head logistic regression on [z_pruned(q) + c ; z_dense(q + r±)], sigmoid + BCELoss, Adam lr 0.01,
      200 full-batch epochs, 70/30 split by pair as sklearn's train_test_split(random_state=42);
  (e) δ_h = V_hᵀβ_h + b_h added before o_proj on the top-k heads (index l·H + h), next-token CE on the
      response tokens only (trl's completion-only collator: every label up to the end of the response
      template is ignored), torch AdamW, HF's linear schedule, clip_grad_norm_ 1.0.

Each stage is compared with lcc_jax's own stage function, fed the same inputs. Negative checks inside
the tests show that a changed completion-only mask, probe split or head index would make them fail.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import zlib

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lcc_jax.data.batching import make_batches  # noqa: E402
from lcc_jax.data.instructions import load_instructions  # noqa: E402
from lcc_jax.data.negatives import make_pairs  # noqa: E402
from lcc_jax.restore.capture import capture_dense, capture_pruned  # noqa: E402
from lcc_jax.restore.compensation import init_compensation, split_trainable  # noqa: E402
from lcc_jax.restore.components import REFERENCE_K, lost_components  # noqa: E402
from lcc_jax.restore.config import RestoreConfig  # noqa: E402
from lcc_jax.restore.pipeline import _apply_compensation  # noqa: E402
from lcc_jax.restore.probe import ProbeConfig, init_probe, train_probes  # noqa: E402
from lcc_jax.restore.steps import training_data  # noqa: E402
from lcc_jax.train import TrainConfig, fit  # noqa: E402

pytestmark = pytest.mark.parity

POOL, PROBE, TRAIN, BATCH, TOP_K = 26, 20, 8, 4, 3  # negatives from POOL samples; probe on the first PROBE
MAX_TOKENS = 64  # short texts: one capture bucket, fast on a CPU
TEMPLATE = "\n\n### Response:"  # the reference's response template for Alpaca
LR = 1e-3


# ------------------------------------------------------------------------------ the re-statement


def embed(texts) -> np.ndarray:
    """A deterministic stand-in sentence embedder (character-trigram hashes), given to both sides."""
    out = np.zeros((len(texts), 97), np.float32)
    for row, text in enumerate(texts):
        for i in range(len(text) - 2):
            out[row, zlib.crc32(text[i : i + 3].encode()) % 97] += 1.0
    return out


def reference_negatives(responses: list[str]) -> list[str]:
    """construct_alpaca's rule: cosine similarity over all responses, the diagonal set to -1, argmax per row."""
    e = torch.as_tensor(embed(responses))
    e = torch.nn.functional.normalize(e, dim=-1)
    sim = e @ e.T
    sim.fill_diagonal_(-1.0)
    return [responses[int(j)] for j in sim.argmax(dim=1)]


def reference_capture(model, tokenizer, texts: list[str]) -> np.ndarray:
    """(N, L·H, d): each text alone (no padding), its last token's o_proj input in every layer."""
    cfg = model.config
    layers, heads = cfg.num_hidden_layers, cfg.num_attention_heads
    seen: list[torch.Tensor] = []
    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0][0, -1].clone()))
             for layer in model.model.layers]
    out = []
    try:
        with torch.no_grad():
            for text in texts:
                ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=512).input_ids
                seen.clear()
                model(ids)
                out.append(torch.stack(seen).reshape(layers * heads, -1))  # (L, H·d) -> (L·H, d): l·H + h
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(out).numpy()


def reference_components(dense: np.ndarray, pruned: np.ndarray, k: int):
    """Per head: c (d,), basis (d, d). Basis rows are sign-canonicalised (largest |coordinate| positive) for
    comparison only: an SVD's signs are arbitrary, and c does not depend on them."""
    comps, bases = [], []
    for h in range(dense.shape[1]):
        x = torch.as_tensor(dense[:, h], dtype=torch.float32) - torch.as_tensor(pruned[:, h], dtype=torch.float32)
        u, s, vt = torch.linalg.svd(x, full_matrices=False)
        comps.append(sum(u[:, i].mean() * s[i] * vt[i] for i in range(min(k, s.numel()))))
        d = vt.shape[-1]
        padded = torch.zeros(d, d)
        padded[: vt.shape[0]] = vt
        rows = torch.nn.functional.normalize(padded, p=2, dim=-1)
        top = rows.gather(1, rows.abs().argmax(1, keepdim=True))
        bases.append(rows * torch.where(top < 0, -1.0, 1.0))
    return torch.stack(comps).numpy(), torch.stack(bases).numpy()


def sklearn_split(n: int, test_size: float = 0.3, seed: int = 42):
    """sklearn's train_test_split(range(n), test_size, random_state=seed) (ShuffleSplit's index draw)."""
    try:
        from sklearn.model_selection import train_test_split
    except ImportError:
        n_test = math.ceil(test_size * n)
        perm = np.random.RandomState(seed).permutation(n)
        return perm[n_test:], perm[:n_test]
    train, val = train_test_split(list(range(n)), test_size=test_size, random_state=seed)
    return np.asarray(train), np.asarray(val)


def reference_probe(anchor, positive, negative, train, val, init):
    """One head: nn.Linear(2d, 1) from `init`, sigmoid + BCELoss, Adam lr 0.01, 200 full-batch epochs.

    train/val: pair indices (both rows of a pair on one side) or, with val=None, `train` is a
    (train_rows, val_rows) split of the 2N rows [pos; neg] (a split NOT by pair, for the negative check).
    Returns (validation accuracy, validation loss, weight, bias)."""
    a, p, q = (torch.as_tensor(np.asarray(x), dtype=torch.float32) for x in (anchor, positive, negative))
    x_pos, x_neg = torch.cat([a, p], -1), torch.cat([a, q], -1)
    if val is None:
        rows, labels = torch.cat([x_pos, x_neg]), torch.cat([torch.ones(len(a)), torch.zeros(len(a))])
        (tr, va) = train
        x_train, y_train, x_val, y_val = rows[tr], labels[tr], rows[va], labels[va]
    else:
        x_train = torch.cat([x_pos[train], x_neg[train]])
        y_train = torch.cat([torch.ones(len(train)), torch.zeros(len(train))])
        x_val = torch.cat([x_pos[val], x_neg[val]])
        y_val = torch.cat([torch.ones(len(val)), torch.zeros(len(val))])
    linear = torch.nn.Linear(x_train.shape[-1], 1)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(np.asarray(init["weight"]))[None])
        linear.bias.copy_(torch.tensor(np.asarray(init["bias"])).reshape(1))
    optimizer = torch.optim.Adam(linear.parameters(), lr=0.01)
    bce = torch.nn.BCELoss()
    for _ in range(200):
        optimizer.zero_grad()
        bce(torch.sigmoid(linear(x_train)).squeeze(-1), y_train).backward()
        optimizer.step()
    with torch.no_grad():
        prob = torch.sigmoid(linear(x_val)).squeeze(-1)
        accuracy = float(((prob >= 0.5).float() == y_val).float().mean())
        loss = float(bce(prob, y_val))
    return accuracy, loss, linear.weight.detach()[0].numpy(), float(linear.bias.detach()[0])


def completion_only_labels(tokenizer, ids: list[int]) -> list[int]:
    """trl's DataCollatorForCompletionOnlyLM: labels = ids, ignored (-100) up to the end of the LAST match of the
    response template's token ids; a text without the template is ignored entirely."""
    template = tokenizer.encode(TEMPLATE, add_special_tokens=False)
    end = None
    for i in range(len(ids) - len(template) + 1):
        if ids[i : i + len(template)] == template:
            end = i + len(template)
    labels = list(ids)
    labels[: len(ids) if end is None else end] = [-100] * (len(ids) if end is None else end)
    return labels


def reference_train(model, tokenizer, samples, heads, basis, beta, bias, *, full_sequence_loss=False):
    """RestoreLCC's training loop on `model` (frozen): δ on `heads` [(l, h)], per batch of BATCH samples in
    order, one AdamW step each. Returns (losses, grad norms before clipping, β, b)."""
    cfg = model.config
    num_heads, d = cfg.num_attention_heads, cfg.head_dim
    beta = torch.tensor(np.asarray(beta), requires_grad=True)
    bias = torch.tensor(np.asarray(bias), requires_grad=True)
    basis = torch.as_tensor(np.asarray(basis))

    def door(layer):
        def hook(mod, args):
            x = args[0]
            delta = torch.zeros(num_heads, d)
            for j, (l, h) in enumerate(heads):
                if l == layer:
                    delta = delta.index_put((torch.tensor(h),), basis[j].T @ beta[j] + bias[j])
            return (x + delta.reshape(-1),)
        return hook

    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(door(i)) for i, layer in enumerate(model.model.layers)]
    steps = math.ceil(len(samples) / BATCH)
    optimizer = torch.optim.AdamW([beta, bias], lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    schedule = transformers.get_linear_schedule_with_warmup(optimizer, 0, steps)
    pad = tokenizer.pad_token_id
    losses, norms = [], []
    try:
        for start in range(0, len(samples), BATCH):
            texts = [s.prompt.strip() + s.response for s in samples[start : start + BATCH]]
            rows = [tokenizer(t, truncation=True, max_length=500)["input_ids"] for t in texts]
            width = max(map(len, rows))
            ids = torch.full((len(rows), width), pad)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            labels = torch.full((len(rows), width), -100)
            for r, row in enumerate(rows):
                ids[r, : len(row)] = torch.as_tensor(row)
                mask[r, : len(row)] = 1
                target = row if full_sequence_loss else completion_only_labels(tokenizer, row)
                labels[r, : len(row)] = torch.as_tensor(target)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_([beta, bias], 1.0)))
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            losses.append(float(loss.detach()))
    finally:
        for h in hooks:
            h.remove()
    return losses, norms, beta.detach().numpy(), bias.detach().numpy()


# ------------------------------------------------------------------------------ the two pipelines


def magnitude_pruned(model):
    """A copy with the smaller half (by |w|) of every row of every decoder linear set to zero."""
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for layer in pruned.model.layers:
            for linear in (m for m in layer.modules() if isinstance(m, torch.nn.Linear)):
                w = linear.weight
                drop = w.abs().argsort(dim=1)[:, : w.shape[1] // 2]
                w.scatter_(1, drop, 0.0)
    return pruned


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny ops: one torch thread is ~10x faster than two threads competing with XLA's pool on 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tiny_model_dir):
    from tiny import lcc_model

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    dense_pt = transformers.LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                             attn_implementation="eager").eval()
    pruned_pt = magnitude_pruned(dense_pt)
    cfg = dense_pt.config
    assert cfg.num_hidden_layers != cfg.num_attention_heads  # else the head-index bug could not show
    # prompts of 33-64 tokens and whole texts within 64: every capture batch takes the one 64-token bucket
    samples = [s for s in load_instructions("alpaca", "train")
               if len(tokenizer(s.prompt)["input_ids"]) > MAX_TOKENS // 2
               and len(tokenizer(s.prompt + s.response)["input_ids"]) <= MAX_TOKENS][:POOL]
    assert len(samples) == POOL
    # the last pool sample repeats the first one's response (Alpaca has such duplicates): see test_a
    samples[-1] = dataclasses.replace(samples[-1], response=samples[0].response)
    return dict(tokenizer=tokenizer, dense_pt=dense_pt, pruned_pt=pruned_pt, samples=samples,
                dense_jx=lcc_model(dense_pt), pruned_jx=lcc_model(pruned_pt), layers=cfg.num_hidden_layers,
                heads=cfg.num_attention_heads)


@pytest.fixture(scope="module")
def stages(world):
    """Stages (a)-(d) on both sides; each lcc_jax stage gets the lcc_jax output of the one before."""
    w = world
    pairs = make_pairs(w["samples"], embedder=embed, limit=PROBE)
    prompts = [p.prompt for p in pairs]
    dense = capture_dense(w["dense_jx"], w["tokenizer"], pairs, batch_size=4)
    pruned = capture_pruned(w["pruned_jx"], w["tokenizer"], pairs, batch_size=4)
    comps = lost_components(dense.dense_prompt, pruned, k=REFERENCE_K)
    probes = train_probes(pruned, comps.component, dense.dense_positive, dense.dense_negative)
    ref_negatives = reference_negatives([s.response for s in w["samples"]])[:PROBE]
    ref = dict(
        dense_prompt=reference_capture(w["dense_pt"], w["tokenizer"], prompts),
        dense_positive=reference_capture(w["dense_pt"], w["tokenizer"], [p.prompt + p.positive for p in pairs]),
        dense_negative=reference_capture(w["dense_pt"], w["tokenizer"], [p.prompt + p.negative for p in pairs]),
        pruned_prompt=reference_capture(w["pruned_pt"], w["tokenizer"], prompts),
    )
    return dict(pairs=pairs, ref_negatives=ref_negatives, dense=dense, pruned=pruned, comps=comps, probes=probes,
                ref=ref)


@functools.cache
def probe_inits(heads: int, d: int):
    """The initial probe weights lcc_jax draws (jax.random, not torch's generator): both sides start there."""
    key = jax.random.key(ProbeConfig().init_seed)
    return [jax.device_get(init_probe(jax.random.fold_in(key, h), 2 * d)) for h in range(heads)]


# ------------------------------------------------------------------------------ (a) pairs


def test_a_pairs_take_the_most_similar_other_response_of_the_whole_pool(world, stages):
    pairs = stages["pairs"]
    assert len(pairs) == PROBE
    assert [p.prompt for p in pairs] == [s.prompt for s in world["samples"][:PROBE]]
    assert [p.positive for p in pairs] == [s.response for s in world["samples"][:PROBE]]
    ref = stages["ref_negatives"]
    # lcc_jax's one documented deviation: a response identical (as text) to r⁺ is never its negative (the
    # reference would take it, at cosine 1, and the probe would see one input with both labels). This pool
    # holds such a duplicate (the `world` fixture made one); there lcc_jax takes the most similar other text.
    same = [i for i, p in enumerate(pairs) if ref[i] == p.positive]
    assert same == [0]
    responses = [s.response for s in world["samples"]]
    e = embed(responses)
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    for i, p in enumerate(pairs):
        if i in same:
            others = [j for j, r in enumerate(responses) if r != p.positive]
            assert p.negative == responses[others[int(np.argmax(e[others] @ e[i]))]]
        else:
            assert p.negative == ref[i]
    # the pool matters: searching only the probed samples would give other negatives for some
    assert reference_negatives(responses[:PROBE]) != ref


# ------------------------------------------------------------------------------ (b) capture


@pytest.mark.parametrize("name", ["dense_prompt", "dense_positive", "dense_negative", "pruned_prompt"])
def test_b_capture_is_the_last_token_o_proj_input_in_head_order_l_times_h_plus_h(world, stages, name):
    got = stages["pruned"] if name == "pruned_prompt" else getattr(stages["dense"], name)
    want = stages["ref"][name]
    layers, heads = world["layers"], world["heads"]
    assert got.shape == want.shape and want.shape[:2] == (PROBE, layers * heads)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=5e-6)  # values up to ~2
    # negative: the same numbers in head-major order (h·L + l) are a different array
    n, total, d = want.shape
    head_major = want.reshape(n, layers, heads, d).transpose(0, 2, 1, 3).reshape(n, total, d)
    assert not np.allclose(got, head_major, atol=1e-3)


def test_b_pruning_changed_the_heads(stages):
    gap = np.abs(stages["ref"]["dense_prompt"] - stages["ref"]["pruned_prompt"]).mean()
    assert gap > 1e-2  # otherwise ΔZ would be noise and the later stages vacuous


# ------------------------------------------------------------------------------ (c) components


def test_c_lost_components_match_the_reference_svd(stages):
    comp, basis = reference_components(stages["dense"].dense_prompt, stages["pruned"], REFERENCE_K)
    got = stages["comps"]
    scale = np.abs(comp).max()
    np.testing.assert_allclose(got.component, comp, atol=1e-5 * scale)
    np.testing.assert_allclose(got.basis, basis, atol=5e-5)  # unit rows
    # K matters: the paper's K = 1 is a different component
    comp_k1, _ = reference_components(stages["dense"].dense_prompt, stages["pruned"], 1)
    assert not np.allclose(got.component, comp_k1, atol=1e-2 * scale)


# ------------------------------------------------------------------------------ (d) probes


def _reference_probes(stages, split):
    pruned, comps = stages["pruned"], stages["comps"]
    positive, negative = stages["dense"].dense_positive, stages["dense"].dense_negative
    heads, d = comps.component.shape
    inits = probe_inits(heads, d)
    out = []
    for h in range(heads):
        anchor = pruned[:, h] + comps.component[h]
        train, val = split
        out.append(reference_probe(anchor, positive[:, h], negative[:, h], train, val, inits[h]))
    return out


def test_d_probes_match_the_reference_accuracy_and_ranking(stages):
    probes = stages["probes"]
    train, val = sklearn_split(PROBE)
    np.testing.assert_array_equal(probes.train_pairs, train)
    np.testing.assert_array_equal(probes.val_pairs, val)
    ref = _reference_probes(stages, (train, val))
    accuracy = np.array([r[0] for r in ref])
    loss = np.array([r[1] for r in ref])
    np.testing.assert_allclose(probes.accuracy, accuracy, atol=1e-6)  # one flipped row would be 1/12
    np.testing.assert_allclose(probes.val_loss, loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(probes.weight, np.stack([r[2] for r in ref]), atol=2e-4)  # 200 Adam steps of 0.01
    np.testing.assert_allclose(probes.bias, [r[3] for r in ref], atol=2e-4)
    # torch.topk by accuracy; its ties left open, here broken by validation loss then index (as lcc_jax documents)
    ranking = sorted(range(len(ref)), key=lambda h: (-accuracy[h], loss[h], h))
    assert probes.ranking.tolist() == ranking
    assert len(set(accuracy.tolist())) > 2  # the ranking is not a trivial tie

    # negative checks: another split of the same data gives other accuracies, so the test pins the split
    other = np.array([r[0] for r in _reference_probes(stages, sklearn_split(PROBE, seed=0))])
    assert not np.allclose(other, probes.accuracy, atol=1e-6)
    rows = np.random.RandomState(42).permutation(2 * PROBE)  # 70/30 by row, so a pair may straddle the split
    n_rows = math.ceil(0.3 * 2 * PROBE)
    by_row = np.array([r[0] for r in _reference_probes(stages, ((rows[n_rows:], rows[:n_rows]), None))])
    assert not np.allclose(by_row, probes.accuracy, atol=1e-6)


# ------------------------------------------------------------------------------ (e) one training run


@pytest.fixture(scope="module")
def trained(world, stages):
    """lcc_jax's trainer for two steps (two batches of BATCH, one epoch) on the top-k heads of the ranking."""
    w = world
    comp = init_compensation(stages["comps"].basis, stages["probes"].ranking, TOP_K, jax.random.key(42))
    trainable, frozen = split_trainable(comp)
    samples = w["samples"][:TRAIN]
    data = training_data(RestoreConfig(num_train=TRAIN, num_probe=TRAIN, valid_data="none"), w["tokenizer"], samples)
    assert len(data.sequences) == TRAIN
    config = TrainConfig(learning_rate=LR, epochs=1, batch_size=BATCH, compute_dtype="float32")
    given = make_batches(data.sequences, BATCH, pad_id=data.pad_id, loss_masks=data.loss_masks, order="given")
    result = fit(w["pruned_jx"], trainable, _apply_compensation, lambda epoch: given, config, constants=frozen)
    return dict(comp=comp, data=data, samples=samples, result=result)


def test_e_loss_mask_is_trls_completion_only_mask(world, trained):
    tokenizer, data = world["tokenizer"], trained["data"]
    for sample, ids, mask in zip(trained["samples"], data.sequences, data.loss_masks, strict=True):
        ref_ids = tokenizer(sample.prompt.strip() + sample.response, truncation=True, max_length=500)["input_ids"]
        assert ids == ref_ids
        labels = completion_only_labels(tokenizer, ref_ids)
        assert [float(x != -100) for x in labels] == mask
        assert 0 < sum(mask) < len(mask)


def test_e_training_steps_match_the_reference(world, stages, trained):
    w, comp, result = world, trained["comp"], trained["result"]
    heads = [tuple(int(x) for x in divmod(i, w["heads"])) for i in np.asarray(comp.heads)]  # l·H + h -> (l, h)
    assert any(l > 0 for l, _ in heads)  # a layer-1 head, where l·L + h and l·H + h differ
    _, basis_all = reference_components(stages["dense"].dense_prompt, stages["pruned"], REFERENCE_K)
    basis = basis_all[[l * w["heads"] + h for l, h in heads]]
    losses, norms, beta, bias = reference_train(w["pruned_pt"], w["tokenizer"], trained["samples"], heads, basis,
                                                comp.beta, comp.bias)
    assert result.steps == len(losses) == 2
    assert norms[0] > 1.0  # the first step is clipped (max_grad_norm 1.0): the clip is part of the comparison
    np.testing.assert_allclose(result.history["loss"], losses, rtol=1e-5)
    np.testing.assert_allclose(result.history["grad_norm"], norms, rtol=1e-4)
    np.testing.assert_allclose(result.history["lr"], [LR, LR / 2])
    moved = np.abs(np.asarray(result.trainable["beta"]) - np.asarray(comp.beta)).max()
    assert moved > 0.5 * LR  # the two steps moved β by about lr each
    np.testing.assert_allclose(np.asarray(result.trainable["beta"]), beta, atol=1e-3 * LR)
    np.testing.assert_allclose(np.asarray(result.trainable["bias"]), bias, atol=1e-3 * LR)

    # negative: a full-sequence loss (no completion-only mask) gives a loss, gradient and update far outside
    # the tolerances above (a random model predicts prompt and response tokens about equally badly, so the
    # loss moves by only ~0.1 %, still 100x the tolerance)
    full_losses, full_norms, _, full_bias = reference_train(
        w["pruned_pt"], w["tokenizer"], trained["samples"], heads, basis, comp.beta, comp.bias, full_sequence_loss=True)
    assert abs(full_losses[0] - losses[0]) > 100 * 1e-5 * losses[0]
    assert abs(full_norms[0] - norms[0]) > 100 * 1e-4 * norms[0]
    assert np.abs(full_bias - np.asarray(result.trainable["bias"])).max() > 100 * 1e-3 * LR

    # negative: the reference's basis index l·L + h (right only when L == H) trains other directions
    L = w["layers"]
    buggy = basis_all[[l * L + h for l, h in heads]]
    assert not np.allclose(buggy, basis)
    _, _, beta_bug, _ = reference_train(w["pruned_pt"], w["tokenizer"], trained["samples"], heads, buggy,
                                        comp.beta, comp.bias)
    assert np.abs(beta_bug - np.asarray(result.trainable["beta"])).max() > 0.1 * LR
    # and its decoding of the ranking, (i // L, i % L), names other heads (some in layers that do not exist) ...
    decoded = [(int(i) // L, int(i) % L) for i in np.asarray(comp.heads)]
    assert decoded != heads
    # ... and δ on other heads than l·H + h trains differently: the test pins where δ lands
    shifted = [(l, (h + 1) % w["heads"]) for l, h in heads]
    _, norms_shifted, beta_shifted, _ = reference_train(w["pruned_pt"], w["tokenizer"], trained["samples"], shifted,
                                                        basis, comp.beta, comp.bias)
    assert abs(norms_shifted[0] - norms[0]) > 100 * 1e-4 * norms[0]
    assert np.abs(beta_shifted - np.asarray(result.trainable["beta"])).max() > 0.1 * LR
