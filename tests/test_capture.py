"""Last-token head capture: batched and bucketed equals one sequence at a time; CaptureSet files; head maps."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lcc_jax.config import ModelConfig
from lcc_jax.models import CausalLM
from lcc_jax.restore.capture import (
    CaptureError,
    CaptureSet,
    align_heads,
    capture_dense,
    capture_last_token,
    capture_pruned,
)
from lcc_jax.sharding import flat_params, make_mesh, shard_model

CONFIG = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8)
LENGTHS = (5, 12, 5, 12, 12, 5)


def sequences(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.RandomState(seed)
    return [rng.randint(1, CONFIG.vocab_size, n).astype(np.int32) for n in LENGTHS]


@nnx.jit
def _all_heads(model, tokens):
    return model(tokens, capture="all", return_logits=False).heads  # (L, b, seq, H, d)


def reference_last_token(model, seqs) -> np.ndarray:
    """Unpadded forward passes (sequences of one length stacked), last position of each."""
    out = np.empty((len(seqs), model.config.total_heads, model.config.head_dim), np.float32)
    for n in sorted({len(s) for s in seqs}):
        rows = [i for i, s in enumerate(seqs) if len(s) == n]
        heads = np.asarray(_all_heads(model, jnp.asarray(np.stack([seqs[i] for i in rows]))))[:, :, -1]
        out[rows] = heads.transpose(1, 0, 2, 3).reshape(len(rows), -1, model.config.head_dim)
    return out


@pytest.fixture(scope="module")
def model():
    return CausalLM(CONFIG, rngs=nnx.Rngs(0))


def test_batched_capture_equals_unpadded_forward_in_input_order(model):
    seqs = sequences()
    got = capture_last_token(model, seqs, batch_size=4)
    assert got.shape == (len(seqs), CONFIG.total_heads, CONFIG.head_dim) and got.dtype == np.float32
    np.testing.assert_allclose(got, reference_last_token(model, seqs), atol=1e-5)


def test_capture_on_a_mesh_matches_single_device(model):
    seqs = sequences()
    sharded = shard_model(CausalLM(CONFIG, rngs=nnx.Rngs(0)), make_mesh("data=2,fsdp=4"))
    mesh = flat_params(sharded)["layers.attn.q_proj.kernel"][...].sharding.mesh
    got = capture_last_token(sharded, seqs, batch_size=8, mesh=mesh)
    np.testing.assert_allclose(got, capture_last_token(model, seqs, batch_size=4), atol=1e-5)


def test_capture_compiles_every_bucket_under_the_mesh(model):
    """Bucket shapes compile in threads; a thread without the mesh context would skip the model's sharding
    constraints without a word (on two H200s under fsdp, cuDNN attention was refused that way)."""
    from lcc_jax.restore.capture import last_token_heads, run_batched

    sharded = shard_model(CausalLM(CONFIG, rngs=nnx.Rngs(0)), make_mesh("fsdp=8"))
    mesh = flat_params(sharded)["layers.attn.q_proj.kernel"][...].sharding.mesh
    seen = []

    def recording(model, tokens, mask):
        seen.append((tokens.shape, jax.sharding.get_abstract_mesh().axis_names))
        return last_token_heads(model, tokens, mask)

    seqs = [list(range(1, n + 1)) for n in (5, 40, 70, 100) for _ in range(8)]  # four buckets, compiled concurrently
    run_batched(sharded, seqs, recording, batch_size=8, mesh=mesh, buckets=(32, 64, 96, 128))
    assert len({shape for shape, _ in seen}) == 4
    assert {axes for _, axes in seen} == {mesh.axis_names}


def char_tokenizer(texts):
    return {"input_ids": [[1 + ord(c) % 60 for c in t] for t in texts]}


def test_texts_with_tokenizer_and_dense_set(model):
    class Pair:
        def __init__(self, prompt, positive, negative):
            self.prompt, self.positive, self.negative = prompt, positive, negative

    pairs = [Pair("q one", " yes", " no"), Pair("question two", " fine", " bad!")]
    dense = capture_dense(model, char_tokenizer, pairs, batch_size=4)
    ids = char_tokenizer(["q one yes", "question two fine"])["input_ids"]
    np.testing.assert_allclose(dense.dense_positive, capture_last_token(model, ids, batch_size=4), atol=1e-6)
    assert dense.missing() == ["pruned_prompt"]
    pruned = capture_pruned(model, char_tokenizer, pairs, batch_size=4)
    np.testing.assert_allclose(pruned, dense.dense_prompt, atol=1e-6)
    with pytest.raises(CaptureError, match="no tokenizer"):
        capture_last_token(model, ["text"])
    long = capture_last_token(model, [list(range(1, 40))], batch_size=4, max_length=12)
    np.testing.assert_allclose(long, capture_last_token(model, [list(range(1, 13))], batch_size=4), atol=1e-6)


def test_capture_set_round_trips_atomically(tmp_path):
    rng = np.random.RandomState(0)
    names = ("dense_prompt", "dense_positive", "dense_negative")
    arrays = {name: rng.randn(5, 8, 4).astype(np.float32) for name in names}
    partial = CaptureSet(**arrays)
    partial.save(tmp_path)
    loaded = CaptureSet.load(tmp_path)
    assert loaded.missing() == ["pruned_prompt"]
    with pytest.raises(CaptureError, match="lacks"):
        loaded.aligned()
    head_map = np.array([[3, 0], [1, 2]])
    pruned = rng.randn(5, 4, 4).astype(np.float32)
    loaded.replace(pruned_prompt=pruned, head_map=head_map).save(tmp_path)
    full = CaptureSet.load(tmp_path, mmap=True)
    assert full.missing() == [] and isinstance(full.dense_prompt, np.memmap)
    np.testing.assert_array_equal(full.dense_negative, arrays["dense_negative"])
    dense_q, pos, neg, pruned_q = full.aligned()
    assert dense_q.shape == pruned_q.shape == (5, 4, 4)
    np.testing.assert_array_equal(pos[:, 1], arrays["dense_positive"][:, 0])  # pruned head (0, 1) <- dense (0, 0)
    np.testing.assert_array_equal(pos[:, 2], arrays["dense_positive"][:, 5])  # pruned head (1, 0) <- dense (1, 1)
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    with pytest.raises(CaptureError, match="head_map"):
        CaptureSet(**arrays, pruned_prompt=pruned).aligned()


def test_head_map_aligns_kept_heads_with_their_dense_origin():
    """A structurally pruned model (heads removed whole): at layer 0 each kept head sees the same input, so its
    output equals its dense origin's exactly; align_heads must pair them."""
    dense_cfg = CONFIG.replace(num_kv_heads=4)
    pruned_cfg = dense_cfg.replace(num_heads=2, num_kv_heads=2)
    head_map = np.array([[3, 1], [0, 2]])
    dense = CausalLM(dense_cfg, rngs=nnx.Rngs(1))
    pruned = CausalLM(pruned_cfg, rngs=nnx.Rngs(2))
    d = dense_cfg.head_dim
    cols = np.stack([np.concatenate([np.arange(h * d, (h + 1) * d) for h in row]) for row in head_map])  # (L, 2d)
    src, dst = flat_params(dense), flat_params(pruned)
    for path, var in dst.items():
        value = np.asarray(src[path][...])
        if path in ("layers.attn.q_proj.kernel", "layers.attn.k_proj.kernel", "layers.attn.v_proj.kernel"):
            value = np.stack([value[i][:, cols[i]] for i in range(dense_cfg.num_layers)])
        elif path == "layers.attn.o_proj.kernel":
            value = np.stack([value[i][cols[i]] for i in range(dense_cfg.num_layers)])
        var.set_value(jnp.asarray(value))
    seqs = sequences(1)
    z_dense = capture_last_token(dense, seqs, batch_size=4)
    z_pruned = capture_last_token(pruned, seqs, batch_size=4)
    aligned = align_heads(z_dense, head_map)
    assert aligned.shape == z_pruned.shape == (len(seqs), 4, d)
    np.testing.assert_allclose(aligned[:, :2], z_pruned[:, :2], atol=1e-5)  # layer 0
    assert np.abs(aligned[:, 2:] - z_pruned[:, 2:]).max() > 1e-3  # layer 1 inputs differ after pruning
    with pytest.raises(CaptureError, match="outside"):
        align_heads(z_dense, np.array([[4, 0], [0, 1]]))
