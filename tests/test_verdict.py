"""The recipe verdict: rivals gathered from an ablation and a recovery folder, intervals, and the rule."""

import json
import shutil

import numpy as np
import pytest

from lcc_jax.eval.tasks import SUITE
from lcc_jax.eval.zeroshot import bits
from lcc_jax.study.verdict import markdown, recipe_verdict

RECIPE, PAPER, LOFIT, BIAS = "probe:full:1.0:5e-3", "probe:full:0.25:1e-3", "lofit:bias:0.25:1e-2", "probe:bias:0.25:1e-3"


def _row(seed: int, acc: float, nll: float, rng, **extra) -> dict:
    """A scored row: 400 documents per suite task right with probability `acc`, 60 chunks of NLL about `nll`."""
    zeroshot = {t: {"acc": acc, "correct": bits(rng.random(400) < acc)} for t in SUITE}
    return {"setting": "wanda:0.5", "seed": seed, "ppl": float(np.exp(nll)), "mean_acc": acc, "mean_of": "suite",
            "ppl_chunk_nll": list(nll + 0.01 * rng.standard_normal(60)), "zeroshot": zeroshot,
            "sparsity_target": 0.5, "sparsity_after_export": 0.5, **extra}


def _write(folder, name, row):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name.replace(':', '_')}.json").write_text(json.dumps(row))


@pytest.fixture
def folders(tmp_path):
    rng = np.random.default_rng(0)
    abl, rec = tmp_path / "abl", tmp_path / "rec"
    members = {RECIPE: (0.60, 3.40), PAPER: (0.50, 3.70), LOFIT: (0.52, 3.60), BIAS: (0.49, 3.75)}
    for seed in (0, 1):
        for member, (acc, nll) in members.items():
            _write(abl / "wanda-0.5" / "ablation" / f"seed{seed}", member,
                   _row(seed, acc, nll, rng, member=member, valid_loss=nll - 1))
        _write(rec / "wanda-0.5" / f"seed{seed}", "masked_lora", _row(seed, 0.55, 3.50, rng, method="masked_lora"))
    (rec / "wanda-0.5" / "pruned.json").write_text(json.dumps({"setting": "wanda:0.5", "method": "pruned", "seed": None}))
    order = sorted(members, key=lambda m: members[m][1])
    (abl / "wanda-0.5" / "ablation" / "finalists.json").write_text(json.dumps({"by_valid_loss": order,
                                                                             "finalists": order}))
    return abl, rec


def test_recipe_beating_every_rival_may_become_default(folders):
    abl, rec = folders
    v = recipe_verdict(abl, "wanda:0.5", rec)
    assert v["recipe"] == RECIPE and v["recipe_seeds"] == [0, 1] and v["sparse"]
    assert [r["name"] for r in v["rivals"]][-1].startswith("masked LoRA")
    assert all(r["beats"] and r["seeds"] == [0, 1] for r in v["rivals"])
    assert all(r["ppl"]["high"] < 0 and r["mean_acc"]["low"] > 0 for r in v["rivals"])
    assert v["missing"] == [] and v["default_worthy"]
    assert "may become the default" in markdown([v])


def test_without_masked_lora_the_rule_is_not_met(folders):
    abl, _ = folders
    v = recipe_verdict(abl, "wanda:0.5")
    assert v["missing"] == ["masked LoRA"] and not v["default_worthy"]
    assert "not measured: masked LoRA" in markdown([v])


def test_a_rival_inside_the_noise_is_not_beaten(folders, tmp_path):
    abl, rec = folders
    rng = np.random.default_rng(1)
    for seed in (0, 1):  # masked LoRA as good as the recipe: intervals include zero
        _write(rec / "wanda-0.5" / f"seed{seed}", "masked_lora", _row(seed, 0.60, 3.40, rng, method="masked_lora"))
    v = recipe_verdict(abl, "wanda:0.5", rec)
    masked = next(r for r in v["rivals"] if r["name"].startswith("masked LoRA"))
    assert not masked["beats"] and not v["default_worthy"]
    assert "not beaten: masked LoRA" in markdown([v])


def test_lost_sparsity_blocks_the_default(folders):
    abl, rec = folders
    path = abl / "wanda-0.5" / "ablation" / "seed0" / f"{RECIPE.replace(':', '_')}.json"
    row = json.loads(path.read_text())
    path.write_text(json.dumps({**row, "sparsity_after_export": 0.49}))
    v = recipe_verdict(abl, "wanda:0.5", rec)
    assert not v["sparse"] and not v["default_worthy"]


def test_missing_ablation_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="scripts/ablate.py"):
        recipe_verdict(tmp_path, "wanda:0.5")


def test_command_line_writes_the_table(folders, tmp_path, capsys):
    from lcc_jax.study.verdict import main

    abl, rec = folders
    (abl / "wanda-0.5" / "pruned.json").write_text(json.dumps({"setting": "wanda:0.5"}))
    assert main([str(abl), "--recovery", str(rec)]) == 0
    assert "masked LoRA" in capsys.readouterr().out
    assert json.loads((abl / "verdict.json").read_text())[0]["default_worthy"]


def test_command_line_refuses_a_folder_that_is_no_ablation(folders, tmp_path, capsys):
    from lcc_jax.study.verdict import main

    abl, _ = folders
    for argv, named in (([str(tmp_path / "nowhere")], "nowhere is not a folder"),
                        ([str(tmp_path / "rec")], "holds no ablated setting"),
                        ([str(abl), "--recovery", str(tmp_path / "nowhere")], "benchmark_recovery.py --out")):
        with pytest.raises(SystemExit):
            main(argv)
        assert named in capsys.readouterr().err
    assert not (tmp_path / "rec" / "verdict.md").exists()  # nothing written for a refused folder


def _pruned(folder, ppl):
    (folder / "wanda-0.5").mkdir(parents=True, exist_ok=True)
    (folder / "wanda-0.5" / "pruned.json").write_text(json.dumps({"setting": "wanda:0.5", "method": "pruned",
                                                                  "seed": None, "ppl": ppl}))


@pytest.mark.parametrize("recovery_ppl, paired", [(40.0 * (1 + 5e-4), True), (41.0, False)])
def test_a_recovery_folder_that_pruned_another_checkpoint_is_left_out(folders, recovery_ppl, paired):
    abl, rec = folders
    _pruned(abl, 40.0)
    _pruned(rec, recovery_ppl)
    v = recipe_verdict(abl, "wanda:0.5", rec)
    assert any(r["name"].startswith("masked LoRA") for r in v["rivals"]) == paired
    assert v["default_worthy"] == paired
    if not paired:
        assert v["missing"] == ["masked LoRA"]
        assert "pruned another checkpoint for wanda:0.5 (pruned ppl 41.000, the ablation's 40.000)" in markdown([v])


def _second_study(folders, tmp_path, *, masked_lora_as_good: bool = False, recipe: str = RECIPE):
    """A copy of the fixture's study, where masked LoRA can be as good as the recipe or another member chosen."""
    abl, rec = folders
    abl2, rec2 = tmp_path / "second" / "abl", tmp_path / "second" / "rec"
    shutil.copytree(abl, abl2)
    shutil.copytree(rec, rec2)
    if masked_lora_as_good:
        rng = np.random.default_rng(2)
        for seed in (0, 1):
            _write(rec2 / "wanda-0.5" / f"seed{seed}", "masked_lora", _row(seed, 0.60, 3.40, rng, method="masked_lora"))
    finalists = abl2 / "wanda-0.5" / "ablation" / "finalists.json"
    order = json.loads(finalists.read_text())["by_valid_loss"]
    order = [recipe] + [m for m in order if m != recipe]
    finalists.write_text(json.dumps({"by_valid_loss": order, "finalists": order}))
    return abl2, rec2


def test_the_default_rule_needs_one_recipe_that_wins_in_every_study(folders, tmp_path):
    from lcc_jax.study.default_rule import Study, decide

    abl, rec = folders
    abl1, rec1 = _second_study(folders, tmp_path / "1")
    both = decide([Study("a", abl, (rec,)), Study("b", abl1, (rec1,))])
    assert both["default"] == RECIPE and [c["recipe"] for c in both["candidates"]] == [RECIPE]

    abl2, rec2 = _second_study(folders, tmp_path / "2", masked_lora_as_good=True)
    one_loses = decide([Study("a", abl, (rec,)), Study("b", abl2, (rec2,))])
    assert one_loses["default"] is None
    cells = {c["study"]: c["verdict"]["default_worthy"] for c in one_loses["candidates"][0]["cells"]}
    assert cells == {"a": True, "b": False}

    abl3, rec3 = _second_study(folders, tmp_path / "3", recipe=LOFIT)  # the second study chose another member
    two_recipes = decide([Study("a", abl, (rec,)), Study("b", abl3, (rec3,))])
    assert [c["recipe"] for c in two_recipes["candidates"]] == [RECIPE, LOFIT]
    assert two_recipes["candidates"][0]["chosen_in"] == ["a wanda:0.5"]
    # each choice is judged in both studies: RECIPE (trained in b too) wins in both, b's LoFiT-heads choice in neither
    assert [c["default_worthy"] for c in two_recipes["candidates"]] == [True, False]
    assert two_recipes["default"] == RECIPE


def test_default_rule_command_line_writes_the_decision_and_refuses_a_missing_folder(folders, tmp_path, capsys):
    from lcc_jax.study.default_rule import main

    abl, rec = folders
    out = tmp_path / "decision.md"
    assert main(["--study", "a", str(abl), str(rec), "--out", str(out)]) == 0
    assert "Default: `probe:full:1.0:5e-3` wins" in capsys.readouterr().out
    assert json.loads(out.with_suffix(".json").read_text())["default"] == RECIPE and out.exists()
    with pytest.raises(SystemExit):
        main(["--study", "a", str(tmp_path / "nowhere")])
    assert "nowhere is not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--study", "a"])
    assert "give NAME ABLATION" in capsys.readouterr().err
