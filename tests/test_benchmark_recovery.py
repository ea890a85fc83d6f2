"""scripts/benchmark_recovery.py on a tiny model: every method, sparsity audit, resume, seeds, refusal, report."""

import json
import shutil

import numpy as np
import pytest

TINY = ["--num-train", "16", "--num-probe", "16", "--num-valid", "8", "--max-length", "48", "--capture-length", "48",
        "--epochs", "1", "--batch-size", "4", "--capture-batch-size", "8", "--eval-seqlen", "64",
        "--eval-limit-chunks", "2", "--top-k", "0.25", "--nsamples", "4", "--seqlen", "64",
        "--prune-batch-size", "4", "--tasks", "rte", "--limit", "4", "--zeroshot-batch-size", "8", "--seeds", "0"]


def _run(model_dir, out, *extra):
    import sys

    sys.path.insert(0, "scripts")
    try:
        import benchmark_recovery
    finally:
        sys.path.pop(0)
    return benchmark_recovery.main([str(model_dir), "--out", str(out), *TINY, *extra])


def test_settings_parse_and_bad_ones_are_refused():
    from lcc_jax.benchmark.cells import setting_slug
    from lcc_jax.benchmark.config import RecoveryConfig, RecoveryError, parse_setting

    assert parse_setting("sparsegpt:2:4").sparsity == "2:4"
    assert parse_setting("flap:0.2").structured == 0.2 and parse_setting("flap:0.2").sparsity is None
    assert setting_slug("sparsegpt:2:4") == "sparsegpt-2of4"
    for bad in ("wanda", "wanda:", "nope:0.5", "wanda:3:2"):
        with pytest.raises(RecoveryError, match="pruning setting"):
            parse_setting(bad)
    with pytest.raises(RecoveryError, match="unknown method"):
        RecoveryConfig(methods=("qlora",))


def test_summary_gives_mean_and_std_over_seeds_and_the_table_shows_them():
    from lcc_jax.benchmark.table import markdown_table, summarize

    rows = [{"setting": "dense", "method": "dense", "seed": None, "ppl": 20.0, "params": 100,
             "zeroshot": {"rte": {"acc": 0.5}}, "mean_acc": 0.5, "mean_of": "1 tasks"}]
    for seed, ppl, acc, valid in ((0, 30.0, 0.4, 2.0), (1, 32.0, 0.6, 2.2)):
        rows.append({"setting": "wanda:0.5", "method": "restorelcc", "seed": seed, "ppl": ppl, "mean_acc": acc,
                     "valid_loss": valid,
                     "zeroshot": {"rte": {"acc": acc}}, "trainable_params": 64, "train_seconds": 2.0,
                     "tokens_seen": 1000, "sparsity_target": 0.5, "sparsity_after_export": 0.5, "params": 100})
    summary = summarize(rows)
    restored = summary[1]
    assert restored["ppl"] == 31.0 and restored["ppl_std"] == pytest.approx(np.std([30, 32], ddof=1))
    assert restored["tasks"]["rte"]["acc"] == pytest.approx(0.5) and restored["seeds"] == [0, 1]
    table = markdown_table(summary)
    assert "| wanda:0.5 | RestoreLCC | 2.1000 ± 0.1414 | 31.00 ± 1.41 | 50.00 ± 14.14 |" in table
    assert "50.0 % of 50.0 %" in table and "| dense | dense | – | 20.00 |" in table  # nothing trained: no valid loss


@pytest.mark.slow
def test_benchmark_runs_every_method_reports_sparsity_and_resumes(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "recovery"
    methods = ("lora", "masked_lora", "lofit", "restorelcc")  # DoRA and bias-only share these code paths
    assert _run(tiny_model_dir, out, "--settings", "wanda:0.5", "--methods", ",".join(methods)) == 0
    results = json.loads((out / "results.json").read_text())
    by_method = {r["method"]: r for r in results["rows"]}
    assert set(by_method) == {"dense", "pruned", *methods}
    for row in by_method.values():
        assert np.isfinite(row["ppl"]) and set(row["zeroshot"]) == {"rte"}
        assert "correct" not in row["zeroshot"]["rte"] and "ppl_chunk_nll" not in row  # kept in the cells only
    cell = json.loads((out / "wanda-0.5" / "seed0" / "lora.json").read_text())
    assert len(cell["zeroshot"]["rte"]["correct"]) == 4 and len(cell["ppl_chunk_nll"]) == 2
    assert cell["zeroshot"]["rte"]["acc"] == cell["zeroshot"]["rte"]["correct"].count("1") / 4
    lora = next(e for e in results["summary"] if e["method"] == "lora")
    assert lora["vs"]["pruned"]["mean_acc"]["resamples"] == 10_000 and lora["vs"]["restorelcc"]["ppl"] is not None
    # vectors folded into the o_proj bias and masked merges keep every pruned zero; a plain LoRA merge does not
    for method in ("pruned", "restorelcc", "lofit", "masked_lora"):
        row = by_method[method]
        assert row["sparsity_after_export"] == pytest.approx(row["sparsity_target"]), method
        assert row["revived_weights"] == 0, method
    assert by_method["lora"]["revived_weights"] > 0
    assert by_method["restorelcc"]["trainable_params"] == 2 * 2 * 16  # 2 of 8 heads, beta and b of 16 each
    assert by_method["restorelcc"]["heads"] == 2 and by_method["lofit"]["heads"] == 2
    for method in ("lora", "lofit", "restorelcc"):
        assert by_method[method]["tokens_seen"] > 0 and by_method[method]["train_seconds"] > 0
    for method in methods:  # every trained cell keeps the validation loss that may choose between them
        cell = json.loads((out / "wanda-0.5" / "seed0" / f"{method}.json").read_text())
        assert np.isfinite(cell["valid_loss"]) and cell["valid_loss"] == cell["valid_loss_per_epoch"][-1], method
        assert by_method[method]["valid_loss"] == cell["valid_loss"], method
    # RestoreLCC reuses the benchmark's dense and pruned perplexities instead of measuring them again
    job = out / "wanda-0.5" / "seed0" / "restorelcc_job"
    assert json.loads((job / "eval_pruned.json").read_text())["wikitext2_ppl"] == by_method["pruned"]["ppl"]
    # its own perplexity is measured again by the benchmark (for per-chunk NLLs): the job's figure, up to rounding
    assert by_method["restorelcc"]["ppl"] == pytest.approx(
        json.loads((job / "eval_restored.json").read_text())["wikitext2_ppl"], rel=1e-4)
    table = (out / "table.md").read_text()
    for label in ("LoRA (q,v r8)", "LoFiT", "RestoreLCC", "masked LoRA", "pruned"):
        assert label in table
    assert "RestoreLCC" in capsys.readouterr().out

    # resuming redoes nothing, not even pruning a finished setting whose checkpoint is gone (results kept
    # without the weights); another seed only adds its cells, and the table then shows mean ± std
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.json") if p.parent.name != "restorelcc_job"}
    shutil.move(out / "wanda-0.5" / "pruned", tmp_path / "pruned_aside")
    assert _run(tiny_model_dir, out, "--settings", "wanda:0.5", "--methods", ",".join(methods)) == 0
    assert not (out / "wanda-0.5" / "pruned").exists()
    shutil.move(tmp_path / "pruned_aside", out / "wanda-0.5" / "pruned")
    assert _run(tiny_model_dir, out, "--settings", "wanda:0.5", "--methods", "restorelcc", "--seeds", "0,1") == 0
    for path, stamp in stamps.items():
        if path.name not in ("results.json", "eta.json"):  # rewritten by every run: the table, its estimate
            assert path.stat().st_mtime_ns == stamp, path
    summary = json.loads((out / "results.json").read_text())["summary"]
    restored = next(e for e in summary if e["method"] == "restorelcc")
    assert restored["seeds"] == [0, 1] and restored["ppl_std"] is not None
    assert "±" in (out / "table.md").read_text()
    # eta.json keeps the first run's measured cells beside the new one's: what a later resume scales its estimate by
    per_stage = json.loads((out / "eta.json").read_text())["per_stage"]
    assert per_stage["wanda:0.5/seed0/restorelcc"]["predicted"] > 0 < per_stage["wanda:0.5/seed0/restorelcc"]["measured"]
    assert per_stage["wanda:0.5/seed1/restorelcc"]["predicted"] > 0
    # the second seed's job reused the first one's probing pairs and dense captures (they cannot differ)
    seed1 = out / "wanda-0.5" / "seed1" / "restorelcc_job"
    assert (seed1 / "pairs.jsonl").read_text() == (job / "pairs.jsonl").read_text()
    assert not {"pairs", "dense_capture"} & json.loads((seed1 / "timings.json").read_text()).keys()

    # a changed budget against the same folder is refused with a clear message
    assert _run(tiny_model_dir, out, "--settings", "wanda:0.5", "--learning-rate", "0.01") == 2
    assert "different configuration" in capsys.readouterr().err


@pytest.mark.slow
def test_structured_setting_reports_parameters_instead_of_sparsity(tiny_model_dir, tmp_path):
    out = tmp_path / "recovery"
    assert _run(tiny_model_dir, out, "--settings", "flap:0.5", "--methods", "lora,restorelcc", "--tasks", "none") == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    dense = next(r for r in rows if r["method"] == "dense")
    for row in rows:
        if row["method"] != "dense":
            assert row["params"] < dense["params"] and "sparsity_after_export" not in row, row["method"]
    assert "M params" in (out / "table.md").read_text()


@pytest.mark.slow
def test_a_new_prune_joins_the_cells_only_if_it_scores_as_the_one_they_came_from(tiny_model_dir, tmp_path, capsys,
                                                                               caplog):
    # On a GPU a SparseGPT 2:4 re-prune of Qwen scored 37.94 once and 38.67 later: cells of two prunes must not
    # share a table. Here the earlier prune is made to look different by its recorded perplexity.
    out = tmp_path / "recovery"
    args = ("--settings", "wanda:0.5", "--methods", "lora", "--tasks", "none")
    assert _run(tiny_model_dir, out, *args) == 0
    setting = out / "wanda-0.5"
    first_cell = (setting / "seed0" / "lora.json").read_text()
    shutil.rmtree(setting / "pruned")  # results kept without the weights
    scored = json.loads((setting / "pruned.json").read_text())
    (setting / "pruned.json").write_text(json.dumps({**scored, "ppl": scored["ppl"] * 1.01}))
    capsys.readouterr()
    assert _run(tiny_model_dir, out, *args, "--seeds", "0,1") == 2
    assert "gave another pruned model" in capsys.readouterr().err
    assert not (setting / "pruned").exists() and not (setting / "seed1").exists()  # nothing of the new prune kept
    assert (setting / "seed0" / "lora.json").read_text() == first_cell

    (setting / "pruned.json").write_text(json.dumps(scored))  # the prune they came from: it joins
    caplog.set_level("INFO", logger="lcc_jax.benchmark.recovery")
    assert _run(tiny_model_dir, out, *args, "--seeds", "0,1") == 0
    # the scripts' logging goes to stderr in a fresh process, to pytest's handler once another test configured it
    assert "pruned again (the checkpoint was gone)" in capsys.readouterr().err + caplog.text
    assert (setting / "seed1" / "lora.json").exists() and (setting / "seed0" / "lora.json").read_text() == first_cell


def test_lofit_reference_row_trains_three_percent_of_heads_for_five_epochs(monkeypatch):
    """LoFiT's reference setting: the share of heads of its Llama-2-7B runs (32 of 1,024) and 5 epochs; the
    budget-matched row keeps RestoreLCC's head count and epochs."""
    import types

    from lcc_jax.benchmark import methods
    from lcc_jax.benchmark.config import RecoveryConfig
    from lcc_jax.restore.config import RestoreConfig
    from lcc_jax.restore.top_k import TopK

    seen = {}

    def fake_train_lofit(model, batches, train_config, lofit_config, key, **kwargs):
        seen["epochs"], seen["heads"] = train_config.epochs, lofit_config.top_k.resolve(270)
        raise StopIteration  # the arguments are what this test is about

    monkeypatch.setattr(methods, "train_lofit", fake_train_lofit)
    restore = RestoreConfig(epochs=3, top_k=0.25)
    ctx = types.SimpleNamespace(
        checkpoint=types.SimpleNamespace(model=None, tokenizer=None, masks=None),
        data=lambda tokenizer: (None, None), restore=restore, config=RecoveryConfig(restore=restore),
        train_config=lambda lr=None: restore.train_config(lr), mesh=None)
    assert methods.LOFIT_REFERENCE_SHARE == pytest.approx(32 / 1024)
    with pytest.raises(StopIteration):
        methods.RUNNERS["lofit_reference"](ctx)
    assert seen == {"epochs": 5, "heads": 8}  # SmolLM2's 270 heads: round(8.4)
    with pytest.raises(StopIteration):
        methods.RUNNERS["lofit"](ctx)
    assert seen == {"epochs": 3, "heads": TopK.parse(0.25).resolve(270)}


@pytest.mark.slow
def test_one_process_reads_the_model_and_tokenizes_the_evaluations_once(tiny_model_dir, tmp_path, monkeypatch):
    """Every cell shares one dense model read, one tokenizer, one read of each setting's pruned checkpoint, and
    one tokenization of WikiText-2 and of the zero-shot requests; the RestoreLCC jobs load no model themselves."""
    import importlib

    loaded, perplexity, zeroshot, pipeline = (importlib.import_module(f"lcc_jax.{m}") for m in (
        "benchmark.loaded", "eval.perplexity", "eval.zeroshot", "restore.pipeline"))

    calls = {}

    def counted(module, name):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls[f"{module.__name__}.{name}"] = calls.get(f"{module.__name__}.{name}", 0) + 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    for module, name in ((loaded, "load"), (loaded, "load_pruned"), (pipeline, "load"), (pipeline, "load_pruned"),
                         (perplexity, "tokenize"), (zeroshot, "encode_requests"), (loaded, "training_data")):
        counted(module, name)
    monkeypatch.setattr(perplexity, "_wikitext_cache", [])
    monkeypatch.setattr(zeroshot, "_encoded_cache", [])
    out = tmp_path / "recovery"
    assert _run(tiny_model_dir, out, "--settings", "wanda:0.5,magnitude:0.5", "--methods", "lora,restorelcc",
                "--seeds", "0,1") == 0
    assert calls == {"lcc_jax.benchmark.loaded.load": 1, "lcc_jax.benchmark.loaded.load_pruned": 2,
                     "lcc_jax.eval.perplexity.tokenize": 1, "lcc_jax.eval.zeroshot.encode_requests": 1,
                     "lcc_jax.benchmark.loaded.training_data": 2}  # once per seed, shared by both settings
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {(r["setting"], r["method"]) for r in rows} >= {("wanda:0.5", "restorelcc"), ("magnitude:0.5", "lora")}


@pytest.mark.slow
def test_a_table_split_over_parts_from_one_base_merges_into_the_whole(tiny_model_dir, tmp_path, capsys):
    base, parts, whole = tmp_path / "base", [tmp_path / "p1", tmp_path / "p2"], tmp_path / "all"
    settings = ("wanda:0.5", "magnitude:0.5")
    both = ["--settings", ",".join(settings), "--methods", "lora"]
    assert _run(tiny_model_dir, base, *both, "--prune-only") == 0
    assert (base / "wanda-0.5" / "pruned.json").exists() and not (base / "wanda-0.5" / "seed0").exists()
    for part, setting in zip(parts, settings, strict=True):
        assert _run(tiny_model_dir, part, "--settings", setting, "--methods", "lora", "--base", str(base)) == 0
    mask = next((base / "wanda-0.5" / "pruned").rglob("*.json"))
    assert (parts[0] / mask.relative_to(base)).stat().st_ino == mask.stat().st_ino  # the base's mask, linked
    assert _run(tiny_model_dir, whole, *both, "--merge-from", ",".join(map(str, parts))) == 0
    cell = parts[1] / "magnitude-0.5" / "seed0" / "lora.json"
    assert (whole / "magnitude-0.5" / "seed0" / "lora.json").stat().st_ino == cell.stat().st_ino  # not trained again
    rows = json.loads((whole / "results.json").read_text())["rows"]
    assert {(r["setting"], r["method"]) for r in rows} >= {(s, m) for s in settings for m in ("pruned", "lora")}

    capsys.readouterr()
    conflicting = tmp_path / "p3"
    shutil.copytree(parts[0], conflicting)
    (conflicting / "wanda-0.5" / "seed0" / "lora.json").write_text("{}")
    assert _run(tiny_model_dir, tmp_path / "all2", *both, "--merge-from", f"{parts[0]},{conflicting}") == 2
    assert "differs between" in capsys.readouterr().err
    assert _run(tiny_model_dir, tmp_path / "p4", "--settings", "sparsegpt:2:4", "--base", str(base)) == 2
    assert "--prune-only" in capsys.readouterr().err


def test_a_cell_out_of_memory_names_the_cell_and_the_flags_and_keeps_the_finished_cells(
        tiny_model_dir, tmp_path, monkeypatch, capsys):
    from lcc_jax.benchmark import methods

    def exhausted(ctx):  # what XLA raises when a cell's program does not fit the card
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 59.00GiB")

    monkeypatch.setitem(methods.RUNNERS, "dora", exhausted)
    out = tmp_path / "recovery"
    assert _run(tiny_model_dir, out, "--settings", "magnitude:0.5", "--methods", "lora,dora") == 2
    err = capsys.readouterr().err
    assert "cell magnitude-0.5/seed0/dora ran out of device memory (RESOURCE_EXHAUSTED" in err
    assert "--zeroshot-batch-size 4 (now 8) changes no result" in err and "--remat" in err
    assert "looks like a bug" not in err
    assert (out / "magnitude-0.5" / "seed0" / "lora.json").exists()  # the finished cell is kept
    assert not (out / "magnitude-0.5" / "seed0" / "dora.json").exists()


def test_a_signal_stops_the_run_inside_a_cell_even_where_the_process_had_lost_its_handler(
        tiny_model_dir, tmp_path, monkeypatch):
    """On an H100 a recovery run ran on past the SIGINT meant to stop it (the ablation, whose stages install the
    handler themselves, stopped): each cell now installs it. SIG_IGN stands in for the handler lost."""
    import signal

    from lcc_jax.benchmark import methods

    def signalled(ctx):  # the deadline's SIGINT arrives while the cell trains
        signal.raise_signal(signal.SIGINT)
        raise AssertionError("the SIGINT did not stop the cell")

    monkeypatch.setitem(methods.RUNNERS, "dora", signalled)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        out = tmp_path / "recovery"
        assert _run(tiny_model_dir, out, "--settings", "magnitude:0.5", "--methods", "lora,dora") == 130
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # the process's own handling is given back
    finally:
        signal.signal(signal.SIGINT, previous)
    assert (out / "magnitude-0.5" / "seed0" / "lora.json").exists()  # the finished cell is kept
    assert not (out / "magnitude-0.5" / "seed0" / "dora.json").exists()
