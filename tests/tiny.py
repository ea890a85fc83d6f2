"""Tiny random Hugging Face models of every supported family, and their lcc_jax twins."""

from __future__ import annotations

import numpy as np

BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=80,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)

# name -> (transformers config class name, extra config fields)
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {}),
    "llama_tied": ("LlamaConfig", {"tie_word_embeddings": True}),
    "llama_mha_bias": ("LlamaConfig", {"num_key_value_heads": 4, "attention_bias": True, "mlp_bias": True}),
    "llama3_rope": (
        "LlamaConfig",
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            "rope_theta": 500000.0,
        },
    ),
    "llama_linear_rope": ("LlamaConfig", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "smollm2": ("LlamaConfig", {"num_attention_heads": 8, "num_key_value_heads": 2, "tie_word_embeddings": True}),
    "mistral": ("MistralConfig", {"sliding_window": 6}),
    "qwen2": ("Qwen2Config", {}),
    "qwen2_tied": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {"head_dim": 24}),
}


def hf_config(family: str):
    import transformers

    cls_name, extra = FAMILIES[family]
    return getattr(transformers, cls_name)(**{**BASE, **extra})


def hf_model(family: str, seed: int = 0):
    """A float32 transformers model with weights far from their init (norms and biases too)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family), attn_implementation="eager")
    model = model.float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def state_dict_numpy(torch_model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in torch_model.state_dict().items()}


def lcc_model(torch_model, mesh=None, dtype=None):
    """The lcc_jax twin of a transformers model, via the conversion table."""
    import jax.numpy as jnp

    from lcc_jax.config import ModelConfig
    from lcc_jax.convert.assign import DictSource, model_from_source

    config = ModelConfig.from_hf(torch_model.config.to_dict())
    return model_from_source(config, DictSource(state_dict_numpy(torch_model)), mesh=mesh, dtype=dtype or jnp.float32)


def random_batch(batch: int = 2, seq: int = 12, vocab: int = 128, seed: int = 0, pad_last: int = 3):
    """Right-padded tokens and mask: the last row has `pad_last` padding positions."""
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, vocab, (batch, seq)).astype(np.int32)
    mask = np.ones((batch, seq), np.int32)
    if pad_last:
        mask[-1, seq - pad_last :] = 0
    return tokens, mask
