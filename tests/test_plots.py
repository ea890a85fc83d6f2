"""Pictures of a restore run: exact PNG sizes, every selected head boxed, bars as the rows say, run folders read."""

from __future__ import annotations

import json
import logging
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from lcc_jax.benchmark import plots

ROOT = Path(__file__).resolve().parents[1]


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def boxes(fig) -> list:
    return [p for p in fig.axes[0].patches if p.get_gid() == plots.SELECTED_GID]


def test_head_scores_png_has_the_asked_size_and_boxes_every_selected_head(tmp_path):
    scores = np.random.default_rng(0).uniform(0.4, 0.9, (6, 4))
    path = plots.plot_head_scores(scores, [1, 22, 7], tmp_path / "heads.png", figsize=(4, 3))
    assert path == tmp_path / "heads.png" and png_size(path) == (4 * plots.DPI, 3 * plots.DPI)

    flat = plots.head_scores_figure(scores, [1, 22, 7])
    pairs = plots.head_scores_figure(scores, [(0, 1), (5, 2), (1, 3)])
    corners = lambda fig: sorted(p.get_xy() for p in boxes(fig))  # noqa: E731
    assert len(boxes(flat)) == 3 and corners(flat) == corners(pairs)
    assert (1 - 0.5, 0 - 0.5) in corners(flat)  # head 1 of layer 0: column 1, row 0
    assert np.array_equal(flat.axes[0].images[0].get_array(), scores)
    assert boxes(plots.head_scores_figure(scores, [])) == []
    with pytest.raises(ValueError, match="outside"):
        plots.head_scores_figure(scores, [24])  # layer 6 of 6


def test_selected_pairs_reads_flat_indices_as_layer_times_heads_plus_head():
    np.testing.assert_array_equal(plots.selected_pairs([0, 9, 13], 9), [[0, 0], [1, 0], [1, 4]])
    np.testing.assert_array_equal(plots.selected_pairs([(2, 3)], 9), [[2, 3]])
    with pytest.raises(ValueError, match="pairs"):
        plots.selected_pairs(np.zeros((2, 3)), 9)


def test_component_energy_sums_heads_into_one_bar_per_layer(tmp_path):
    per_head = np.arange(12, dtype=float).reshape(3, 4)
    fig = plots.component_energy_figure(per_head)
    heights = [bar.get_height() for bar in fig.axes[0].patches]
    np.testing.assert_allclose(heights, per_head.sum(-1))
    path = plots.plot_component_energy(per_head.sum(-1), tmp_path / "energy.png", figsize=(5, 2.5))
    assert png_size(path) == (5 * plots.DPI, int(2.5 * plots.DPI))


def test_recovery_bars_follow_the_rows_skip_missing_values_and_draw_error_bars(tmp_path):
    rows = [
        {"setting": "wanda 50%", "method": "dense", "ppl": 21.3, "mean_acc": 40.0},
        {"setting": "wanda 50%", "method": "pruned", "ppl": 49.9, "mean_acc": 36.0},
        {"setting": "wanda 50%", "method": "RestoreLCC", "ppl": 41.5, "mean_acc": 38.0, "std": 1.0},
        {"setting": "sparsegpt 2:4", "method": "dense", "ppl": 21.3, "mean_acc": None},
        {"setting": "sparsegpt 2:4", "method": "pruned", "ppl": 1974.5, "mean_acc": 33.0},
        {"setting": "sparsegpt 2:4", "method": "LoRA", "ppl": None, "mean_acc": 35.0, "std": 2.0},
    ]
    path = plots.plot_recovery(rows, tmp_path / "recovery.png", figsize=(6, 4))
    assert png_size(path) == (6 * plots.DPI, 4 * plots.DPI)

    ppl = plots.recovery_figure(rows, "ppl").axes[0]
    assert sorted(round(b.get_height(), 1) for b in ppl.patches) == [21.3, 21.3, 41.5, 49.9, 1974.5]
    assert ppl.get_yscale() == "log"  # 21 to 1974: a linear axis would flatten the small bars
    assert [t.get_text() for t in ppl.get_xticklabels()] == ["wanda 50%", "sparsegpt 2:4"]
    assert [t.get_text() for t in ppl.get_legend().get_texts()] == ["dense", "pruned", "RestoreLCC"]

    acc = plots.recovery_figure(rows, "mean_acc", error="std").axes[0]
    assert len(acc.patches) == 5 and acc.get_yscale() == "linear"
    assert [t.get_text() for t in acc.get_legend().get_texts()] == ["dense", "pruned", "RestoreLCC", "LoRA"]
    assert sum(len(c.get_segments()) for c in acc.collections) == 2  # error bars on the two rows with a std
    with pytest.raises(ValueError, match="finite"):
        plots.recovery_figure(rows, "nope")


def _fake_run(out: Path, layers: int = 3, heads: int = 4, d: int = 8, selected=None) -> None:
    """A restore folder with the files plot_restore_run reads, written by the pipeline's own classes."""
    from lcc_jax.restore.components import LostComponents
    from lcc_jax.restore.probe import ProbeResult

    rng = np.random.default_rng(0)
    total = layers * heads
    out.mkdir(parents=True)
    LostComponents(component=rng.normal(size=(total, d)).astype(np.float32), basis=np.zeros((total, d, d), np.float32),
                   singular_values=np.abs(rng.normal(size=(total, d))).astype(np.float32)).save(out / "components.npz")
    accuracy = np.linspace(0.5, 0.9, total)
    ProbeResult(accuracy=accuracy, val_loss=np.zeros(total), weight=np.zeros((total, 2 * d)), bias=np.zeros(total),
                train_pairs=np.arange(7), val_pairs=np.arange(7, 10)).save(out / "probes.npz")
    (out / "run.json").write_text(json.dumps({"restore": {"top_k": 0.25, "seed": 42, "mode": "full",
                                                          "random_heads": False}}))
    (out / "restored").mkdir()
    (out / "restored" / "config.json").write_text(json.dumps({"num_hidden_layers": layers}))
    for name, ppl in (("dense", 20.0), ("pruned", 50.0), ("restored", 40.0)):
        (out / f"eval_{name}.json").write_text(json.dumps({"wikitext2_ppl": ppl}))
    summary = {"pruning": "wanda 0.5"} | ({"selected_heads": selected} if selected is not None else {})
    (out / "summary.json").write_text(json.dumps(summary))
    (out / "train_history.json").write_text(json.dumps({"loss": [3.0, 2.5, 2.2], "valid_loss": [2.4]}))


def test_restore_run_plots_are_written_and_pick_the_heads_the_pipeline_picked(tmp_path):
    from lcc_jax.restore.probe import ProbeResult

    out = tmp_path / "run"
    _fake_run(out)
    paths = plots.plot_restore_run(out)
    assert [p.name for p in paths] == ["head_scores.png", "component_energy.png", "train_loss.png", "perplexity.png"]
    assert all(p.parent == out / "plots" and p.stat().st_size > 0 for p in paths)
    # no list in summary.json: chosen again from the probes, as the pipeline did (top 25 % of 12 = 3)
    probes = ProbeResult.load(out / "probes.npz")
    chosen = plots.selected_heads(out, probes, _components(out))
    np.testing.assert_array_equal(chosen, probes.ranking[:3])
    assert plots.perplexity_rows(out) == [{"setting": "wanda 0.5", "method": m, "ppl": p}
                                          for m, p in (("dense", 20.0), ("pruned", 50.0), ("RestoreLCC", 40.0))]

    recorded = tmp_path / "recorded"
    _fake_run(recorded, selected=[0, 5])
    np.testing.assert_array_equal(plots.selected_heads(recorded, probes, _components(recorded)), [0, 5])


def _components(out: Path):
    from lcc_jax.restore.components import LostComponents

    return LostComponents.load(out / "components.npz")


def test_a_failing_plot_only_warns_and_keeps_the_run(tmp_path, monkeypatch, caplog):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import restore as restore_script
    finally:
        sys.path.remove(str(ROOT / "scripts"))

    def broken(out):
        raise RuntimeError("no display")

    monkeypatch.setattr(plots, "plot_restore_run", broken)
    with caplog.at_level(logging.WARNING, logger="lcc_jax"):
        restore_script.write_plots(tmp_path)  # must not raise
    assert "no plots written" in caplog.text and "no display" in caplog.text


@pytest.mark.slow
def test_restore_script_writes_the_plots_of_its_run(tiny_model_dir, tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import restore as restore_script
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    from lcc_jax.restore.probe import ProbeResult

    out = tmp_path / "run"
    argv = [str(tiny_model_dir), "--out", str(out), "--num-train", "16", "--num-probe", "12", "--valid-data", "none",
            "--max-length", "64", "--capture-length", "64", "--epochs", "1", "--batch-size", "4",
            "--capture-batch-size", "8", "--eval-seqlen", "64", "--eval-limit-chunks", "1", "--top-k", "0.25",
            "--method", "wanda", "--sparsity", "0.5", "--nsamples", "4", "--seqlen", "64"]
    assert restore_script.main(argv) == 0
    names = {p.name for p in (out / "plots").iterdir()}
    assert {"head_scores.png", "component_energy.png", "train_loss.png", "perplexity.png"} <= names
    assert "plots:" in capsys.readouterr().out
    eta = json.loads((out / "eta.json").read_text())  # the estimate made before the job, against its stages' times
    assert eta["machine"]["backend"] == "cpu" and {"train", "export", "plots"} <= set(eta["per_stage"])
    summary = json.loads((out / "summary.json").read_text())
    chosen = plots.selected_heads(out, ProbeResult.load(out / "probes.npz"), _components(out))
    assert len(chosen) == summary["heads"] == 2
