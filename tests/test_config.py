"""ModelConfig <-> Hugging Face config.json: both transformers layouts, every family, and every refusal.

The dicts below are written out literally, the way transformers 4.x and 5.x save them, so the tests
do not depend on which transformers is installed. Cheap: no model is built.
"""

from __future__ import annotations

import json

import pytest

from lcc_jax.config import ConfigError, ModelConfig, RopeConfig

# ----------------------------------------------------------------------------- literal config.json dicts

# transformers 4.x: Llama 3.1 style, `rope_theta` + `rope_scaling` with "rope_type".
LLAMA31_V4 = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0",
}

# transformers 5.x: the same model, `rope_parameters` holding theta and scaling together.
LLAMA31_V5 = {
    **{k: v for k, v in LLAMA31_V4.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")},
    "dtype": "bfloat16",
    "rope_parameters": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "transformers_version": "5.0.0",
}

# transformers 4.x, older spelling: linear scaling under the key "type" (e.g. LongChat / Vicuna-16k).
LLAMA2_LINEAR_V4 = {
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 16384,
    "rope_scaling": {"type": "linear", "factor": 4.0},
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}

# SmolLM2-135M (a llama with tied embeddings, 9 heads over 3 kv heads), transformers 4.x.
SMOLLM2_V4 = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 8192,
    "rope_theta": 100000,
    "rope_scaling": None,
    "tie_word_embeddings": True,
    "bos_token_id": 0,
    "eos_token_id": 0,
}

# Qwen2-0.5B-like, transformers 4.x: no `attention_bias` key, yet q/k/v have biases.
QWEN2_V4 = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "use_sliding_window": False,
    "max_window_layers": 21,
    "tie_word_embeddings": True,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
}

# Qwen3-0.6B-like, transformers 5.x: head_dim 128 although hidden / heads = 64; q/k norms.
QWEN3_V5 = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "vocab_size": 151936,
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 40960,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    "attention_bias": False,
    "sliding_window": None,
    "use_sliding_window": False,
    "tie_word_embeddings": True,
}

# Mistral-7B-v0.1, transformers 4.x: a 4096-token sliding window.
MISTRAL_V4 = {
    "architectures": ["MistralForCausalLM"],
    "model_type": "mistral",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 32768,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "tie_word_embeddings": False,
}


def _with(base: dict, **changes) -> dict:
    return {**base, **changes}


# ----------------------------------------------------------------------------- reading both layouts


def test_llama3_rope_reads_the_same_from_v4_and_v5_layouts():
    v4, v5 = ModelConfig.from_hf(LLAMA31_V4), ModelConfig.from_hf(LLAMA31_V5)
    assert v4 == v5
    assert v4.rope == RopeConfig(
        theta=500000.0,
        type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    )
    assert (v4.num_heads, v4.num_kv_heads, v4.head_dim, v4.queries_per_kv) == (32, 8, 128, 4)
    assert v4.eos_token_id == (128001, 128008, 128009)
    assert v4.rms_norm_eps == 1e-5 and not v4.tie_word_embeddings
    assert not (v4.qkv_bias or v4.o_bias or v4.mlp_bias or v4.qk_norm) and v4.sliding_window is None


def test_linear_rope_is_read_from_the_old_type_key_and_the_new_rope_type_key():
    old = ModelConfig.from_hf(LLAMA2_LINEAR_V4)
    new = ModelConfig.from_hf(_with(LLAMA2_LINEAR_V4, rope_scaling={"rope_type": "linear", "factor": 4.0}))
    v5 = ModelConfig.from_hf(
        _with(
            {k: v for k, v in LLAMA2_LINEAR_V4.items() if k != "rope_scaling"},
            rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
        )
    )
    assert old.rope == new.rope == v5.rope == RopeConfig(theta=10000.0, type="linear", factor=4.0)
    # No num_key_value_heads in the file: multi-head attention.
    assert old.num_kv_heads == old.num_heads == 32
    assert old.pad_token_id == 0


def test_default_rope_theta_is_read_from_either_layout():
    v4 = ModelConfig.from_hf(SMOLLM2_V4)
    v5 = ModelConfig.from_hf(
        _with(
            {k: v for k, v in SMOLLM2_V4.items() if k not in ("rope_theta", "rope_scaling")},
            rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        )
    )
    assert v4.rope == v5.rope == RopeConfig(theta=100000.0)


def test_smollm2_has_tied_embeddings_and_grouped_heads():
    c = ModelConfig.from_hf(SMOLLM2_V4)
    assert c.tie_word_embeddings
    assert (c.num_heads, c.num_kv_heads, c.head_dim) == (9, 3, 64)
    assert c.total_heads == 30 * 9


def test_qwen2_implies_qkv_bias_without_an_o_proj_bias():
    c = ModelConfig.from_hf(QWEN2_V4)
    assert c.qkv_bias and not c.o_bias
    assert c.tie_word_embeddings
    # Qwen2's sliding_window is inert while use_sliding_window is false.
    assert c.sliding_window is None
    assert c.rope.theta == 1e6 and c.head_dim == 64


def test_qwen3_has_qk_norm_and_its_own_head_dim():
    c = ModelConfig.from_hf(QWEN3_V5)
    assert c.qk_norm
    assert c.head_dim == 128 != c.hidden_size // c.num_heads
    assert not c.qkv_bias and not c.o_bias


def test_qwen3_attention_bias_covers_q_k_v_and_o():
    c = ModelConfig.from_hf(_with(QWEN3_V5, attention_bias=True))
    assert c.qkv_bias and c.o_bias


def test_llama_attention_bias_covers_q_k_v_and_o():
    c = ModelConfig.from_hf(_with(LLAMA31_V4, attention_bias=True, mlp_bias=True))
    assert c.qkv_bias and c.o_bias and c.mlp_bias


def test_mistral_keeps_its_sliding_window_and_v02_has_none():
    assert ModelConfig.from_hf(MISTRAL_V4).sliding_window == 4096
    assert ModelConfig.from_hf(_with(MISTRAL_V4, sliding_window=None)).sliding_window is None


def test_sliding_window_of_a_llama_config_is_not_picked_up():
    # Only Mistral uses the key; a stray one on another family must not window its attention.
    assert ModelConfig.from_hf(_with(LLAMA31_V4, sliding_window=16)).sliding_window is None


# ----------------------------------------------------------------------------- writing, round trips

ALL_LAYOUTS = {
    "llama31_v4": LLAMA31_V4,
    "llama31_v5": LLAMA31_V5,
    "llama2_linear_v4": LLAMA2_LINEAR_V4,
    "smollm2_v4": SMOLLM2_V4,
    "qwen2_v4": QWEN2_V4,
    "qwen3_v5": QWEN3_V5,
    "qwen3_bias_v5": _with(QWEN3_V5, attention_bias=True),
    "llama_bias_v4": _with(LLAMA31_V4, attention_bias=True, mlp_bias=True),
    "mistral_v4": MISTRAL_V4,
}


@pytest.mark.parametrize("name", sorted(ALL_LAYOUTS))
def test_to_hf_then_from_hf_is_the_identity(name):
    config = ModelConfig.from_hf(ALL_LAYOUTS[name])
    hf = config.to_hf()
    assert ModelConfig.from_hf(hf) == config
    # What we write is plain JSON.
    assert ModelConfig.from_hf(json.loads(json.dumps(hf))) == config


@pytest.mark.parametrize("name", sorted(ALL_LAYOUTS))
def test_to_hf_loads_in_transformers_as_the_same_model(name):
    transformers = pytest.importorskip("transformers")
    config = ModelConfig.from_hf(ALL_LAYOUTS[name])
    hf_config = transformers.AutoConfig.for_model(**config.to_hf())
    classes = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}
    assert type(hf_config).__name__ == classes[config.model_type]
    assert hf_config.num_attention_heads == config.num_heads
    assert hf_config.num_key_value_heads == config.num_kv_heads
    assert hf_config.head_dim == config.head_dim
    assert hf_config.tie_word_embeddings == config.tie_word_embeddings
    assert hf_config.rms_norm_eps == config.rms_norm_eps
    assert getattr(hf_config, "sliding_window", None) == config.sliding_window
    # transformers' own (normalised) view of the config reads back to the same ModelConfig.
    assert ModelConfig.from_hf(hf_config.to_dict()) == config


def test_llama_config_built_from_to_hf_has_our_rope_scaling():
    transformers = pytest.importorskip("transformers")
    config = ModelConfig.from_hf(LLAMA31_V4)
    hf_config = transformers.LlamaConfig(**config.to_hf())
    rope = hf_config.rope_parameters
    assert rope["rope_type"] == "llama3"
    assert rope["rope_theta"] == 500000.0
    assert rope["factor"] == 8.0 and rope["original_max_position_embeddings"] == 8192
    assert not hf_config.attention_bias and not hf_config.mlp_bias


def test_to_hf_writes_both_rope_layouts():
    hf = ModelConfig.from_hf(LLAMA2_LINEAR_V4).to_hf()
    assert hf["rope_theta"] == 10000.0
    assert hf["rope_scaling"]["rope_type"] == hf["rope_parameters"]["rope_type"] == "linear"
    assert hf["rope_scaling"]["factor"] == 4.0
    assert ModelConfig.from_hf(SMOLLM2_V4).to_hf()["rope_scaling"] is None


def test_to_hf_refuses_a_qwen2_without_qkv_bias():
    config = ModelConfig.from_hf(QWEN2_V4).replace(qkv_bias=False)
    with pytest.raises(ConfigError, match="Qwen2.*q/k/v biases"):
        config.to_hf()


def test_to_hf_refuses_an_o_proj_bias_alone_on_llama():
    config = ModelConfig.from_hf(SMOLLM2_V4).replace(o_bias=True)
    with pytest.raises(ConfigError, match="one attention_bias switch"):
        config.to_hf()


# ----------------------------------------------------------------------------- refusals, with their reasons


def test_unknown_model_type_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"model_type 'gpt2' is not supported.*llama, mistral, qwen2, qwen3"):
        ModelConfig.from_hf(_with(LLAMA31_V4, model_type="gpt2"))


def test_missing_model_type_is_refused():
    with pytest.raises(ConfigError, match="no 'model_type'"):
        ModelConfig.from_hf({k: v for k, v in LLAMA31_V4.items() if k != "model_type"})


def test_missing_required_field_is_named():
    with pytest.raises(ConfigError, match=r"lacks required field\(s\) \['intermediate_size'\]"):
        ModelConfig.from_hf({k: v for k, v in LLAMA31_V4.items() if k != "intermediate_size"})


@pytest.mark.parametrize("rope_type", ["yarn", "dynamic", "longrope"])
def test_unsupported_rope_scaling_is_refused_not_ignored_v4(rope_type):
    hf = _with(LLAMA31_V4, rope_scaling={"type": rope_type, "factor": 4.0})
    with pytest.raises(ConfigError, match=f"RoPE scaling type '{rope_type}' is not implemented"):
        ModelConfig.from_hf(hf)


@pytest.mark.parametrize("rope_type", ["yarn", "dynamic"])
def test_unsupported_rope_scaling_is_refused_not_ignored_v5(rope_type):
    hf = _with(LLAMA31_V5, rope_parameters={"rope_type": rope_type, "factor": 4.0, "rope_theta": 1e4})
    with pytest.raises(ConfigError, match=f"RoPE scaling type '{rope_type}' is not implemented"):
        ModelConfig.from_hf(hf)


def test_scaled_rope_without_a_factor_is_refused():
    with pytest.raises(ConfigError, match="'linear' needs a 'factor'"):
        ModelConfig.from_hf(_with(LLAMA2_LINEAR_V4, rope_scaling={"type": "linear"}))


def test_gelu_activation_is_refused():
    with pytest.raises(ConfigError, match="hidden_act 'gelu' is not supported"):
        ModelConfig.from_hf(_with(LLAMA31_V4, hidden_act="gelu"))


def test_heads_not_a_multiple_of_kv_heads_is_refused():
    with pytest.raises(ConfigError, match="num_attention_heads=32 is not a multiple of num_key_value_heads=5"):
        ModelConfig.from_hf(_with(LLAMA31_V4, num_key_value_heads=5))


def test_partial_rotary_is_refused():
    with pytest.raises(ConfigError, match="partial_rotary_factor"):
        ModelConfig.from_hf(_with(LLAMA31_V4, partial_rotary_factor=0.5))


@pytest.mark.parametrize("base", [QWEN2_V4, QWEN3_V5], ids=["qwen2", "qwen3"])
def test_qwen_sliding_window_attention_is_refused(base):
    with pytest.raises(ConfigError, match=r"use_sliding_window=true .*is not supported"):
        ModelConfig.from_hf(_with(base, use_sliding_window=True, sliding_window=4096))


def test_qwen3_sliding_layer_types_are_refused():
    # transformers 5.x may spell the window per layer instead of use_sliding_window.
    layer_types = ["full_attention"] * 27 + ["sliding_attention"]
    with pytest.raises(ConfigError, match="sliding layer_types"):
        ModelConfig.from_hf(_with(QWEN3_V5, layer_types=layer_types, sliding_window=4096))
    full = ModelConfig.from_hf(_with(QWEN3_V5, layer_types=["full_attention"] * 28))
    assert full == ModelConfig.from_hf(QWEN3_V5)


def test_direct_construction_validates_too():
    with pytest.raises(ConfigError, match="'gpt2' is not supported"):
        ModelConfig("gpt2", 10, 8, 8, 1, 2, 2, 4)
    with pytest.raises(ConfigError, match="'yarn' is not implemented"):
        ModelConfig("llama", 10, 8, 8, 1, 2, 2, 4, rope=RopeConfig(type="yarn"))


# ----------------------------------------------------------------------------- config.json files


def test_from_file_reads_a_model_folder_and_a_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_V5))
    assert ModelConfig.from_file(tmp_path) == ModelConfig.from_file(tmp_path / "config.json")
    assert ModelConfig.from_file(tmp_path) == ModelConfig.from_hf(QWEN3_V5)


def test_from_file_names_a_missing_config_json(tmp_path):
    with pytest.raises(ConfigError, match=r"config\.json does not exist"):
        ModelConfig.from_file(tmp_path)


def test_from_file_names_malformed_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "llama", "hidden_size": 64,')  # truncated download
    with pytest.raises(ConfigError, match="is not valid JSON"):
        ModelConfig.from_file(path)


def test_from_file_refuses_json_that_is_not_an_object(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[1, 2, 3]")
    with pytest.raises(ConfigError, match="holds a JSON list, not an object"):
        ModelConfig.from_file(path)
