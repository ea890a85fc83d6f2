"""The cost estimate before a job (lcc_jax.estimate), the CPU warning, --preset quick, and the followed plan that
gives the progress bars the whole job's time left (lcc_jax.progress.Plan). Nothing here runs a model."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from lcc_jax import estimate, progress
from lcc_jax.config import ModelConfig
from lcc_jax.data.calibration import CalibrationConfig
from lcc_jax.data.instructions import InstructionSample
from lcc_jax.pruning.api import PruneConfig
from lcc_jax.restore.config import PRESET_EXTRAS, PRESETS, RestoreConfig, preset

ROOT = Path(__file__).resolve().parents[1]
# SmolLM2-135M's shapes, and the fp32 matmul rate Machine.measure gave on the README's 2-core CPU
SMOLLM2 = ModelConfig(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                      num_heads=9, num_kv_heads=3, head_dim=64, tie_word_embeddings=True)
CPU = estimate.Machine("cpu", 1, 2, 70e9)
QUICK_CALIBRATION = CalibrationConfig(nsamples=PRESET_EXTRAS["quick"]["nsamples"],
                                      seqlen=PRESET_EXTRAS["quick"]["seqlen"])


def _samples(n: int, prompt: int = 120, response: int = 600) -> list[InstructionSample]:
    return [InstructionSample("p" * prompt, "r" * response) for _ in range(n)]


def _restore(config: RestoreConfig, calibration=None, machine=CPU, **kwargs) -> estimate.Estimate:
    return estimate.restore_estimate(SMOLLM2, config, PruneConfig(), calibration or CalibrationConfig(), machine,
                                     samples=_samples(config.num_train), minilm=False, **kwargs)


def _stage(est: estimate.Estimate, name: str) -> estimate.StageEstimate:
    return next(s for s in est.stages if s.name == name)


def test_estimate_lists_every_stage_of_the_job_in_order():
    names = [s.name for s in _restore(RestoreConfig()).stages]
    assert names == ["load", "pairs", "eval_dense", "dense_capture", "prune", "pruned_capture", "components",
                     "probes", "eval_pruned", "train", "fold", "export", "eval_restored", "plots"]


def test_estimate_grows_with_the_tokens_each_stage_runs():
    small = _restore(RestoreConfig(num_train=100, num_probe=50, eval_limit_chunks=10, valid_data="none"))
    big = _restore(RestoreConfig(num_train=200, num_probe=100, eval_limit_chunks=20, valid_data="none"))
    for name, low, high in [("train", 1.7, 2.3), ("dense_capture", 1.6, 2.3), ("eval_dense", 1.7, 2.1)]:
        ratio = _stage(big, name).seconds / _stage(small, name).seconds
        assert low < ratio < high, (name, ratio)
        assert _stage(big, name).tokens > 1.6 * _stage(small, name).tokens  # padded to length buckets
    longer = _restore(RestoreConfig(num_train=100, num_probe=50, epochs=6, valid_data="none"))
    assert 1.8 < _stage(longer, "train").seconds / _stage(small, "train").seconds < 2.1
    more_calibration = _restore(RestoreConfig(num_train=100, num_probe=50, valid_data="none"),
                                CalibrationConfig(nsamples=256))
    assert _stage(more_calibration, "prune").seconds > 1.8 * _stage(small, "prune").seconds


def test_a_faster_machine_and_finished_stages_shorten_the_estimate():
    slow, fast = _restore(RestoreConfig()), _restore(RestoreConfig(), machine=dataclasses.replace(CPU, flops=140e9))
    assert fast.seconds < 0.6 * slow.seconds
    resumed = _restore(RestoreConfig(), done=["pairs", "dense_capture", "train"])
    assert _stage(resumed, "train").seconds == 0 and resumed.seconds < 0.5 * slow.seconds


def test_the_paper_setting_warns_on_a_cpu_naming_the_quick_flags_and_quick_does_not(caplog):
    paper = _restore(RestoreConfig())
    quick = _restore(preset("quick"), QUICK_CALIBRATION)
    assert paper.seconds > estimate.CPU_WARN_SECONDS and quick.seconds < 600 < paper.seconds
    hint = estimate.quick_flags([f.name for f in dataclasses.fields(RestoreConfig)] + ["nsamples", "seqlen"])
    with caplog.at_level(logging.WARNING, logger="lcc_jax"):
        assert paper.warn_if_long(hint)
        assert not quick.warn_if_long(hint)
        assert not dataclasses.replace(paper, machine=dataclasses.replace(CPU, backend="gpu")).warn_if_long(hint)
    assert len(caplog.records) == 1
    text = caplog.records[0].getMessage()
    assert "this CPU" in text and "--preset quick" in text and "train" in text
    for flag in ("--num-train 48", "--num-probe 32", "--eval-limit-chunks 8", "--remat ", "--nsamples 8", "--seqlen 512"):
        assert flag in text, flag
    assert "--seeds" not in text and "--limit 50" not in text  # the benchmark's flags are not restore.py's


def test_quick_preset_parses_in_restore_and_benchmark_and_explicit_flags_win():
    from lcc_jax.cli import dataclass_from_flags

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import benchmark_recovery
        import restore
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    args = restore.parse_args(["--preset", "quick"])
    assert dataclass_from_flags(RestoreConfig, args) == preset("quick") == RestoreConfig(**PRESETS["quick"])
    assert (args.nsamples, args.seqlen) == (8, 512) and not hasattr(args, "limit")
    assert dataclass_from_flags(RestoreConfig, restore.parse_args(["--preset", "quick", "--epochs", "3"])).epochs == 3
    named = estimate.quick_flags([f.name for f in dataclasses.fields(RestoreConfig)] + ["nsamples", "seqlen"])
    spelled = restore.parse_args(named.removeprefix("--preset quick (").removesuffix(")").split())  # the warning's flags
    assert dataclass_from_flags(RestoreConfig, spelled) == preset("quick") and spelled.nsamples == 8
    bench = benchmark_recovery.parse_args(["--preset", "quick", "--seeds", "0,1"])
    assert (bench.limit, bench.seeds, bench.settings, bench.num_train) == (50, "0,1", "wanda:0.5", 48)


def test_quick_preset_keeps_every_stage_of_the_job():
    quick = _restore(preset("quick"), QUICK_CALIBRATION)
    assert all(s.seconds > 0 for s in quick.stages)
    assert preset("quick").num_probe <= preset("quick").num_train and preset("quick").valid_data == "alpaca"


def test_follow_restore_job_gives_up_quietly_on_a_source_it_cannot_read(tmp_path, caplog):
    job = SimpleNamespace(model=str(tmp_path / "missing"), mesh=None, restore=RestoreConfig(), out=tmp_path / "out")
    with caplog.at_level(logging.INFO, logger="lcc_jax"):
        assert estimate.follow_restore_job(job) is None
    assert "no estimate" in caplog.text and progress.following() is None


def test_machine_measure_reports_the_backend_and_a_rate():
    machine = estimate.Machine.measure(seconds=0.05)
    assert machine.backend == "cpu" and machine.flops > 1e8 and machine.cores >= 1
    assert "CPU cores" in machine.describe() and "(fp32)" in machine.describe()


def test_a_bf16_job_is_timed_against_a_bf16_matmul():
    fp32, bf16 = (estimate.Machine.measure(seconds=0.05, dtype=d) for d in ("fp32", "bf16"))
    assert bf16.dtype == "bf16" and bf16.flops > 0 and "(bf16)" in bf16.describe()
    assert bf16.flops != fp32.flops  # timed apart, not one cached rate
    with pytest.raises(ValueError, match="fp32, bf16"):
        estimate.Machine.measure(seconds=0.05, dtype="fp16")


def test_durations_read_like_a_clock():
    assert [progress.duration(s) for s in (3.2, 245, 7800)] == ["3 s", "4m05s", "2h10m"]


# ------------------------------------------------------------------------------------------ the followed plan


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_plan_counts_unannounced_stages_as_gaps_and_reports_estimated_against_measured():
    clock = Clock()
    plan = progress.Plan([("fold", 10.0), ("export", 5.0), ("eval", 20.0), ("plots", 3.0)], clock=clock)
    plan.begin("fold")
    clock.now = 8.0
    plan.end("fold")
    clock.now = 14.0  # the export ran between the two stages, announced by neither
    plan.begin("eval")
    clock.now = 30.0
    plan.end("eval")
    clock.now = 32.0
    report = plan.finish()
    assert report == {"fold": {"predicted": 10.0, "measured": 8.0}, "export": {"predicted": 5.0, "measured": 6.0},
                      "eval": {"predicted": 20.0, "measured": 16.0}, "plots": {"predicted": 3.0, "measured": 2.0}}


def test_plan_corrects_later_stages_by_the_measured_pace_and_a_bar_by_its_rate():
    clock = Clock()
    plan = progress.Plan([("a", 20.0), ("b", 40.0), ("c", 100.0)], clock=clock)
    plan.begin("a")
    clock.now = 40.0  # twice as slow as estimated
    plan.end("a")
    assert plan.correction() == 2.0 and plan.left() == pytest.approx(2 * 140)
    plan.begin("b")
    plan.bar_opened(0, 10)
    clock.now = 50.0
    note = plan.bar_moved(2, 10, "step")  # 5 s a step: 40 s more in this stage, whatever its estimate said
    assert plan.stage_left() == pytest.approx(40.0) and plan.left() == pytest.approx(40 + 2 * 100)
    assert note == "job 4m00s left"


def test_bars_report_to_the_followed_plan_and_a_script_ends_it(tmp_path):
    plan = progress.follow([("capture", 30.0), ("train", 60.0)], bars={"capture": 3})
    try:
        assert progress.stage_begins("capture").startswith(" (estimated 30 s; job about 1m")
        assert progress.stage_begins("not in the plan") == ""
        for _ in range(3):  # three bars in turn, as the dense capture shows them
            with progress.bar(total=4, desc="capture", disable=True) as b:
                b.update(2)
                b.update(2)
        assert plan._bar_index == 2
        assert "estimated 30 s" in progress.stage_ends("capture")
    finally:
        report = progress.stop_following()
    assert report["capture"]["predicted"] == 30.0 and progress.following() is None
    assert progress.stop_following() == {}


def test_report_writes_the_estimate_against_the_measured_time(tmp_path):
    est = _restore(preset("quick"), QUICK_CALIBRATION)
    progress.follow(est.stages_seconds())
    progress.stage_begins("load")
    progress.stage_ends("load")
    result = estimate.report(est, tmp_path)  # what no stage announced is the later stages' (export, plots)
    written = json.loads((tmp_path / "eta.json").read_text())
    assert written == json.loads(json.dumps(result)) and list(written["per_stage"]) == [s.name for s in est.stages]
    assert written["seconds"] == pytest.approx(est.seconds, abs=0.1) and written["measured_seconds"] >= 0
    assert progress.following() is None


# ----------------------------------------------------------------------- learning from an earlier process's eta.json

GPU = estimate.Machine("gpu", 1, 16, 261.6e12)


def _cells(machine=GPU, done=()) -> estimate.Estimate:
    names = [f"sparsegpt:2:4/seed{seed}/{method}" for seed in (0, 1, 2) for method in ("masked_lora", "lora")]
    stages = [estimate.StageEstimate("dense", 0.0 if "dense" in done else 88.0)]
    stages += [estimate.StageEstimate(n, 0.0 if n in done else (421.0 if "masked" in n else 390.0)) for n in names]
    return estimate.Estimate("recovery benchmark", machine, tuple(stages))


def _write_eta(folder: Path, per_stage: dict, machine=GPU) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "eta.json").write_text(json.dumps({"machine": dataclasses.asdict(machine), "per_stage": per_stage}))


def test_a_resumed_job_scales_its_stages_by_what_an_earlier_process_measured(tmp_path, caplog):
    # The H200's Qwen SparseGPT run, seed 0 done in one process (masked LoRA 421 s estimated, 117 s measured):
    # the next process estimated seeds 1-2 at 394 s each again, and measured 90 and 55 s.
    _write_eta(tmp_path, {"dense": {"predicted": 88.0, "measured": 29.0},
                          "sparsegpt:2:4/seed0/masked_lora": {"predicted": 421.0, "measured": 117.0},
                          "sparsegpt:2:4/seed0/lora": {"predicted": 390.0, "measured": 19.5},  # 0.05
                          "wanda:0.5 prune": {"predicted": 2.0, "measured": 30.0}})  # too small to say anything
    raw = _cells(done={"dense", "sparsegpt:2:4/seed0/masked_lora", "sparsegpt:2:4/seed0/lora"})
    with caplog.at_level(logging.INFO, logger="lcc_jax.estimate"):
        scaled = estimate.calibrated(raw, tmp_path)
    seconds = dict(scaled.stages_seconds())
    assert seconds["sparsegpt:2:4/seed1/masked_lora"] == pytest.approx(117.0)  # its own kind's ratio
    assert seconds["sparsegpt:2:4/seed2/lora"] == pytest.approx(39.0)  # 19.5/390 = 0.05, held at 0.1
    assert seconds["sparsegpt:2:4/seed0/masked_lora"] == 0.0  # done stays done
    assert "earlier run of this job" in caplog.text and "masked_lora x0.28" in caplog.text


def test_a_kind_never_measured_takes_the_median_of_the_others(tmp_path):
    _write_eta(tmp_path, {"dense": {"predicted": 100.0, "measured": 50.0},
                          "sparsegpt:2:4/seed0/masked_lora": {"predicted": 400.0, "measured": 240.0}})
    seconds = dict(estimate.calibrated(_cells(), tmp_path).stages_seconds())
    assert seconds["sparsegpt:2:4/seed1/lora"] == pytest.approx(390.0 * 0.55)  # median of 0.5 and 0.6
    assert seconds["dense"] == pytest.approx(44.0)


def test_a_stopped_job_keeps_the_cells_that_ended_and_the_next_process_calibrates_from_them(tmp_path):
    # The H100's Qwen Wanda run (2026-12-07): the phase's SIGINT stopped the recovery benchmark after two cells of
    # seed 1, and their measurements were lost (eta.json was written only by a run that finished).
    est = _cells()
    progress.follow(est.stages_seconds())
    with pytest.raises(KeyboardInterrupt), estimate.reported_if_stopped(est, tmp_path):
        for name, seconds in (("dense", 29.0), ("sparsegpt:2:4/seed0/masked_lora", 117.0)):
            progress.stage_begins(name)
            progress.stage_ends(name, seconds)
        progress.stage_begins("sparsegpt:2:4/seed0/lora")
        raise KeyboardInterrupt  # what lcc_jax.signals raises on SIGINT
    written = json.loads((tmp_path / "eta.json").read_text())
    assert written["stopped"] is True and written["error"] is None and progress.following() is None
    assert written["per_stage"] == {"dense": {"predicted": 88.0, "measured": 29.0},  # not the cell it stopped in,
                                    "sparsegpt:2:4/seed0/masked_lora": {"predicted": 421.0, "measured": 117.0}}
    resumed = estimate.calibrated(_cells(done={"dense", "sparsegpt:2:4/seed0/masked_lora"}), tmp_path)
    assert dict(resumed.stages_seconds())["sparsegpt:2:4/seed1/masked_lora"] == pytest.approx(117.0)


def test_a_job_that_ends_normally_is_reported_once_by_the_script_not_by_the_guard(tmp_path):
    est = _cells()
    progress.follow(est.stages_seconds())
    with estimate.reported_if_stopped(est, tmp_path):
        progress.stage_begins("dense")
        progress.stage_ends("dense", 29.0)
    assert progress.following() is not None and not (tmp_path / "eta.json").exists()
    assert estimate.report(est, tmp_path)["error"] is not None


@pytest.mark.parametrize("case", ["no file", "unreadable", "other backend", "other device count", "other dtype",
                                  "nothing measured"])
def test_an_estimate_is_left_alone_without_a_comparable_earlier_measurement(tmp_path, case):
    measured = {"sparsegpt:2:4/seed0/masked_lora": {"predicted": 421.0, "measured": 117.0}}
    if case == "unreadable":
        (tmp_path / "eta.json").write_text("{not json")
    elif case == "other backend":
        _write_eta(tmp_path, measured, machine=CPU)
    elif case == "other device count":
        _write_eta(tmp_path, measured, machine=dataclasses.replace(GPU, devices=8))
    elif case == "other dtype":  # a bf16 job's rate is the bf16 matmul's: an fp32 run's ratios do not carry over
        _write_eta(tmp_path, measured, machine=dataclasses.replace(GPU, dtype="bf16"))
    elif case == "nothing measured":
        _write_eta(tmp_path, {"dense": {"predicted": 0.0, "measured": 0.0}})
    raw = _cells()
    assert estimate.calibrated(raw, tmp_path) == raw


def test_report_keeps_the_earlier_measurements_of_stages_this_process_found_done(tmp_path):
    _write_eta(tmp_path, {"dense": {"predicted": 88.0, "measured": 29.0},
                          "sparsegpt:2:4/seed0/masked_lora": {"predicted": 421.0, "measured": 117.0}})
    est = _cells(done={"dense", "sparsegpt:2:4/seed0/masked_lora"})
    progress.follow(est.stages_seconds())
    for name in ("dense", "sparsegpt:2:4/seed0/masked_lora", "sparsegpt:2:4/seed0/lora"):
        progress.stage_begins(name)
        progress.stage_ends(name)
    estimate.report(est, tmp_path)
    per_stage = json.loads((tmp_path / "eta.json").read_text())["per_stage"]
    assert per_stage["dense"] == {"predicted": 88.0, "measured": 29.0}
    assert per_stage["sparsegpt:2:4/seed0/masked_lora"] == {"predicted": 421.0, "measured": 117.0}
    assert per_stage["sparsegpt:2:4/seed0/lora"]["predicted"] == 390.0  # this process's own
