"""Checkpoint import and export on tiny models: HF folders round-trip exactly, GGUF files read back
as the HF weights they came from, Orbax folders restore onto any mesh, and the command line works.

The GGUF writer below follows llama.cpp's conventions (names, reversed shapes, the q/k row
permutation for `llama`) independently of lcc_jax's reader, so reading its files back pins the reader.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from lcc_jax.config import ModelConfig
from lcc_jax.convert import GGUFSource, load, save_hf, save_orbax
from lcc_jax.convert.gguf_source import unpermute_rows
from lcc_jax.sharding import flat_params, make_mesh
from tiny import hf_model, random_batch, state_dict_numpy

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- helpers


def save_tiny(family: str, folder: Path, *, torch_dtype=None, **save_kwargs):
    """A tiny random transformers model of `family`, saved as safetensors in `folder`; returns the model."""
    model = hf_model(family)
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    model.save_pretrained(folder, safe_serialization=True, **save_kwargs)
    return model


def torch_logits(model, tokens, mask) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask))
    return out.logits.float().numpy()


def jax_logits(model, tokens, mask) -> np.ndarray:
    return np.asarray(model(jnp.asarray(tokens), jnp.asarray(mask)).logits, np.float32)


def reload_hf(folder: Path, torch_dtype=None):
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch_dtype or torch.float32, attn_implementation="eager"
    ).eval()


def assert_state_dicts_equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def numpy_state(torch_model) -> dict[str, np.ndarray]:
    """State dict as numpy, bf16 kept as ml_dtypes.bfloat16, tied lm_head dropped (it is the embedding)."""
    import torch

    out = {}
    for name, t in torch_model.state_dict().items():
        if name == "lm_head.weight" and torch_model.config.tie_word_embeddings:
            continue
        t = t.detach().cpu()
        out[name] = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()
    return out


def assert_model_holds(model, torch_model) -> None:
    """Every lcc_jax parameter equals the HF tensor it came from, bit for bit."""
    from lcc_jax.convert import hf_tensors

    want = numpy_state(torch_model)
    got = dict(hf_tensors(model))
    assert sorted(got) == sorted(want)
    for name, value in got.items():
        np.testing.assert_array_equal(value, want[name].astype(value.dtype), err_msg=name)


# ----------------------------------------------------------------------------- a llama.cpp-style GGUF writer

_MODULES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
}
_GLOBALS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}

# A byte-level BPE vocabulary: two control tokens, the space, printable ASCII, a few merges, fillers.
_MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "c"), ("a", "t"), ("Ġc", "at"), ("Ġ", "s"), ("Ġs", "at")]


def tiny_vocab(size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of exactly `size` tokens."""
    tokens = ["<s>", "</s>", "Ġ"] + [chr(c) for c in range(33, 127)] + ["".join(m) for m in _MERGES]
    tokens += [f"<unused{i}>" for i in range(size - len(tokens))]
    types = [3, 3] + [1] * (size - 2)  # 3 = control
    return tokens, types, [" ".join(m) for m in _MERGES]


def llama_cpp_permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: per head, rotate-half row order -> interleaved pairs."""
    half = rows.shape[0] // heads // 2
    return rows.reshape(heads, 2, half, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def gguf_name(hf: str) -> str:
    if hf in _GLOBALS:
        return _GLOBALS[hf]
    layer, module, kind = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf).groups()
    return f"blk.{layer}.{_MODULES[module]}.{kind}"


def write_gguf(path: Path, torch_model, *, arch: str = "llama", dtype=np.float32, tokenizer: bool = True) -> Path:
    """A GGUF file holding `torch_model`'s weights (f32 by default) and config, as llama.cpp writes it."""
    import gguf

    cfg = ModelConfig.from_hf(torch_model.config.to_dict())
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope.theta)
    writer.add_vocab_size(cfg.vocab_size)
    if tokenizer:
        tokens, types, merges = tiny_vocab(cfg.vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(0)
        writer.add_eos_token_id(1)
    for name, tensor in torch_model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        array = tensor.detach().float().numpy()
        if arch == "llama" and re.search(r"self_attn\.q_proj\.(weight|bias)$", name):
            array = llama_cpp_permute(array, cfg.num_heads)
        if arch == "llama" and re.search(r"self_attn\.k_proj\.(weight|bias)$", name):
            array = llama_cpp_permute(array, cfg.num_kv_heads)
        writer.add_tensor(gguf_name(name), np.ascontiguousarray(array.astype(dtype if array.ndim > 1 else np.float32)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ----------------------------------------------------------------------------- HF folders


@pytest.mark.parity
@pytest.mark.parametrize("family", ["llama", "llama_tied", "llama_mha_bias", "mistral", "qwen2_tied", "qwen3"])
def test_hf_round_trip_is_exact(family, tmp_path):
    hf = save_tiny(family, tmp_path / "src")
    model, tokenizer, config = load(tmp_path / "src")
    assert tokenizer is None  # a bare save_pretrained writes no tokenizer
    assert_model_holds(model, hf)
    tokens, mask = random_batch()
    real = mask.astype(bool)
    np.testing.assert_allclose(jax_logits(model, tokens, mask)[real], torch_logits(hf, tokens, mask)[real], atol=1e-4)

    out = save_hf(model, None, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
        assert ("lm_head.weight" in f.keys()) == (not config.tie_word_embeddings)
    back = reload_hf(out)
    assert_state_dicts_equal(numpy_state(back), numpy_state(hf))
    np.testing.assert_array_equal(torch_logits(back, tokens, mask), torch_logits(hf, tokens, mask))


@pytest.mark.parity
def test_sharded_index_folder_loads_and_exports_sharded(tmp_path):
    hf = save_tiny("llama", tmp_path / "src", max_shard_size="40KB")
    assert (tmp_path / "src" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "src").glob("*.safetensors"))) > 2
    model, _, _ = load(tmp_path / "src")
    assert_model_holds(model, hf)

    out = save_hf(model, None, tmp_path / "out", max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and files == {p.name for p in out.glob("*.safetensors")}
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in numpy_state(hf).values())
    assert_state_dicts_equal(numpy_state(reload_hf(out)), numpy_state(hf))


@pytest.mark.parity
def test_the_load_log_line_splits_the_time_into_its_parts(tmp_path, caplog):
    # On a GPU a 135M model loads in 6-8 s against ~2 s on a CPU; the log line must say which part is slow.
    save_tiny("llama", tmp_path / "src")
    with caplog.at_level("INFO", logger="lcc_jax.convert.load"):
        load(tmp_path / "src")
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded ")]
    match = re.fullmatch(r"loaded .* in ([\d.]+) s \(resolve ([\d.]+) s, tokenizer ([\d.]+) s, weights ([\d.]+) s\)", line)
    assert match, line
    total, *parts = map(float, match.groups())
    assert abs(sum(parts) - total) <= 0.15  # each figure is rounded to 0.1 s


@pytest.mark.parity
def test_bf16_checkpoint_round_trips_bit_exact(tmp_path):
    import torch

    hf = save_tiny("qwen2", tmp_path / "src", torch_dtype=torch.bfloat16)
    model, _, _ = load(tmp_path / "src", dtype=jnp.bfloat16)
    assert {v.dtype for v in flat_params(model).values()} == {jnp.dtype(jnp.bfloat16)}
    assert_model_holds(model, hf)

    out = save_hf(model, None, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    assert_state_dicts_equal(numpy_state(reload_hf(out, torch.bfloat16)), numpy_state(hf))

    upcast, _, _ = load(tmp_path / "src", dtype=jnp.float32)  # bf16 -> fp32 is exact
    assert_model_holds(upcast, hf)


def test_save_hf_casts_tensor_by_tensor(tmp_path):
    save_tiny("llama_tied", tmp_path / "src")
    model, _, _ = load(tmp_path / "src")
    out = save_hf(model, None, tmp_path / "out", dtype=ml_dtypes.bfloat16)
    back, _, _ = load(out, dtype=jnp.bfloat16)
    for path, value in flat_params(back).items():
        want = np.asarray(flat_params(model)[path][...]).astype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(np.asarray(value[...]), want, err_msg=path)


def test_load_onto_a_mesh_places_every_parameter_by_the_table(tmp_path):
    save_tiny("qwen3", tmp_path / "src")
    single, _, _ = load(tmp_path / "src")
    mesh = make_mesh("fsdp=4,tensor=2")
    sharded, _, _ = load(tmp_path / "src", mesh=mesh)
    q = flat_params(sharded)["layers.attn.q_proj.kernel"][...]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    for path, value in flat_params(sharded).items():
        np.testing.assert_array_equal(np.asarray(value[...]), np.asarray(flat_params(single)[path][...]), err_msg=path)
    save_hf(sharded, None, tmp_path / "out")  # gathers one tensor at a time
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (
        save_hf(single, None, tmp_path / "out_single") / "model.safetensors"
    ).read_bytes()


# ----------------------------------------------------------------------------- GGUF


@pytest.mark.parametrize("heads", [4, 2])
def test_unpermute_inverts_llama_cpp_permute(heads):
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(heads * 8, 5)).astype(np.float32)
    bias = rng.normal(size=(heads * 8,)).astype(np.float32)
    for rows in (weight, bias):
        permuted = llama_cpp_permute(rows, heads)
        assert not np.array_equal(permuted, rows)
        np.testing.assert_array_equal(unpermute_rows(permuted, heads), rows)


@pytest.mark.parity
@pytest.mark.parametrize(
    "family,arch",
    [("llama", "llama"), ("llama_tied", "llama"), ("llama_mha_bias", "llama"), ("qwen2", "qwen2"), ("qwen3", "qwen3")],
)
def test_gguf_reads_back_the_hf_weights(family, arch, tmp_path):
    hf = hf_model(family)
    model, tokenizer, config = load(write_gguf(tmp_path / "m.gguf", hf, arch=arch))
    want = ModelConfig.from_hf(hf.config.to_dict())
    for field in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size", "vocab_size", "rope",
                  "rms_norm_eps", "tie_word_embeddings", "qkv_bias", "o_bias", "mlp_bias", "qk_norm"):  # fmt: skip
        assert getattr(config, field) == getattr(want, field), field
    assert_model_holds(model, hf)  # q/k un-permuted, shapes un-reversed, bit for bit
    tokens, mask = random_batch()
    real = mask.astype(bool)
    np.testing.assert_allclose(jax_logits(model, tokens, mask)[real], torch_logits(hf, tokens, mask)[real], atol=1e-4)
    assert tokenizer("the cat").input_ids == tokenizer.convert_tokens_to_ids(["t", "he", "Ġcat"])


def test_header_parser_agrees_with_gguf_reader(tmp_path):
    import gguf

    from lcc_jax.convert.gguf_source import read_header

    path = write_gguf(tmp_path / "m.gguf", hf_model("qwen3"), arch="qwen3", dtype=np.float16)
    metadata, infos = read_header(path)
    reader = gguf.GGUFReader(str(path))
    assert metadata == {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert [(i.name, i.ne, i.ggml_type, i.offset, i.nbytes) for i in infos] == [
        (t.name, tuple(int(n) for n in t.shape), t.tensor_type, t.data_offset, t.n_bytes) for t in reader.tensors
    ]


def test_gguf_f16_tensors_are_read_as_stored(tmp_path):
    hf = hf_model("llama")
    source = GGUFSource(write_gguf(tmp_path / "m.gguf", hf, dtype=np.float16))
    for name, want in state_dict_numpy(hf).items():
        assert source.shape(name) == want.shape
        if want.ndim == 2 and "k_proj" not in name and "q_proj" not in name:
            np.testing.assert_array_equal(source.get(name), want.astype(np.float16), err_msg=name)


@pytest.mark.parity
def test_gguf_tokenizer_matches_transformers(tmp_path):
    from transformers import AutoTokenizer

    from lcc_jax.tokenizer import tokenizer_from_gguf

    write_gguf(tmp_path / "m.gguf", hf_model("llama"))
    ours = tokenizer_from_gguf(GGUFSource(tmp_path / "m.gguf"))
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    for text in ["the cat sat", "  the  cat ", "<s>hat</s> sat!", "x=1; y=22"]:
        assert ours(text).input_ids == ref(text).input_ids, text
        assert ours.decode(ours(text).input_ids) == text
    assert (ours.bos_token, ours.eos_token) == (ref.bos_token, ref.eos_token) == ("<s>", "</s>")


def test_gguf_to_hf_keeps_the_tokenizer(tmp_path):
    model, tokenizer, _ = load(write_gguf(tmp_path / "m.gguf", hf_model("llama_tied")))
    out = save_hf(model, tokenizer, tmp_path / "out")
    assert (out / "tokenizer.json").is_file()
    again, tokenizer2, _ = load(out)
    assert tokenizer2("the cat sat").input_ids == tokenizer("the cat sat").input_ids
    assert tokenizer2.eos_token == "</s>"


# ----------------------------------------------------------------------------- Orbax and the command line


def test_orbax_round_trip_restores_onto_a_mesh_and_dtype(tmp_path):
    save_tiny("qwen3", tmp_path / "src")
    model, _, _ = load(tmp_path / "src")
    save_orbax(model, None, tmp_path / "orbax")
    assert (tmp_path / "orbax" / "config.json").is_file()
    back, _, _ = load(tmp_path / "orbax", mesh=make_mesh("fsdp=4,tensor=2"))
    assert flat_params(back)["layers.mlp.down_proj.kernel"][...].sharding.spec == jax.sharding.PartitionSpec(
        None, "tensor", "fsdp"
    )
    for path, value in flat_params(back).items():
        np.testing.assert_array_equal(np.asarray(value[...]), np.asarray(flat_params(model)[path][...]), err_msg=path)
    half, _, _ = load(tmp_path / "orbax", dtype=jnp.bfloat16)
    embed = np.asarray(flat_params(half)["embed.embedding"][...])
    assert embed.dtype == ml_dtypes.bfloat16
    want = np.asarray(flat_params(model)["embed.embedding"][...]).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(embed, want)


def _cli():
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_cli", REPO / "scripts" / "convert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_help_explains_sources_and_examples():
    script = REPO / "scripts" / "convert.py"
    result = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for needle in ("SOURCE", ".gguf", "smollm2-135m", "--to", "--dtype", "--overwrite", "examples:"):
        assert needle in result.stdout, needle


@pytest.mark.parity
def test_cli_converts_gguf_to_bf16_hf_then_orbax(tmp_path, capsys):
    import torch

    cli = _cli()
    gguf_path = write_gguf(tmp_path / "m.gguf", hf_model("llama"))
    assert cli.main([str(gguf_path), str(tmp_path / "hf"), "--dtype", "bf16"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    reload_hf(tmp_path / "hf", torch.bfloat16)  # transformers reads it
    assert cli.main([str(tmp_path / "hf"), str(tmp_path / "orbax"), "--to", "orbax"]) == 0
    model, tokenizer, _ = load(tmp_path / "orbax")
    assert tokenizer is not None and flat_params(model)["embed.embedding"][...].dtype == jnp.float32
    capsys.readouterr()
    assert cli.main([str(gguf_path), str(tmp_path / "hf")]) == 2  # refuses to overwrite: a user's mistake
    assert "--overwrite" in capsys.readouterr().err
