"""Whether the validation loss ranked the ablation's members as the test sets do (study.agreement)."""

from __future__ import annotations

import json

import pytest

from lcc_jax.study import agreement


def _member(folder, name, seed, loss, ppl, acc=None, setting="wanda:0.5"):
    row = {"setting": setting, "member": name, "seed": seed, "valid_loss": loss, "ppl": ppl}
    if acc is not None:
        row["mean_acc"] = acc
    path = folder / setting.replace(":", "-") / "ablation" / f"seed{seed}" / f"{name.replace(':', '_')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row))


def test_ranks_that_agree_cost_nothing_and_reversed_ones_are_measured(tmp_path, capsys):
    agree, reverse = tmp_path / "agree", tmp_path / "reverse"
    for i, (loss, ppl, acc) in enumerate([(2.0, 36.0, 0.41), (2.1, 37.0, 0.40), (2.2, 39.0, 0.39), (2.3, 45.0, None)]):
        _member(agree, f"m{i}", 0, loss, ppl, acc)
        _member(reverse, f"m{i}", 0, loss, 45.0 - (ppl - 36.0), acc)  # the lowest loss has the worst perplexity
    _member(agree, "m0", 1, 9.0, 99.0)  # another seed is not ranked with seed 0
    [ok], [bad] = agreement.table([agree]), agreement.table([reverse])
    assert ok["members"] == 4 and ok["rho_ppl"] == pytest.approx(1.0) and ok["regret"] == 0.0
    assert ok["rho_acc"] == pytest.approx(1.0) and ok["scored"] == 3 and ok["chosen"] == ok["best"] == "m0"
    assert bad["rho_ppl"] == pytest.approx(-1.0) and bad["chosen"] == "m0" and bad["best"] == "m3"
    assert bad["regret"] == pytest.approx(9.0)
    assert agreement.main([str(agree), str(reverse)]) == 0
    text = capsys.readouterr().out
    assert "| +1.00 | +1.00 (3 scored) | `m0` | `m0` | 0.00 |" in text and "| -1.00 |" in text


def test_too_few_members_or_no_folder_names_the_fix(tmp_path, capsys):
    _member(tmp_path / "two", "a", 0, 2.0, 30.0)
    _member(tmp_path / "two", "b", 0, 2.1, 31.0)
    assert agreement.table([tmp_path / "two"]) == []
    assert agreement.main([str(tmp_path / "two")]) == 2 and "run scripts/ablate.py" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        agreement.main([str(tmp_path / "missing")])
