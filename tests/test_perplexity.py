"""Perplexity (Wanda protocol) on tiny random models, against an independent PyTorch computation."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from lcc_jax.eval import PerplexityError, make_chunks, perplexity, perplexity_of_tokens, tokenize
from lcc_jax.eval.perplexity import chunk_nll, logits_block
from lcc_jax.sharding import make_mesh
from tiny import hf_model, lcc_model

torch = pytest.importorskip("torch")

SEQLEN = 32


def wanda_ppl(torch_model, ids: np.ndarray, seqlen: int) -> float:
    """Wanda's eval_ppl_wikitext, batch 1: CE on shifted logits, nll = loss * seqlen, exp(sum / (n * seqlen))."""
    nsamples = ids.size // seqlen
    tokens = torch.as_tensor(ids[None].astype(np.int64))
    loss_fct = torch.nn.CrossEntropyLoss()
    nlls = []
    with torch.no_grad():
        for i in range(nsamples):
            inputs = tokens[:, i * seqlen : (i + 1) * seqlen]
            logits = torch_model(inputs).logits
            shift_logits = logits[:, :-1, :].contiguous()
            loss = loss_fct(shift_logits.reshape(-1, shift_logits.size(-1)), inputs[:, 1:].reshape(-1))
            nlls.append(loss.float() * seqlen)
    return torch.exp(torch.stack(nlls).sum() / (nsamples * seqlen)).item()


def token_stream(n: int, seed: int = 0, vocab: int = 128) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, vocab, n).astype(np.int32)


class CharTokenizer:
    """A stub tokenizer: one id per character (mod vocab), with a BOS like Llama tokenizers add."""

    def __init__(self, vocab: int = 128, bos: int = 1):
        self.vocab, self.bos = vocab, bos

    def __call__(self, text: str) -> dict:
        return {"input_ids": [self.bos] + [ord(c) % self.vocab for c in text]}


@pytest.fixture(scope="module")
def llama():
    torch_model = hf_model("llama")
    return torch_model, lcc_model(torch_model)


@pytest.mark.parity
@pytest.mark.parametrize("family", ["llama", "smollm2"])  # untied lm_head, tied embedding
def test_perplexity_equals_wanda_pytorch_computation(family):
    torch_model = hf_model(family)
    ids = token_stream(7 * SEQLEN + 5)  # ragged tail, dropped by both
    result = perplexity_of_tokens(lcc_model(torch_model), ids, seqlen=SEQLEN, batch_size=2)
    expected = wanda_ppl(torch_model, ids, SEQLEN)
    assert result.ppl == pytest.approx(expected, rel=1e-5)
    assert (result.num_chunks, result.total_chunks, result.num_tokens) == (7, 7, 7 * SEQLEN)
    assert result.nll_mean == pytest.approx(math.log(result.ppl))


@pytest.mark.parity
def test_batch_sizes_and_ragged_last_batch_give_the_same_perplexity(llama):
    _, model = llama
    ids = token_stream(7 * SEQLEN, seed=1)
    one = perplexity_of_tokens(model, ids, seqlen=SEQLEN, batch_size=1)
    three = perplexity_of_tokens(model, ids, seqlen=SEQLEN, batch_size=3)  # 3 + 3 + 1 (+ 2 dummies)
    assert three.ppl == pytest.approx(one.ppl, rel=1e-6)
    np.testing.assert_allclose(three.chunk_nll, one.chunk_nll, rtol=1e-5)
    assert len(three.chunk_nll) == 7


@pytest.mark.parity
@pytest.mark.parametrize("spec", ["fsdp=-1", "data=2,fsdp=2,tensor=2"])
def test_sharded_perplexity_on_8_devices_matches_pytorch(spec):
    mesh = make_mesh(spec)
    assert mesh.devices.size == 8
    torch_model = hf_model("llama")
    ids = token_stream(5 * SEQLEN, seed=2)
    result = perplexity_of_tokens(lcc_model(torch_model, mesh=mesh), ids, seqlen=SEQLEN, batch_size=3, mesh=mesh)
    assert result.batch_size % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0  # rounded up to split evenly
    assert result.ppl == pytest.approx(wanda_ppl(torch_model, ids, SEQLEN), rel=1e-5)


def test_text_is_tokenized_once_with_default_special_tokens(tmp_path, llama):
    _, model = llama
    path = tmp_path / "text.raw"
    path.write_text("".join(f" line {i} of some text .\n" for i in range(40)))
    tokenizer = CharTokenizer()
    result = perplexity(model, tokenizer, path, seqlen=SEQLEN, batch_size=2, limit_chunks=5)
    from lcc_jax.data import load_text

    ids = tokenize(tokenizer, load_text(path))
    assert ids[0] == tokenizer.bos
    direct = perplexity_of_tokens(model, ids, seqlen=SEQLEN, batch_size=2, limit_chunks=5)
    assert result.ppl == direct.ppl
    assert (result.num_chunks, result.total_chunks) == (5, ids.size // SEQLEN)


def test_logits_in_blocks_with_padding_equal_one_block(llama):
    _, model = llama
    tokens = jnp.asarray(token_stream(2 * 40, seed=3).reshape(2, 40))
    whole = chunk_nll(model, tokens, 40, {})
    blocked = chunk_nll(model, tokens, 16, {})  # 3 blocks, 8 padded positions
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(whole), rtol=1e-6)


def test_logits_block_keeps_fp32_logits_under_the_budget():
    assert logits_block(2048, 1, 49152) == 1024  # SmolLM2: 1024 x 49152 x 4 B = 192 MiB
    assert logits_block(2048, 8, 128256) == 64  # Llama 3, batch 8
    assert logits_block(32, 1, 128) == 32  # small enough for one block


def test_compensation_reaches_the_forward_pass(llama):
    _, model = llama
    c = model.config
    ids = token_stream(2 * SEQLEN, seed=4)
    plain = perplexity_of_tokens(model, ids, seqlen=SEQLEN)
    zero = jnp.zeros((c.num_layers, c.num_heads, c.head_dim))
    assert perplexity_of_tokens(model, ids, seqlen=SEQLEN, model_kwargs={"compensation": zero}).ppl == pytest.approx(
        plain.ppl, rel=1e-6
    )
    moved = perplexity_of_tokens(model, ids, seqlen=SEQLEN, model_kwargs={"compensation": zero + 0.5})
    assert abs(moved.ppl - plain.ppl) > 1e-3


def test_chunking_drops_the_tail_and_refuses_short_text():
    ids = np.arange(10)
    np.testing.assert_array_equal(make_chunks(ids, 4), [[0, 1, 2, 3], [4, 5, 6, 7]])
    np.testing.assert_array_equal(make_chunks(ids, 4, limit_chunks=1), [[0, 1, 2, 3]])
    with pytest.raises(PerplexityError, match="fewer than one chunk"):
        make_chunks(ids, 11)
    with pytest.raises(PerplexityError, match="at least 2"):
        make_chunks(ids, 1)
    with pytest.raises(PerplexityError, match="limit_chunks must be positive"):
        make_chunks(ids, 4, limit_chunks=0)
