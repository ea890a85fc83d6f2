"""The mistakes a newcomer makes, met at the command line: one `error: ...` line on stderr that names the problem
and the fix, exit code 2, no traceback (unless --debug); a fault in lcc_jax keeps its traceback and exit code 1.

Every script runs in-process through its main(argv). The library's own messages are pinned where the library is
tested (not repeated here): test_load_errors.py (missing path, folder without config.json, unsupported
architecture, corrupt files), test_hardening.py (--top-k beyond the heads, atomic writes), test_text.py and
test_instructions.py (missing data files), test_prune_masks.py (sparsity specs).
"""

from __future__ import annotations

import errno
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from lcc_jax import cli
from lcc_jax.errors import DiskFull
from lcc_jax.restore import job_folder

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
NAMES = sorted(p.stem for p in SCRIPTS.glob("*.py"))
_loaded: dict[str, object] = {}


def _script(name: str):
    if name not in _loaded:
        spec = importlib.util.spec_from_file_location(f"{name}_script", SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _loaded[name] = module
    return _loaded[name]


@pytest.fixture(autouse=True)
def _log_to_this_tests_stderr():
    """`setup_logging` binds its handler to the sys.stderr of its first call; here each test gets its own."""
    import logging

    logger = logging.getLogger("lcc_jax")
    ours = [h for h in logger.handlers if getattr(h, "_lcc_jax", False)]
    for handler in ours:
        logger.removeHandler(handler)
    yield
    for handler in [h for h in logger.handlers if getattr(h, "_lcc_jax", False)]:
        logger.removeHandler(handler)
    for handler in ours:
        logger.addHandler(handler)


def refused(capsys, name: str, *argv) -> str:
    """The error line of `scripts/<name>.py argv`, which must exit with 2, print exactly one `error:` line
    (the last thing on stderr) and no traceback."""
    capsys.readouterr()
    code = _script(name).main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    assert "Traceback" not in err, err
    return lines[0]


def _model_folder(folder: Path, **config) -> Path:
    from test_load_errors import CONFIG, write_folder

    return write_folder(folder, config={**CONFIG, **config})


# ----------------------------------------------------------------------------- the model argument


def test_a_model_path_that_does_not_exist_says_what_a_model_can_be_and_writes_nothing(capsys, tmp_path):
    line = refused(capsys, "restore", tmp_path / "typo", "--out", tmp_path / "out")
    assert f"error: '{tmp_path / 'typo'}' is not an existing file or folder" in line
    assert "a built-in model (smollm2-135m" in line and "Hugging Face Hub id" in line
    assert not (tmp_path / "out").exists()  # fixing the typo must not meet a claimed --out


def test_a_folder_that_is_not_a_model_says_what_a_model_folder_holds(capsys, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a model")
    line = refused(capsys, "evaluate", tmp_path / "notes")
    assert "has no config.json" in line and "config.json and model.safetensors" in line
    weights = _model_folder(tmp_path / "m") / "model.safetensors"
    line = refused(capsys, "prune_table", weights, "--out", tmp_path / "table")
    assert "is a weights file; pass the folder that holds it and its config.json" in line
    assert not (tmp_path / "table").exists()


def test_a_pruned_folder_that_is_no_model_is_refused_before_out_is_claimed(capsys, tmp_path):
    model = _model_folder(tmp_path / "m")
    (tmp_path / "empty").mkdir()
    line = refused(capsys, "restore", model, "--pruned", tmp_path / "empty", "--out", tmp_path / "out")
    assert f"--pruned {tmp_path / 'empty'} is neither a folder written by scripts/prune.py (with meta.json)" in line
    assert "has no config.json" in line
    assert not (tmp_path / "out").exists()


def test_an_unsupported_architecture_names_the_supported_ones(capsys, tmp_path):
    line = refused(capsys, "convert", _model_folder(tmp_path / "m", model_type="gpt2"), tmp_path / "out")
    assert "'gpt2' is not supported" in line and "llama, mistral, qwen2, qwen3" in line
    assert not (tmp_path / "out").exists()


def test_a_gguf_quant_type_we_cannot_dequantize_is_named_from_the_header(capsys, tmp_path, monkeypatch):
    import gguf

    from lcc_jax.convert import gguf_source

    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((8, 64 // block * size), np.uint8),
                      raw_dtype=gguf.GGMLQuantizationType.Q8_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    def no_reads(*args, **kwargs):
        raise AssertionError("a tensor was read")

    monkeypatch.setattr(gguf_source.GGUFSource, "get", no_reads)  # refused from the header alone
    line = refused(capsys, "convert", path, tmp_path / "out")
    assert "1 tensor(s) of type Q8_1 (e.g. 'blk.0.attn_q.weight'), which lcc_jax cannot dequantize" in line
    assert "Q4_K" in line and "Q8_0" in line and "Hugging Face folder" in line


# ----------------------------------------------------------------------------- the data folder


@pytest.mark.parametrize(
    "script, folder, expected, says",
    [
        ("evaluate", "empty", "wikitext-2-raw/wiki.test.raw", "is an empty folder"),
        ("prune", "missing", "alpaca_2000/train.jsonl", "does not exist"),
        ("restore", "one level too deep", "alpaca_2000/train.jsonl", "has no alpaca_2000/train.jsonl"),
    ],
)
def test_a_wrong_data_folder_names_the_missing_file_and_where_the_layout_is(
        capsys, tmp_path, monkeypatch, tiny_model_dir, script, folder, expected, says):
    from lcc_jax.data.text import data_dir

    root = {"empty": tmp_path / "data", "missing": tmp_path / "nowhere",
            "one level too deep": data_dir() / "alpaca_2000"}[folder]
    if folder == "empty":
        root.mkdir()
    monkeypatch.setenv("LCC_DATA_DIR", str(root))
    monkeypatch.setitem(sys.modules, "datasets", None)  # no hub fallback, as offline without `datasets`
    argv = {"evaluate": ["--seqlen", "32", "--limit-chunks", "1"],
            "prune": ["--method", "wanda", "--nsamples", "2", "--seqlen", "32", "--out", tmp_path / "pruned"],
            "restore": ["--out", tmp_path / "restored"]}[script]
    line = refused(capsys, script, tiny_model_dir, *argv)
    assert str(root / expected) in line, line  # the file it looked for
    assert f"$LCC_DATA_DIR={root} {says}" in line, line
    assert "README 'Offline use'" in line and "shared/data/README.md" in line, line
    assert not (tmp_path / "pruned").exists()


# ----------------------------------------------------------------------------- flags


@pytest.mark.parametrize("top_k, says", [("0", "must be a positive count of heads (e.g. 68) or a fraction in (0, 1] "
                                                "(0.25, 25%; 1.0 = every head), not 0."),
                                         ("1.5", "must be in (0, 1] (1.0 = every head), not 1.5")])
@pytest.mark.parametrize("script", ["restore", "benchmark_recovery", "ablate"])
def test_top_k_zero_or_a_fraction_above_one_is_refused_before_loading(capsys, tmp_path, script, top_k, says):
    line = refused(capsys, script, tmp_path / "not-loaded", "--top-k", top_k, "--out", tmp_path / "out")
    assert says in line and "--top-k" in line
    assert not (tmp_path / "out").exists()


def test_top_k_beyond_the_heads_names_the_heads_the_model_has(capsys, tmp_path, tiny_model_dir):
    line = refused(capsys, "restore", tiny_model_dir, "--top-k", "9", "--out", tmp_path / "out")
    assert "--top-k 9 asks for more heads than" in line and "2 layers x 4 heads = 8" in line
    assert "Pass a count up to 8, or a fraction such as 0.25" in line


@pytest.mark.parametrize("script", ["restore", "prune"])
def test_a_sparsity_outside_zero_to_one_is_refused_with_how_to_write_it(capsys, tmp_path, script):
    line = refused(capsys, script, tmp_path / "not-loaded", "--sparsity", "1.5", "--out", tmp_path / "out")
    assert line == ("error: sparsity '1.5' is not a ratio in [0, 1); write a percentage as '1.5%' or a fraction "
                    "as '0.015'.")
    assert not (tmp_path / "out").exists()


def test_a_bad_setting_is_refused_before_the_dense_model_is_evaluated(capsys, tmp_path):
    line = refused(capsys, "prune_table", tmp_path / "not-loaded", "--settings", "wanda:0.5,nope:0.5",
                   "--out", tmp_path / "t")
    assert "unknown pruning method 'nope'; choose from magnitude, wanda" in line


def test_a_bad_flag_value_is_one_line_too(capsys):
    with pytest.raises(SystemExit) as stop:
        _script("evaluate").main(["--dtype", "fp64"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == ("error: argument --dtype: invalid choice: 'fp64' (choose from 'fp32', 'bf16') "
                                       f"(see {cli.ArgumentParser().prog} --help)\n")


# ----------------------------------------------------------------------------- a full disk


def _full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("writer", ["save_file", "save_folder", "write_text"])
def test_a_full_disk_while_saving_a_stage_removes_the_temporary_and_keeps_finished_files(tmp_path, writer):
    (tmp_path / "finished.json").write_text("kept")
    target = tmp_path / "result"
    (target.mkdir() if writer == "save_folder" else target.write_text("the previous result"))

    def half_then_full(tmp):
        path = Path(tmp)
        if writer == "save_folder":
            path.mkdir()
            path = path / "a.npy"
        with open(path, "w") as f:
            f.write("half")
        _full()

    real_write_text = Path.write_text

    def write_text_half(self, text):
        if not self.name.startswith("."):  # only the temporary runs out of room
            return real_write_text(self, text)
        half_then_full(self)

    with pytest.raises(DiskFull) as caught, pytest.MonkeyPatch.context() as patch:
        if writer == "write_text":
            patch.setattr(Path, "write_text", write_text_half)
            job_folder.write_text(target, "new")
        else:
            getattr(job_folder, writer)(target, half_then_full)
    message = str(caught.value)
    assert message.startswith(f"the disk is full: writing {target} failed (No space left on device, ")
    assert "GB free" in message and f"Free space on the disk that holds {tmp_path}" in message
    assert isinstance(caught.value.__cause__, OSError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["finished.json", "result"]  # no temporary left
    assert (tmp_path / "finished.json").read_text() == "kept"
    assert list(target.iterdir()) == [] if writer == "save_folder" else target.read_text() == "the previous result"


def test_a_full_disk_while_exporting_leaves_the_old_export_and_says_where(capsys, tmp_path, monkeypatch):
    from lcc_jax.convert import export

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("the previous export")

    def half_then_full(folder, *args, **kwargs):
        (folder / "model.safetensors").write_bytes(b"half")
        _full()

    monkeypatch.setattr(export, "write_safetensors", half_then_full)
    line = refused(capsys, "convert", _model_folder(tmp_path / "m"), out, "--overwrite")
    assert line.startswith(f"error: the disk is full: writing {out} failed (No space left on device")
    assert "nothing half-written was left behind" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "out"]  # no staging folder left
    assert [p.name for p in out.iterdir()] == ["old.txt"]


def test_a_full_disk_anywhere_else_is_still_one_line_naming_the_file(capsys):
    def main(argv):
        raise OSError(errno.ENOSPC, "No space left on device", "/ckpt/step_200/params")

    assert cli.run_main(main, []) == 2
    assert capsys.readouterr().err == ("error: the disk is full (No space left on device writing /ckpt/step_200/params)"
                                       "; free space there, or write to another disk, and run again\n")


# ----------------------------------------------------------------------------- faults, --debug, signals


def test_an_unexpected_exception_keeps_its_traceback_and_exit_code_1(capsys, tmp_path, monkeypatch):
    from lcc_jax.convert import reformat

    def bug(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(reformat, "convert", bug)
    assert _script("convert").main([str(tmp_path / "m"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ZeroDivisionError: division by zero" in err
    assert err.splitlines()[-1].startswith("error: unexpected ZeroDivisionError; this looks like a bug in lcc_jax")


def test_debug_shows_the_traceback_of_a_user_error(tmp_path):
    from lcc_jax.pruning.patterns import SparsityError

    with pytest.raises(SparsityError, match=r"'1\.5' is not a ratio"):
        _script("restore").main([str(tmp_path / "m"), "--sparsity", "1.5", "--debug"])


def test_a_multi_line_message_becomes_one_line():
    from lcc_jax.convert.assign import CheckpointError

    error = CheckpointError("m/", ["missing tensor 'a'", "unexpected tensor 'b'"])
    assert cli.user_message(error) == "m/: 2 problem(s) with the checkpoint: missing tensor 'a'; unexpected tensor 'b'"
    assert cli.user_message(ValueError("a bug")) is None and cli.user_message(KeyError("x")) is None


def test_a_cudnn_program_that_fails_after_its_cache_read_back_names_the_fix(capsys):
    import jax

    seen = ("INTERNAL: detail::cuda_graph_end_capture(fake_stream, &graph_obj) failed with capturing stream has "
            "unjoined work\nin external/xla+/xla/stream_executor/cuda/cuda_dnn.cc(6814): 'graph.deserialize(...)'")

    def warm_job(argv):
        raise jax.errors.JaxRuntimeError(seen)  # the 2026-12-08 H100 failure's text

    assert cli.run_main(warm_job, []) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: a cuDNN program read back from the compile cache") and "--no-compile-cache" in err
    assert "Traceback" not in err
    assert cli.user_message(jax.errors.JaxRuntimeError("INTERNAL: some other XLA failure")) is None  # still a fault


def test_a_signal_returns_the_shells_exit_code(capsys):
    import signal

    from lcc_jax.signals import Interrupted

    def stopped(argv):
        raise Interrupted(signal.SIGTERM)

    def ctrl_c(argv):
        raise KeyboardInterrupt

    assert cli.run_main(stopped, []) == 143 and cli.run_main(ctrl_c, []) == 130
    assert "Traceback" not in capsys.readouterr().err


# ----------------------------------------------------------------------------- --help


@pytest.mark.parametrize("name", NAMES)
def test_help_ends_with_examples_of_common_jobs_and_offers_debug(capsys, name):
    with pytest.raises(SystemExit) as stop:
        _script(name).main(["--help"])
    assert stop.value.code == 0
    help_text = capsys.readouterr().out
    assert "--debug" in help_text
    lines = help_text.rstrip().splitlines()
    start = max(i for i, line in enumerate(lines) if line.strip().lower() == "examples:")
    tail = [line.strip() for line in lines[start + 1:] if line.strip()]
    commands = [line for line in tail if line.startswith(f"python scripts/{name}.py")]
    assert len(commands) >= 2, tail
    continued = [prev.split("#")[0].rstrip().endswith("\\") for prev in tail]
    for line, after_backslash in zip(tail[1:], continued):  # nothing but commands, their comments, continuations
        assert line.startswith(("python scripts/", "#")) or after_backslash, line
    assert tail[0].startswith(("python scripts/", "#")), tail[0]
