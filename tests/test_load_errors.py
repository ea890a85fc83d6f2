"""Bad input is refused with an error that names the problem and the fix; nothing half-written is left.

Each test breaks one thing in a tiny safetensors folder (written here with the `safetensors`
library, no PyTorch) and checks the message a user would read.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lcc_jax.config import ConfigError
from lcc_jax.convert import CheckpointError, ExportError, SourceError, load, save_hf
from lcc_jax.convert.load import download_from_hub

CONFIG = {
    "model_type": "llama",
    "vocab_size": 32,
    "hidden_size": 16,
    "intermediate_size": 24,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": True,
}


def tensors(config: dict = CONFIG) -> dict[str, np.ndarray]:
    """Random HF tensors for a tiny tied llama."""
    rng = np.random.default_rng(0)
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = d // config["num_attention_heads"] * config["num_key_value_heads"]
    out = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({
            p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, d),
            p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d), p + "mlp.down_proj.weight": (d, f),
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
        })  # fmt: skip
    return {name: rng.normal(size=shape).astype(np.float32) for name, shape in out.items()}


def write_folder(folder: Path, weights: dict[str, np.ndarray] | None = None, config: dict = CONFIG) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors(config) if weights is None else weights, str(folder / "model.safetensors"), {"format": "pt"})
    return folder


def test_a_good_folder_loads(tmp_path):
    model, tokenizer, config = load(write_folder(tmp_path / "m"))
    assert config.num_layers == 2 and tokenizer is None


def test_unknown_architecture_names_it_and_the_supported_ones(tmp_path):
    folder = write_folder(tmp_path / "m")
    (folder / "config.json").write_text(json.dumps({**CONFIG, "model_type": "gpt2"}))
    with pytest.raises(ConfigError, match=r"'gpt2' is not supported.*llama, mistral, qwen2, qwen3"):
        load(folder)


def test_missing_tensor_is_named(tmp_path):
    weights = tensors()
    del weights["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        load(write_folder(tmp_path / "m", weights))


def test_wrong_shape_names_tensor_and_both_shapes(tmp_path):
    weights = tensors()
    weights["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 16), np.float32)
    with pytest.raises(CheckpointError, match=r"k_proj\.weight' has shape \(16, 16\), expected \(8, 16\)"):
        load(write_folder(tmp_path / "m", weights))


def test_unexpected_tensor_is_named(tmp_path):
    weights = {**tensors(), "model.layers.0.self_attn.q_proj.bias": np.zeros(16, np.float32)}
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.q_proj\.bias'"):
        load(write_folder(tmp_path / "m", weights))


def test_every_problem_is_listed_at_once(tmp_path):
    weights = tensors()
    del weights["model.norm.weight"]
    weights["extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(CheckpointError) as info:
        load(write_folder(tmp_path / "m", weights))
    assert len(info.value.problems) == 2


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors_file_says_download_again(tmp_path, damage):
    folder = write_folder(tmp_path / "m")
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(b"\x00not a safetensors file" * 10 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*corrupt or truncated"):
        load(folder)


def test_index_naming_a_missing_shard(tmp_path):
    folder = write_folder(tmp_path / "m")
    weight_map = {name: "model-00001-of-00002.safetensors" for name in tensors()}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=r"names shard model-00001-of-00002\.safetensors, which is not in"):
        load(folder)


def test_folder_without_config_json(tmp_path):
    folder = write_folder(tmp_path / "m")
    (folder / "config.json").unlink()
    with pytest.raises(SourceError, match=r"has no config\.json.*save_pretrained"):
        load(folder)


def test_folder_without_weights_points_at_pytorch_pickles(tmp_path):
    folder = write_folder(tmp_path / "m")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no model\.safetensors.*safe_serialization=True"):
        load(folder)


def test_nonexistent_path_lists_what_a_source_can_be(tmp_path):
    with pytest.raises(SourceError, match=r"not an existing file or folder, a built-in model \(smollm2-135m, qwen2"):
        load(str(tmp_path / "nope"))


def test_hub_id_without_network_says_to_pass_a_local_folder(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(SourceError, match=r"could not download 'org/model'.*pass a local folder.*download org/model "):
        download_from_hub("org/model")


def test_corrupt_gguf_file(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(CheckpointError, match=r"cannot read the GGUF file"):
        load(path)


def test_gguf_of_an_unsupported_architecture(tmp_path):
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ConfigError, match=r"GGUF architecture 'gpt2' is not supported"):
        load(tmp_path / "m.gguf")


def test_export_refuses_a_non_empty_folder_and_leaves_it_alone(tmp_path):
    model, _, _ = load(write_folder(tmp_path / "m"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match=r"already exists and is not empty.*overwrite=True"):
        save_hf(model, None, out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    save_hf(model, None, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    save_hf(model, None, tmp_path / "empty_is_fine")


def test_failed_export_leaves_nothing_behind(tmp_path):
    model, _, _ = load(write_folder(tmp_path / "m"))

    class BrokenTokenizer:
        def save_pretrained(self, folder):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_hf(model, BrokenTokenizer(), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_written_safetensors_read_back_with_the_reference_library(tmp_path):
    weights = tensors()
    model, _, _ = load(write_folder(tmp_path / "m", weights))
    out = save_hf(model, None, tmp_path / "out")
    back = load_file(str(out / "model.safetensors"))
    assert sorted(back) == sorted(weights)
    for name, value in weights.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)
