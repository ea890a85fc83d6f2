"""scripts/ablate.py on a tiny model: member parsing, rankings, the grid, finalists by validation loss, resume."""

import json

import numpy as np
import pytest

TINY = ["--num-train", "16", "--num-probe", "16", "--num-valid", "8", "--max-length", "48", "--capture-length", "48",
        "--epochs", "1", "--batch-size", "4", "--capture-batch-size", "8", "--eval-seqlen", "64",
        "--eval-limit-chunks", "2", "--nsamples", "4", "--seqlen", "64", "--tasks", "rte", "--limit", "4",
        "--zeroshot-batch-size", "8"]


def _run(model_dir, out, *extra):
    import sys

    sys.path.insert(0, "scripts")
    try:
        import ablate
    finally:
        sys.path.pop(0)
    return ablate.main([str(model_dir), "--out", str(out), *TINY, *extra])


def test_member_names_parse_and_bad_ones_are_refused():
    from lcc_jax.study.members import AblationError, MemberSpec

    m = MemberSpec.parse("probe:span5:0.25:1e-2")
    assert (m.ranking, m.mode, m.span, m.top_k, m.learning_rate) == ("probe", "no_bias", 5, 0.25, 1e-2)
    assert MemberSpec.parse("grad:bias:12:1e-3").top_k == 12 and MemberSpec.parse("grad:bias:1.0:1e-3").top_k == 1.0
    assert MemberSpec.parse("probe:full:0.25:1e-3").epochs is None  # the budget's
    assert MemberSpec.parse("probe:full:1.0:5e-3:e5").epochs == 5
    for bad in ("probe:full:0.25", "oracle:full:0.25:1e-3", "probe:half:0.25:1e-3", "probe:full:0.25:1e-3:5",
                "probe:full:0.25:1e-3:e0", "probe:full:0.25:1e-3:e2:x"):
        with pytest.raises(AblationError):
            MemberSpec.parse(bad)


def test_probe_layers_spreads_a_ranking_over_the_layers():
    """Rounds of each layer's best remaining head, in the ranking's order; a top-k of L*m holds m per layer."""
    import numpy as np

    from lcc_jax.restore.probe import spread_over_layers
    from lcc_jax.study.members import MemberSpec

    ranking = np.array([7, 6, 8, 4, 0, 5, 3, 1, 2])  # 3 layers x 3 heads; layer 2 holds the three best
    spread = spread_over_layers(ranking, 3)
    assert spread.tolist() == [7, 4, 0, 6, 5, 1, 8, 3, 2]
    assert sorted(spread.tolist()) == list(range(9))
    for m in (1, 2):
        assert np.bincount(spread[: 3 * m] // 3, minlength=3).tolist() == [m] * 3
    rng = np.random.default_rng(0)
    big = spread_over_layers(rng.permutation(28 * 12), 12)
    assert np.bincount(big[:84] // 12, minlength=28).tolist() == [3] * 28
    assert MemberSpec.parse("probe-layers:full:0.25:1e-3").ranking == "probe-layers"


def test_gradient_ranking_prefers_the_head_the_loss_depends_on():
    """A head whose o_proj rows are zero cannot move the loss: it ranks last."""
    from flax import nnx

    from lcc_jax.config import ModelConfig
    from lcc_jax.data.batching import make_batches
    from lcc_jax.models import CausalLM
    from lcc_jax.sharding import flat_params
    from lcc_jax.study.rankings import gradient_ranking

    config = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8)
    model = CausalLM(config, rngs=nnx.Rngs(0))
    o_proj = flat_params(model)["layers.attn.o_proj.kernel"]
    o_proj.set_value(o_proj[...].at[1, 2 * 8 : 3 * 8].set(0.0))  # head (1, 2) = index 6 reaches nothing
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 64, 12).tolist() for _ in range(8)]
    scores, ranking = gradient_ranking(model, make_batches(seqs, 4, pad_id=0))
    assert scores.shape == (2, 4) and sorted(ranking.tolist()) == list(range(8))
    assert ranking[-1] == 6 and scores[1, 2] == pytest.approx(0.0, abs=1e-7) and (np.delete(scores.ravel(), 6) > 0).all()


@pytest.mark.slow
def test_ablation_screens_picks_finalists_on_validation_and_resumes(tiny_model_dir, tmp_path):
    out = tmp_path / "ablation"
    members = ("probe:full:0.25:1e-3,random:full:0.25:1e-2,lofit:bias:0.25:1e-2,grad:span2:0.5:1e-2,probe:bias:0.25:1e-3,"
               "random:bias:0.25:1e-2:e2,probe-layers:full:0.25:1e-3")
    args = ["--settings", "wanda:0.5", "--members", members, "--screen-seeds", "0", "--final-seeds", "0,1",
            "--finalists", "1"]
    assert _run(tiny_model_dir, out, *args) == 0
    seed0 = out / "wanda-0.5" / "ablation" / "seed0"
    rows = {p.stem: json.loads(p.read_text()) for p in seed0.glob("*.json")}
    assert len(rows) == 7 and all(np.isfinite(r["valid_loss"]) and np.isfinite(r["ppl"]) for r in rows.values())
    for row in rows.values():  # screened-out members keep their chunks too, so any two pair up for an interval
        assert np.exp(np.mean(row["ppl_chunk_nll"])) == pytest.approx(row["ppl"], rel=1e-5)
    chosen = json.loads((out / "wanda-0.5" / "ablation" / "finalists.json").read_text())
    best = min(rows.values(), key=lambda r: r["valid_loss"])["member"]
    assert chosen["by_valid_loss"][0] == best and best in chosen["finalists"]
    assert "probe:full:0.25:1e-3" in chosen["finalists"]  # the paper's setting is always carried to the final seeds
    seed1 = out / "wanda-0.5" / "ablation" / "seed1"
    assert {json.loads(p.read_text())["member"] for p in seed1.glob("*.json")} == set(chosen["finalists"])
    finalist = json.loads((seed1 / "probe_full_0.25_1e-3.json").read_text())
    assert "rte" in finalist["zeroshot"] and finalist["sparsity_after_export"] == pytest.approx(0.5, abs=1e-6)
    assert rows["grad_span2_0.5_1e-2"]["trainable_params"] == 4 * 2  # 4 of 8 heads, 2 directions each
    assert sorted(h // 4 for h in rows["probe-layers_full_0.25_1e-3"]["heads"]) == [0, 1]  # one head per layer
    # a member with its own epochs trains in its own grid, for that many epochs (the budget here: 1)
    assert rows["random_bias_0.25_1e-2_e2"]["epochs"] == 2 and rows["random_full_0.25_1e-2"]["epochs"] == 1
    assert len(rows["random_bias_0.25_1e-2_e2"]["valid_loss_per_epoch"]) == 2
    report = (out / "ablation.md").read_text()
    assert "probe:full:0.25:1e-3" in report and "(paper)" in report
    screened = next(line for line in report.splitlines() if line.startswith("| `grad:span2:0.5:1e-2`"))
    assert "Δ ppl vs paper" in report and "[" in screened  # a screened-out member's interval against the paper
    stamp = {p: p.stat().st_mtime_ns for p in seed0.glob("*.npz")}
    assert _run(tiny_model_dir, out, *args) == 0  # resumes: nothing is trained again
    assert {p: p.stat().st_mtime_ns for p in seed0.glob("*.npz")} == stamp


@pytest.mark.slow
def test_an_ablation_goes_on_from_its_results_without_checkpoints(tiny_model_dir, tmp_path):
    """What a GPU lease ships home (benchmarks/gpu/qwen_study.sh's tar: no pruned checkpoint, captures or vectors) is
    enough for a later lease to add a member (`SEED_FROM`): the prune is redone, checked against the scores the
    cells came from, and only the new member trains."""
    import shutil

    out = tmp_path / "ablation"
    args = ["--settings", "wanda:0.5", "--screen-seeds", "0", "--final-seeds", "0", "--finalists", "1"]
    assert _run(tiny_model_dir, out, *args, "--members", "probe:full:0.25:1e-3,probe:bias:0.25:1e-3") == 0
    shipped = tmp_path / "shipped"
    shutil.copytree(out, shipped, ignore=shutil.ignore_patterns("pruned", "*_capture*", "train_checkpoints",
                                                                "restored*", "*.npz", "*.npy", "*.safetensors"))
    seed0 = shipped / "wanda-0.5" / "ablation" / "seed0"
    before = {p.name: p.read_text() for p in seed0.glob("*.json")}
    assert _run(tiny_model_dir, shipped, *args,
                "--members", "probe:full:0.25:1e-3,probe:bias:0.25:1e-3,lofit:bias:0.25:1e-2") == 0
    after = {p.name: p.read_text() for p in seed0.glob("*.json")}
    assert set(after) == set(before) | {"lofit_bias_0.25_1e-2.json"}
    assert all(after[name] == text for name, text in before.items())  # nothing trained or scored again
    assert json.loads((shipped / "wanda-0.5" / "pruned.json").read_text()) == \
        json.loads((out / "wanda-0.5" / "pruned.json").read_text())


def test_ablation_starts_from_a_recovery_base_when_given_one(tiny_model_dir, tmp_path, monkeypatch):
    """--base links the base's pruned checkpoint and scores into --out before the study runs (which then prunes
    nothing: `prune_cell` keeps an existing checkpoint)."""
    import lcc_jax.study.ablation as ablation
    import lcc_jax.study.table as table

    base = tmp_path / "base"
    (base / "wanda-0.5" / "pruned").mkdir(parents=True)
    (base / "wanda-0.5" / "pruned" / "meta.json").write_text("{}")
    (base / "wanda-0.5" / "pruned.json").write_text("{}")
    (base / "dense.json").write_text("{}")
    seen = {}

    def study(source, out, config, mesh=None):
        seen["linked"] = (out / "wanda-0.5" / "pruned" / "meta.json").stat().st_ino
        return {}

    monkeypatch.setattr(ablation, "run_ablation", study)
    monkeypatch.setattr(table, "write_ablation_report", lambda out, results: "")
    assert _run(tiny_model_dir, tmp_path / "ablation", "--settings", "wanda:0.5", "--base", str(base)) == 0
    assert seen["linked"] == (base / "wanda-0.5" / "pruned" / "meta.json").stat().st_ino
    assert _run(tiny_model_dir, tmp_path / "other", "--settings", "sparsegpt:2:4", "--base", str(base)) == 2


def test_a_grid_that_runs_out_of_memory_is_halved_and_every_member_still_trains(tmp_path, caplog):
    from lcc_jax.restore.hints import OutOfMemory
    from lcc_jax.study.ablation import AblationConfig, _Setting

    setting = _Setting("unused", "wanda:0.5", tmp_path, AblationConfig(members_per_grid=4), None)
    trained: list[list[str]] = []

    def fake_grid(names, seed, folder, epochs):  # a device that holds two restorations at once
        if len(names) > 2:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 59.00GiB")
        trained.append(list(names))

    setting._train_grid = fake_grid
    names = ["a", "b", "c", "d", "e"]
    setting._train_in_grids(names, 0, tmp_path, 3)
    assert trained == [["a", "b"], ["c", "d"], ["e"]]  # the halved size holds for the rest of the run
    assert "retrying in grids of 2" in caplog.text

    def other_error(names, seed, folder, epochs):
        raise ValueError("not a memory problem")

    setting._train_grid = other_error
    with pytest.raises(ValueError, match="not a memory problem"):
        setting._train_in_grids(names, 0, tmp_path, 3)

    def nothing_fits(names, seed, folder, epochs):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory")

    setting._train_grid = nothing_fits
    with pytest.raises(OutOfMemory, match="'a' does not fit the device even alone.*--dtype bf16"):
        setting._train_in_grids(names, 0, tmp_path, 3)


def test_a_signal_during_a_grid_stops_it_even_where_the_process_had_lost_its_handler(tmp_path):
    """Each grid installs the SIGINT handler itself (SIG_IGN stands in for a handler lost since the process began),
    so the deadline's signal stops the ablation mid-grid, as it stopped one on an H100."""
    import signal

    from lcc_jax.signals import Interrupted
    from lcc_jax.study.ablation import AblationConfig, _Setting

    setting = _Setting("unused", "wanda:0.5", tmp_path, AblationConfig(members_per_grid=2), None)
    trained: list[list[str]] = []

    def signalled_grid(names, seed, folder, epochs):
        trained.append(list(names))
        signal.raise_signal(signal.SIGINT)

    setting._train_grid = signalled_grid
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with pytest.raises(Interrupted, match="SIGINT"):
            setting._train_in_grids(["a", "b", "c"], 0, tmp_path, 3)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    assert trained == [["a", "b"]]  # the second grid never started
