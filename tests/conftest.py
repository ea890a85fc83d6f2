"""Shared test set-up: 8 fake CPU devices, fp32 matmuls, markers."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("LCC_COMPILE_CACHE", "0")  # scripts' main() would switch the user's cache on for the session
os.environ.setdefault("LCC_TOKEN_CACHE", "0")  # nor write tokenized requests into the user's cache (test_token_cache.py)
if os.environ.get("LCC_DATA_DIR"):  # the README's command passes ../shared/data; tests that chdir still find it
    os.environ["LCC_DATA_DIR"] = os.path.abspath(os.environ["LCC_DATA_DIR"])

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import json  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama folder (HF layout) with a 384-token byte-level BPE tokenizer trained on Alpaca text."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from lcc_jax.data.text import data_dir

    texts = [json.loads(line) for line in (data_dir() / "alpaca_2000" / "train.jsonl").read_text().splitlines()[:400]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([t["prompt"] + t["response"] for t in texts], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    from lcc_jax import ModelConfig, save_hf
    from model_utils import random_model

    config = ModelConfig(model_type="llama", vocab_size=384, hidden_size=64, intermediate_size=128, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256,
                         tie_word_embeddings=True, eos_token_id=0, pad_token_id=0)
    folder = tmp_path_factory.mktemp("tiny_llama") / "model"
    save_hf(random_model(config, seed=0), fast, folder)  # torch-free: written by lcc_jax's own exporter
    return folder
