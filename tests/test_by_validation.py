"""Choosing a recovery method's training setting on the validation loss alone (benchmark.by_validation)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lcc_jax.benchmark import by_validation
from lcc_jax.benchmark.config import RecoveryError
from lcc_jax.eval.zeroshot import bits


def _folder(root, rate, losses, ppls, setting="wanda:0.5", method="masked_lora"):
    folder = root / f"lr_{rate:g}"
    (folder).mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"lora_learning_rate": rate, "dtype": "bf16"}))
    for seed, (loss, ppl) in enumerate(zip(losses, ppls, strict=True)):
        cell = {"setting": setting, "method": method, "seed": seed, "ppl": ppl}
        if loss is not None:
            cell["valid_loss"] = loss
        path = folder / setting.replace(":", "-") / f"seed{seed}" / f"{method}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cell))
    (folder / setting.replace(":", "-") / "pruned.json").write_text(
        json.dumps({"setting": setting, "method": "pruned", "seed": None, "ppl": 40.0}))
    return folder


def test_the_lowest_validation_loss_is_chosen_whatever_the_perplexity_says(tmp_path, capsys):
    low = _folder(tmp_path, 1e-4, [2.30, 2.32, 2.31], [35.0, 35.2, 35.1])
    high = _folder(tmp_path, 1e-3, [2.20, 2.21, 2.22], [36.0, 36.1, 36.2])  # better on validation, worse on the test
    [choice] = by_validation.compare([low, high], "masked_lora")
    assert choice["chosen"] == str(high) and choice["rows"][1]["valid_loss"] == pytest.approx(2.21)
    assert choice["rows"][0]["rates"] == {"lora_learning_rate": 1e-4}
    assert by_validation.main([str(low), str(high), "--out", str(tmp_path / "c.json")]) == 0
    table = capsys.readouterr().out
    assert "| 2.2100 ± 0.0100 | 36.10 | **yes** |" in table and "lora 0.001" in table
    assert json.loads((tmp_path / "c.json").read_text())[0]["chosen"] == str(high)


def test_only_the_seeds_every_folder_ran_are_compared(tmp_path):
    three = _folder(tmp_path, 1e-4, [2.30, 2.0, 2.0], [35.0, 30.0, 30.0])  # seeds 1-2 would make it look better
    one = _folder(tmp_path, 3e-4, [2.25], [35.5])
    [choice] = by_validation.compare([three, one], "masked_lora")
    assert all(r["seeds"] == [0] for r in choice["rows"]) and choice["chosen"] == str(one)


def test_cells_without_a_validation_loss_or_any_cells_are_refused_with_the_fix(tmp_path, capsys):
    old = _folder(tmp_path, 1e-4, [None], [35.0])
    new = _folder(tmp_path, 3e-4, [2.25], [35.5])
    with pytest.raises(RecoveryError, match="without a validation loss.*run them again"):
        by_validation.compare([old, new], "masked_lora")
    with pytest.raises(RecoveryError, match="no dora cells.*--methods dora"):
        by_validation.compare([old, new], "dora")
    assert by_validation.main([str(old), str(new)]) == 2 and "error:" in capsys.readouterr().err


def _scored(folder, method, seed, loss, nll, correct, pruned_ppl=40.0, setting="wanda:0.5"):
    """A cell with what the paired intervals read: per-chunk NLL and one task's per-document outcomes."""
    slug = setting.replace(":", "-")
    cell = {"setting": setting, "method": method, "seed": seed, "ppl": float(np.exp(np.mean(nll))),
            "ppl_chunk_nll": list(nll), "valid_loss": loss, "mean_of": "rte",
            "zeroshot": {"rte": {"acc": float(np.mean(correct)), "n": len(correct), "correct": bits(correct)}}}
    (folder / slug / f"seed{seed}").mkdir(parents=True, exist_ok=True)
    (folder / slug / f"seed{seed}" / f"{method}.json").write_text(json.dumps(cell))
    (folder / slug / "pruned.json").write_text(json.dumps({"setting": setting, "method": "pruned", "seed": None,
                                                           "ppl": pruned_ppl}))


def test_the_chosen_folder_is_set_against_the_rivals_with_paired_intervals(tmp_path, capsys):
    rng = np.random.default_rng(0)
    nll = rng.uniform(3.0, 4.0, 64)
    docs = rng.integers(0, 2, 400)
    chosen, rivals = tmp_path / "lr_1e-3", tmp_path / "rivals"
    for seed in (0, 1):
        better = docs.copy()
        better[rng.choice(np.flatnonzero(docs == 0), 60, replace=False)] = 1  # 60 more documents right
        _scored(chosen, "masked_lora", seed, 1.90 + 0.01 * seed, nll - 0.05, better)
        _scored(rivals, "restorelcc_recipe", seed, 2.00 + 0.01 * seed, nll, docs)
        _scored(rivals, "lofit", seed, 1.90, nll - 0.05, better)  # the same outcomes: no difference
    _scored(rivals, "bias_only", 2, 2.3, nll + 0.5, docs)  # a seed the chosen folder never ran: left out
    choice = {"setting": "wanda:0.5", "method": "masked_lora", "chosen": str(chosen)}
    found = {r["rival"]: r for r in by_validation.against_rivals(choice, rivals)}
    assert set(found) == {"restorelcc_recipe", "lofit"}
    recipe, lofit = found["restorelcc_recipe"], found["lofit"]
    assert recipe["seeds"] == [0, 1] and recipe["valid_loss"] == pytest.approx(-0.10)
    assert recipe["ppl"]["high"] < 0 and recipe["mean_acc"]["low"] > 0  # a win on both, intervals clear of zero
    assert lofit["ppl"]["diff"] == pytest.approx(0.0) and lofit["mean_acc"]["diff"] == pytest.approx(0.0)
    text = by_validation.rivals_markdown(choice, found.values())
    assert "RestoreLCC (recipe)" in text and "win |" in text and "| -0.1000 |" in text
    assert by_validation.main([str(chosen), "--rivals", str(rivals), "--out", str(tmp_path / "c.json")]) == 0
    assert "minus each rival" in capsys.readouterr().out
    assert {r["rival"] for r in json.loads((tmp_path / "c.json").read_text())[0]["against_rivals"]} == set(found)


def test_rivals_from_another_prune_are_refused_with_the_fix(tmp_path, capsys):
    nll, docs = np.full(8, 3.0), np.ones(20, int)
    _scored(tmp_path / "chosen", "masked_lora", 0, 1.9, nll, docs, pruned_ppl=40.0)
    _scored(tmp_path / "rivals", "lofit", 0, 2.0, nll, docs, pruned_ppl=41.0)  # 2.5 %: another checkpoint
    choice = {"setting": "wanda:0.5", "method": "masked_lora", "chosen": str(tmp_path / "chosen")}
    with pytest.raises(RecoveryError, match="another prune.*--base"):
        by_validation.against_rivals(choice, tmp_path / "rivals")
    assert by_validation.main([str(tmp_path / "chosen"), "--rivals", str(tmp_path / "rivals")]) == 2
    assert "another prune" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        by_validation.main([str(tmp_path / "chosen"), "--rivals", str(tmp_path / "missing")])


@pytest.mark.slow
def test_the_device_rate_sweep_runs_end_to_end_on_the_tiny_model(tiny_model_dir, tmp_path):
    """benchmarks/gpu/lora_rate.sh as a lease runs it (bundle already unpacked), on the tiny model and data."""
    import os
    import subprocess
    import tarfile
    from pathlib import Path

    from lcc_jax.data.text import data_dir

    repo = Path(__file__).resolve().parents[1]
    device, bundle, out = tmp_path / "device_tmp", tmp_path / "bundle2", tmp_path / "OUT"
    bundle.mkdir()
    (bundle / "SHA256").write_text("0" * 64 + "\npieces 1\n")  # unpacked already: its marker is there
    (device / "b").mkdir(parents=True)
    (device / "b" / f".ok_{'0' * 64}").touch()
    (device / "b" / "data").symlink_to(data_dir().resolve())
    out.mkdir()
    tiny = ("--num-train 16 --num-probe 16 --num-valid 8 --max-length 48 --capture-length 48 --epochs 1 --batch-size 4 "
            "--capture-batch-size 8 --eval-seqlen 64 --eval-limit-chunks 2 --top-k 0.25 --nsamples 4 --seqlen 64 "
            "--prune-batch-size 4 --tasks rte --limit 4 --zeroshot-batch-size 8")
    env = {**os.environ, "UNPACK_ROOT": str(device), "OUT": str(out), "BUNDLE": str(bundle),
           "RATE_DIR": str(tmp_path / "rate"), "RATE_MODEL": str(tiny_model_dir), "REC_EXTRA": tiny,
           "RATES": "1e-4 1e-2", "SEED_STEPS": "0 chosen", "RIVALS": "restorelcc_recipe,lofit", "RIVAL_SEEDS": "1"}
    done = subprocess.run(["bash", "benchmarks/gpu/lora_rate.sh", "900"], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=1200)
    log = (tmp_path / "rate" / "rate.log").read_text() if (tmp_path / "rate" / "rate.log").exists() else ""
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + log[-3000:]
    seed0 = json.loads((tmp_path / "rate" / "choice_seed0.json").read_text())[0]
    chosen = Path(seed0["chosen"]).name  # lr_<rate>: seeds 1 and 2 ran at this rate only
    for phase in ("prune", "lr_1e-4_seeds_0", "lr_1e-2_seeds_0", "choose_seed0", f"{chosen}_seeds_1,2", "rivals",
                  "choose"):
        assert (tmp_path / "rate" / f".done_{phase}").exists(), log[-3000:]
    other = {"lr_1e-4": "lr_1e-2", "lr_1e-2": "lr_1e-4"}[chosen]
    assert not (tmp_path / "rate" / other / "wanda-0.5" / "seed1").exists()
    choice = json.loads((tmp_path / "rate" / "choice.json").read_text())
    rows = choice[0]["rows"]
    assert rows[0]["seeds"] == [0] and choice[0]["chosen"] == seed0["chosen"]  # chosen on the seed every folder ran
    assert {r["rival"] for r in choice[0]["against_rivals"]} == {"restorelcc_recipe", "lofit"}  # on seed 1
    rivals = tmp_path / "rate" / "rivals" / "wanda-0.5" / "seed1"
    assert all("valid_loss" in json.loads((rivals / f"{m}.json").read_text()) for m in ("restorelcc_recipe", "lofit"))
    with tarfile.open(out / "rate.tgz") as tar:  # what comes home: the cells, not the checkpoints
        names = tar.getnames()
    assert "rate/choice.json" in names and not any(n.endswith(".safetensors") or "/pruned/" in n for n in names)
