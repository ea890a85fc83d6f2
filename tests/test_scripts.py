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


def test_recover_lora_script_keeps_the_sparsity_writes_its_summary_and_refuses_to_overwrite(tiny_model_dir, tmp_path,
                                                                                           capsys):
    import lcc_jax
    import prune as prune_script
    import recover_lora as recover_script
    from lcc_jax.checkpoint import load_pruned
    from lcc_jax.sharding import flat_params

    pruned = tmp_path / "pruned"
    assert prune_script.main([str(tiny_model_dir), "--method", "wanda", "--sparsity", "0.5", "--nsamples", "4",
                              "--seqlen", "64", "--batch-size", "4", "--out", str(pruned)]) == 0
    tiny = ["--num-train", "24", "--num-valid", "8", "--max-length", "64", "--epochs", "1", "--batch-size", "4",
            "--eval-seqlen", "64", "--eval-limit-chunks", "2"]
    out = tmp_path / "lora"
    assert recover_script.main([str(pruned), "--out", str(out), "--eval-ppl", "--export-hf", str(tmp_path / "hf"),
                                *tiny]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["adapter"] == "masked" and summary["sparsity"]["revived_weights"] == 0
    assert summary["sparsity"]["after_merge"] == pytest.approx(0.5, abs=0.01)
    assert np.isfinite([summary["wikitext2_ppl_pruned"], summary["wikitext2_ppl_recovered"]]).all()
    assert summary["budget"]["num_train"] == 24 and "top_k" not in summary["budget"]
    assert (tmp_path / "hf" / "config.json").is_file()

    masks = load_pruned(pruned).masks
    recovered = flat_params(lcc_jax.load(out)[0])
    for path, keep in masks.items():  # read back from disk: every pruned weight is still exactly zero
        assert not np.asarray(recovered[path][...])[~np.asarray(keep)].any(), path

    assert recover_script.main([str(pruned), "--out", str(out), *tiny]) == 2  # refused before training
    assert "not empty" in capsys.readouterr().err.splitlines()[-1]
    assert json.loads((out / "summary.json").read_text()) == summary
    assert recover_script.main([str(tmp_path / "nope"), "--out", str(tmp_path / "x"), *tiny]) == 2
    assert "scripts/prune.py" in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "x").exists()
