"""Text sources: local files, the LCC_DATA_DIR layout, the hub fallback, and clear errors."""

from __future__ import annotations

import gzip
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from lcc_jax.data import SOURCES, TextSourceError, data_dir, load_rows, load_text

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def write_jsonl(path: Path, rows: list[str], opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({"text": row}) + "\n")
    return path


@pytest.fixture
def data_root(tmp_path, monkeypatch) -> Path:
    """A temporary LCC_DATA_DIR laid out like shared/data."""
    root = tmp_path / "data"
    (root / "wikitext-2-raw").mkdir(parents=True)
    (root / "wikitext-2-raw" / "wiki.test.raw").write_bytes(b" = Title = \r\n Body one . \r\n Body two . \r\n")
    (root / "wikitext-2-raw" / "wiki.valid.raw").write_text(" valid row \n")
    (root / "wikitext-2-raw" / "wiki.train.raw").write_text(" train a \n train b \n")
    monkeypatch.setenv("LCC_DATA_DIR", str(root))
    return root


def test_raw_file_rows_are_lines_joined_like_the_papers(tmp_path):
    path = tmp_path / "text.raw"
    path.write_bytes(b" a \r\n\r\n b \n c")
    assert load_rows(path)[0] == [" a \n", "", " b \n", " c"]
    assert load_text(path) == " a \n\n\n\n\n b \n\n\n c"
    assert load_text(path, join="") == " a \n b \n c"  # CRLF read as LF, blank lines are empty rows


def test_jsonl_rows_with_empty_rows_reproduce_the_hub_join_exactly(tmp_path):
    rows = ["", " = T = \n", "", " body \n"]
    path = write_jsonl(tmp_path / "wiki.jsonl", rows)
    assert load_text(str(path)) == "\n\n".join(rows)
    gz = write_jsonl(tmp_path / "wiki.jsonl.gz", rows, opener=gzip.open)
    assert load_text(gz) == "\n\n".join(rows)


def test_wikitext2_is_read_from_the_data_dir_layout(data_root):
    assert data_dir() == data_root
    assert load_text("wikitext2") == " = Title = \n\n\n Body one . \n\n\n Body two . \n"
    assert load_text("WikiText-2") == load_text("wikitext2")  # alias, any case
    assert load_text("wikitext2", split="validation") == " valid row \n"
    assert load_text("wikitext2", split="train") == " train a \n  train b \n"  # Wanda joins train with " "


def test_c4_keeps_the_first_1100_documents_joined_by_a_space(data_root):
    (data_root / "c4").mkdir()
    write_jsonl(data_root / "c4" / "validation.jsonl", [f"doc{i}" for i in range(1105)])
    text = load_text("c4", split="validation")
    assert text.split(" ") == [f"doc{i}" for i in range(1100)]
    assert load_text("c4") == text  # "test" is the papers' evaluation split: validation


def test_missing_empty_and_unknown_sources_raise_clear_errors(tmp_path, data_root):
    with pytest.raises(TextSourceError, match="does not exist"):
        load_text(tmp_path / "nope.txt")
    (tmp_path / "empty.raw").write_text("")
    with pytest.raises(TextSourceError, match="holds no text"):
        load_text(tmp_path / "empty.raw")
    (tmp_path / "blank.raw").write_text("\n  \n")
    with pytest.raises(TextSourceError, match="holds no text"):
        load_text(tmp_path / "blank.raw")
    write_jsonl(tmp_path / "empty.jsonl", ["", ""])
    with pytest.raises(TextSourceError, match="holds no text"):
        load_text(tmp_path / "empty.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(TextSourceError, match=r"bad.jsonl:2 has no string 'text'"):
        load_text(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(TextSourceError, match="not valid JSON"):
        load_text(tmp_path / "broken.jsonl")
    with pytest.raises(TextSourceError, match="unknown text source 'wikitext3'.*wikitext2"):
        load_text("wikitext3")
    with pytest.raises(TextSourceError, match="split must be one of"):
        load_text("wikitext2", split="dev")
    with pytest.raises(TextSourceError, match="is not a file"):
        load_text(tmp_path)


def test_named_source_without_local_copy_or_datasets_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("LCC_DATA_DIR", str(tmp_path))
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(TextSourceError, match=r"pip install datasets.*LCC_DATA_DIR"):
        load_text("wikitext2")


def test_hub_fallback_loads_rows_through_datasets_when_offline_it_explains(tmp_path, monkeypatch):
    monkeypatch.setenv("LCC_DATA_DIR", str(tmp_path))
    calls = []

    class FakeSplit:
        column_names = ["text"]

        def __getitem__(self, key):
            return ["", " = T = \n", "", " x \n"]

    def load_dataset(name, config, split, data_files=None):
        calls.append((name, config, split, data_files))
        return FakeSplit()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert load_text("wikitext2") == "\n\n".join(["", " = T = \n", "", " x \n"])
    assert calls == [("wikitext", "wikitext-2-raw-v1", "test", None)]
    assert load_text("hf:some/set:cfg", split="validation").startswith("\n\n = T = ")
    assert calls[-1] == ("some/set", "cfg", "validation", None)

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(TextSourceError, match=r"could not load 'wikitext'.*no network.*LCC_DATA_DIR"):
        load_text("wikitext2")


def test_c4_hub_fallback_pins_the_papers_validation_shard(tmp_path, monkeypatch):
    monkeypatch.setenv("LCC_DATA_DIR", str(tmp_path))
    seen = {}

    class FakeSplit:
        column_names = ["text", "url"]

        def __getitem__(self, key):
            return [f"d{i}" for i in range(2000)]

    def load_dataset(name, config, split, data_files=None):
        seen.update(name=name, split=split, data_files=data_files)
        return FakeSplit()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert len(load_text("c4", split="validation").split(" ")) == 1100
    assert seen == {
        "name": "allenai/c4",
        "split": "validation",
        "data_files": {"validation": SOURCES["c4"].hub_files["validation"]},
    }


@pytest.mark.skipif(not (SHARED_DATA / "wikitext-2-raw").is_dir(), reason="shared data not present")
def test_shared_wikitext2_test_split_has_2891_rows(monkeypatch):
    monkeypatch.setenv("LCC_DATA_DIR", str(SHARED_DATA))
    rows, join = load_rows("wikitext2")
    assert (len(rows), join) == (2891, "\n\n")
    assert all(row.endswith("\n") and row.strip() for row in rows)
    assert load_text("wikitext2").startswith(" = Robert Boulter = \n\n\n Robert Boulter is")


def test_calibration_windows_are_seeded_and_short_text_is_a_clear_error(tmp_path):
    from lcc_jax.data.calibration import CalibrationError, calibration_tokens

    class CharTokenizer:
        def __call__(self, text):
            return {"input_ids": [ord(c) % 256 for c in text]}

    text = tmp_path / "calib.txt"
    text.write_text("".join(chr(97 + i % 26) for i in range(5000)))
    first = calibration_tokens(CharTokenizer(), text, nsamples=4, seqlen=64, seed=0)
    again = calibration_tokens(CharTokenizer(), text, nsamples=4, seqlen=64, seed=0)
    other = calibration_tokens(CharTokenizer(), text, nsamples=4, seqlen=64, seed=1)
    assert first.shape == (4, 64) and first.dtype == np.int32
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    # every window is a contiguous slice of the tokenized text
    ids = np.array(CharTokenizer()(text.read_text())["input_ids"])
    for row in first:
        starts = [s for s in range(len(ids) - 63) if np.array_equal(ids[s : s + 64], row)]
        assert starts
    with pytest.raises(CalibrationError, match="fewer than one window"):
        calibration_tokens(CharTokenizer(), text, nsamples=1, seqlen=6000)


def test_alpaca_calibration_reads_the_local_training_set():
    from lcc_jax.data.calibration import calibration_tokens

    class CharTokenizer:
        def __call__(self, text):
            return {"input_ids": [ord(c) % 256 for c in text]}

    windows = calibration_tokens(CharTokenizer(), "alpaca", nsamples=2, seqlen=128, seed=0)
    rows = [json.loads(line) for line in (data_dir() / "alpaca_2000" / "train.jsonl").read_text().splitlines()]
    joined = "\n\n".join(r["prompt"] + r["response"] for r in rows)
    stream = np.array([ord(c) % 256 for c in joined], np.int32)
    assert windows.shape == (2, 128)
    for row in windows:  # each window is a contiguous slice of prompt+response texts joined by blank lines
        hits = np.flatnonzero(stream[: len(stream) - 127] == row[0])
        assert any(np.array_equal(stream[h : h + 128], row) for h in hits)


def test_piqa_calibration_is_correct_solutions_and_never_recovery_or_suite_text(tmp_path, monkeypatch):
    from lcc_jax.data.calibration import calibration_tokens
    from lcc_jax.data.text import TextSourceError

    class CharTokenizer:
        def __call__(self, text):
            return {"input_ids": [ord(c) % 256 for c in text]}

    rows = [json.loads(line) for line in (data_dir() / "eval" / "piqa" / "validation.jsonl").read_text().splitlines()]
    joined = "\n\n".join(r["goal"] + " " + r[f"sol{r['label'] + 1}"] for r in rows)
    wrong = [r[f"sol{2 - r['label']}"] for r in rows if len(r[f"sol{2 - r['label']}"]) > 200]
    stream = np.array([ord(c) % 256 for c in joined], np.int32)
    windows = calibration_tokens(CharTokenizer(), "piqa", nsamples=3, seqlen=256, seed=0)
    for row in windows:
        hits = np.flatnonzero(stream[: len(stream) - 255] == row[0])
        assert any(np.array_equal(stream[h : h + 256], row) for h in hits)
    assert wrong and not any(w in joined for w in wrong[:20])  # only the gold solution is calibration text
    assert "### Instruction" not in joined
    monkeypatch.setenv("LCC_DATA_DIR", str(tmp_path))  # no local copy: the error names the file and the fix
    with pytest.raises(TextSourceError, match="eval/piqa/validation.jsonl.*--calibration PATH"):
        calibration_tokens(CharTokenizer(), "piqa", nsamples=1, seqlen=16)
