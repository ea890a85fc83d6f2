"""The command-line scripts on a tiny model: they run, write what they say, and refuse what they should."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def test_prune_script_saves_model_masks_and_meta_and_refuses_to_overwrite(tiny_model_dir, tmp_path, capsys):
    import prune as prune_script
    from lcc_jax.checkpoint import load_pruned
    from lcc_jax.convert.export import ExportError

    out = tmp_path / "pruned"
    assert prune_script.main([str(tiny_model_dir), "--method", "magnitude", "--sparsity", "2:4", "--out", str(out),
                              "--export-hf", str(tmp_path / "hf")]) == 0
    checkpoint = load_pruned(out)
    assert checkpoint.meta["prune"]["method"] == "magnitude"
    assert abs(checkpoint.meta["sparsity_total"] - 0.5) < 1e-6
    keep = np.asarray(checkpoint.masks["layers.mlp.down_proj.kernel"])
    assert keep.reshape(keep.shape[0], -1, 4, keep.shape[-1]).sum(axis=2).max() == 2  # 2 kept of every 4 inputs
    assert (tmp_path / "hf" / "config.json").is_file()
    assert "| layer |" in capsys.readouterr().out
    assert prune_script.main([str(tiny_model_dir), "--method", "magnitude", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err.splitlines()[-1]
    with pytest.raises(ExportError, match="not empty"):  # --debug: the exception itself, with its traceback
        prune_script.main([str(tiny_model_dir), "--method", "magnitude", "--out", str(out), "--debug"])


def test_prune_script_rejects_a_bad_pattern_before_loading_anything(tiny_model_dir, tmp_path, capsys):
    import prune as prune_script

    argv = [str(tiny_model_dir), "--method", "wanda", "--sparsity", "3:2", "--out", str(tmp_path / "x")]
    assert prune_script.main(argv) == 2
    assert "0 < N < M" in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "x").exists()


def test_evaluate_script_writes_json(tiny_model_dir, tmp_path):
    import evaluate as evaluate_script

    out = tmp_path / "ppl.json"
    assert evaluate_script.main([str(tiny_model_dir), "--seqlen", "64", "--limit-chunks", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["num_chunks"] == 2 and np.isfinite(result["ppl"])
