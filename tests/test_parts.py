"""A recovery table split over parts: linking from pruned bases and merging the parts (files only, no model)."""

import pytest

from lcc_jax.benchmark.config import RecoveryError
from lcc_jax.benchmark.parts import link_base, merge_parts


def base(folder, settings, dense="dense"):
    (folder).mkdir(parents=True)
    (folder / "dense.json").write_text(dense)
    for slug in settings:
        (folder / slug / "pruned").mkdir(parents=True)
        (folder / slug / "pruned" / "mask.bin").write_text(f"mask of {slug} in {folder.name}")
        (folder / slug / "pruned.json").write_text(f"scores of {slug}")
    return folder


def test_parts_take_each_setting_from_the_first_base_that_has_it_and_dense_scores_from_the_first(tmp_path):
    first, second = base(tmp_path / "w", ["wanda-0.5"]), base(tmp_path / "s", ["sparsegpt-2of4"], dense="other")
    part = tmp_path / "part"
    link_base([first, second], part, ["sparsegpt:2:4"])
    assert (part / "dense.json").read_text() == "dense"  # from the first base: parts merge
    mask = "sparsegpt-2of4/pruned/mask.bin"
    assert (part / mask).stat().st_ino == (second / mask).stat().st_ino
    with pytest.raises(RecoveryError, match="--prune-only"):
        link_base([first], tmp_path / "p2", ["flap:0.2"])


def test_merge_gathers_cells_skips_each_runs_report_and_refuses_two_results_for_one_cell(tmp_path):
    b = base(tmp_path / "b", ["wanda-0.5"])
    parts = []
    for seed in (0, 1):
        part = tmp_path / f"p{seed}"
        link_base([b], part, ["wanda:0.5"])
        (part / "wanda-0.5" / f"seed{seed}").mkdir()
        (part / "wanda-0.5" / f"seed{seed}" / "lora.json").write_text(f"cell {seed}")
        (part / "table.md").write_text(f"table of part {seed}")  # a run's own report: not merged
        parts.append(part)
    out = tmp_path / "all"
    assert merge_parts(parts, out) == 5  # dense, pruned/mask.bin, pruned.json, two cells
    assert (out / "wanda-0.5" / "seed1" / "lora.json").read_text() == "cell 1" and not (out / "table.md").exists()
    assert merge_parts(parts, out) == 0  # again: nothing new
    (parts[1] / "wanda-0.5" / "seed0").mkdir()
    (parts[1] / "wanda-0.5" / "seed0" / "lora.json").write_text("cell 0, run again")
    with pytest.raises(RecoveryError, match="differs between"):
        merge_parts(parts, tmp_path / "all2")
    assert not (tmp_path / "all2").exists()  # refused before writing anything
