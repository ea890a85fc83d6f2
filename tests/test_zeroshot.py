"""Zero-shot scoring: log-likelihoods against an independent PyTorch lm-eval-style loop, metrics, sharding, errors."""

from __future__ import annotations

import functools
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcc_jax.config import ModelConfig
from lcc_jax.eval import (
    SUITE,
    ZEROSHOT_TASKS,
    Doc,
    TaskResult,
    ZeroShotError,
    ZeroShotResult,
    encode_requests,
    load_docs,
    loglikelihood_tokens,
    mean_stderr,
    multiple_choice_correct,
    resolve_tasks,
    task_result,
    zeroshot,
)
from lcc_jax.eval.loglik import length_buckets, pack_length, pack_rows, packed_shapes, prepare_batches, score_rows
from lcc_jax.models.attention import AttentionMask
from lcc_jax.sharding import make_mesh
from model_utils import random_model
from tiny import hf_config, lcc_model

VOCAB = 384
MAX_LENGTH = 96  # BoolQ, RTE, PIQA and some ARC requests are longer: left truncation is exercised


@pytest.fixture(scope="module")
def tokenizer():
    """A 384-token byte-level BPE trained on the eval files, adding a BOS like Llama's tokenizers."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from lcc_jax.data.text import data_dir

    texts = [
        "\n".join(c + x for c, x in doc.requests)
        for task in ZEROSHOT_TASKS
        for doc in load_docs(task, limit=40)
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    assert data_dir() is not None
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>",
                                                pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def torch_model():
    torch = pytest.importorskip("torch")
    import transformers

    config = hf_config("llama")
    config.vocab_size = VOCAB
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module")
def model(torch_model):
    return lcc_model(torch_model)


def every_task_requests(limit: int = 1) -> list[tuple[str, str]]:
    return [req for task in ZEROSHOT_TASKS for doc in load_docs(task, limit=limit) for req in doc.requests]


def lm_eval_loglikelihood(torch_model, tokenizer, context: str, continuation: str, max_length: int):
    """lm-eval's HFLM path, one request at a time: _encode_pair, left truncation, log_softmax, greedy check."""
    import torch

    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    cont = whole[len(ctx) :]
    inp = torch.tensor([(ctx + cont)[-(max_length + 1) :][:-1]])
    with torch.no_grad():
        logp = torch.log_softmax(torch_model(inp).logits[0].float(), dim=-1)[-len(cont) :]  # (cont, vocab)
    target = torch.tensor(cont)
    return logp[torch.arange(len(cont)), target].sum().item(), bool((logp.argmax(-1) == target).all())


# ---------------------------------------------------------------------------------- parity


@pytest.mark.parity
def test_loglikelihoods_equal_pytorch_lm_eval_loop_on_every_task(torch_model, model, tokenizer):
    requests = every_task_requests()
    pairs = encode_requests(tokenizer, requests)
    scores = loglikelihood_tokens(model, pairs, batch_size=8, max_length=MAX_LENGTH)
    expected = [lm_eval_loglikelihood(torch_model, tokenizer, c, x, MAX_LENGTH) for c, x in requests]
    np.testing.assert_allclose(scores.loglik, [ll for ll, _ in expected], rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(scores.is_greedy, [g for _, g in expected])
    assert max(len(c) + len(x) for c, x in pairs) > MAX_LENGTH + 1  # some requests were truncated
    assert all(len(shape) == 2 and shape[0] == 8 for shape in scores.shapes)


@pytest.mark.parity
def test_winogrande_scores_only_the_tail_after_each_filled_blank(torch_model, model, tokenizer):
    (doc,) = load_docs("winogrande", limit=1)
    assert doc.continuations[0] == doc.continuations[1] and doc.contexts[0] != doc.contexts[1]
    scores = loglikelihood_tokens(model, encode_requests(tokenizer, doc.requests), batch_size=2)
    expected = [lm_eval_loglikelihood(torch_model, tokenizer, c, x, 2048)[0] for c, x in doc.requests]
    np.testing.assert_allclose(scores.loglik, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parity
def test_model_kwargs_reach_every_forward_call(model, tokenizer):
    pairs = encode_requests(tokenizer, load_docs("arc_easy", limit=1)[0].requests)
    c = model.config
    zero = jnp.zeros((c.num_layers, c.num_heads, c.head_dim))
    score = functools.partial(loglikelihood_tokens, model, pairs, batch_size=4, max_length=48)
    base = score().loglik
    np.testing.assert_allclose(score(model_kwargs={"compensation": zero}).loglik, base, rtol=1e-6)
    shifted = score(model_kwargs={"compensation": zero + 0.5}).loglik
    assert np.all(np.abs(shifted - base) > 1e-4)


@pytest.mark.parity
def test_sharded_run_on_8_devices_equals_unsharded(torch_model, model, tokenizer):
    mesh = make_mesh("data=2,fsdp=4")
    assert mesh.devices.size == 8 == len(jax.devices())
    sharded_model = lcc_model(torch_model, mesh=mesh)
    sharded = zeroshot(sharded_model, tokenizer, "all", limit=1, batch_size=5, mesh=mesh, max_length=MAX_LENGTH)
    pairs = encode_requests(tokenizer, every_task_requests())  # the same requests, in the same order
    one = loglikelihood_tokens(model, pairs, batch_size=8, max_length=MAX_LENGTH)
    many = loglikelihood_tokens(sharded_model, pairs, batch_size=5, mesh=mesh, max_length=MAX_LENGTH)
    assert {shape[0] for shape in many.shapes} == {8}  # 5 rows round up to split over 8 batch shards
    np.testing.assert_allclose(many.loglik, one.loglik, rtol=1e-5, atol=1e-5)
    offset = 0
    for task, result in sharded.tasks.items():
        docs = load_docs(task, limit=1)
        lls = []
        for doc in docs:
            lls.append(one.loglik[offset : offset + len(doc.choices)])
            offset += len(doc.choices)
        assert result == task_result(task, docs, lls)


# ---------------------------------------------------------------------------------- tokenization


def test_context_gets_the_tokenizers_bos_and_trailing_spaces_move_to_the_continuation(tokenizer):
    bos = tokenizer.bos_token_id
    [(ctx, cont)] = encode_requests(tokenizer, [("Question: why?\nAnswer: ", "yes")])
    assert ctx == tokenizer.encode("Question: why?\nAnswer:") and ctx[0] == bos
    assert cont == tokenizer.encode("Question: why?\nAnswer: yes")[len(ctx) :]
    [(ctx, _)] = encode_requests(tokenizer, [("Question: why?\nAnswer:", " yes")], add_special_tokens=False)
    assert ctx[0] != bos and [bos, *ctx] == tokenizer.encode("Question: why?\nAnswer:")
    [(ctx, cont)] = encode_requests(tokenizer, [("", " yes")])
    assert ctx == [tokenizer.eos_token_id] and cont == tokenizer.encode(" yes")


def test_length_buckets_grow_geometrically_and_cover_the_longest():
    assert length_buckets(2048) == (16, 32, 48, 64, 80, 112, 144, 192, 240, 304, 384, 480, 608, 768, 960, 1200,
                                    1504, 1888, 2048)
    assert length_buckets(1) == (16,) and length_buckets(70, multiple=64) == (64, 128)


# ---------------------------------------------------------------------------------- metrics


def test_acc_is_argmax_of_loglikelihood_and_acc_norm_divides_by_characters():
    lls = [[-4.0, -6.0], [-9.0, -12.0, -10.0], [-3.0, -3.0]]
    golds = [0, 1, 1]
    lengths = [[4, 12], [3, 8, 5], [1, 1]]
    np.testing.assert_array_equal(multiple_choice_correct(lls, golds), [1, 0, 0])  # tie -> first choice
    # per character: [-1, -0.5] -> 1; [-3, -1.5, -2] -> 1; tie -> 0
    np.testing.assert_array_equal(multiple_choice_correct(lls, golds, lengths), [0, 1, 0])


def test_task_result_reports_acc_norm_only_where_lm_eval_does():
    def doc(gold, choices):
        return Doc(contexts=("q",) * len(choices), continuations=tuple(" " + c for c in choices), gold=gold,
                   choices=tuple(choices))

    docs = [doc(1, ["ab", "abcdefgh"]), doc(0, ["aaaa", "b"]), doc(0, ["a", "b"]), doc(1, ["a", "b"])]
    lls = [np.array([-2.0, -4.0]), np.array([-1.0, -2.0]), np.array([-1.0, -0.5]), np.array([-1.0, -0.5])]
    arc = task_result("arc_easy", docs, lls)
    assert (arc.n, arc.acc, arc.acc_norm) == (4, 0.5, 0.75)
    assert arc.acc_stderr == pytest.approx(math.sqrt(1 / 3 / 4))  # sample std of [0, 1, 0, 1] / sqrt(4)
    assert arc.acc_norm_stderr == pytest.approx(mean_stderr([1, 1, 0, 1]))
    assert (arc.correct, arc.correct_norm) == ("0101", "1101")  # each document's outcome, for paired intervals
    boolq = task_result("boolq", docs, lls)
    assert boolq.acc == 0.5 and boolq.acc_norm is None and boolq.acc_norm_stderr is None
    assert (boolq.correct, boolq.correct_norm) == ("0101", None)
    assert math.isnan(mean_stderr([1.0]))


def test_suite_mean_is_the_mean_acc_of_the_seven_tasks():
    accs = dict(zip(SUITE, [0.6, 0.5, 0.4, 0.55, 0.7, 0.3, 0.25]))
    tasks = {t: TaskResult(t, 10, a, 0.01, a + 0.01 if ZEROSHOT_TASKS[t].acc_norm else None) for t, a in accs.items()}
    result = ZeroShotResult(tasks={**tasks, "piqa": TaskResult("piqa", 10, 0.9, 0.01, 0.8, 0.01)}, limit=10)
    assert result.suite_mean == pytest.approx(np.mean(list(accs.values())))
    assert result.mean == pytest.approx(np.mean([*accs.values(), 0.9]))
    table = result.to_markdown()
    assert "| BoolQ | 10 | 60.00 ± 1.00 | – |" in table and "**47.14**" in table and "mean (8 tasks)" in table
    assert result.to_dict()["tasks"]["piqa"]["acc_norm"] == 0.8
    assert ZeroShotResult(tasks={"rte": tasks["rte"]}).suite_mean is None


# ---------------------------------------------------------------------------------- tasks and errors


def test_task_names_suite_all_and_aliases():
    assert resolve_tasks("suite") == SUITE
    assert resolve_tasks("all") == (*SUITE, "piqa")
    assert resolve_tasks("ARC-e, obqa,arc_e") == ("arc_easy", "openbookqa")
    assert resolve_tasks(["piqa", "suite"])[:2] == ("piqa", "boolq")


def test_unknown_task_is_refused_with_the_known_names():
    with pytest.raises(ZeroShotError, match="unknown task 'mmlu'.*boolq.*suite"):
        resolve_tasks("boolq,mmlu")
    with pytest.raises(ZeroShotError, match="unknown task"):
        zeroshot(None, None, "lambada")


def test_missing_data_file_names_lcc_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LCC_DATA_DIR", str(tmp_path))
    monkeypatch.setitem(sys.modules, "datasets", None)  # no hub fallback
    with pytest.raises(ZeroShotError, match=r"LCC_DATA_DIR.*eval/rte/validation\.jsonl") as info:
        load_docs("rte")
    assert str(tmp_path / "eval" / "rte" / "validation.jsonl") in str(info.value)


def test_limit_keeps_the_first_documents_and_refuses_nonsense():
    assert load_docs("piqa", limit=3) == load_docs("piqa")[:3]
    with pytest.raises(ZeroShotError, match="limit must be positive"):
        load_docs("piqa", limit=0)


# ---------------------------------------------------------------------------------- shared contexts


def test_score_rows_put_a_context_once_and_each_continuation_as_a_branch():
    pairs = [([1, 2, 3], [4, 5]), ([1, 2, 3], [6]), ([7, 8], [9, 10, 11]), ([1] * 6, [2, 3])]
    rows = score_rows(pairs, max_length=6)
    assert [r.requests for r in rows] == [(0, 1), (2,), (3,)]
    shared = rows[0]  # context, then 4 (5 is only a target), then nothing for the one-token 6
    np.testing.assert_array_equal(shared.tokens, [1, 2, 3, 4])
    np.testing.assert_array_equal(shared.branches, [0, 0, 0, 1])
    np.testing.assert_array_equal(shared.positions, [0, 1, 2, 3])
    np.testing.assert_array_equal(shared.scored, [2, 3, 2])  # 3 -> 4, 4 -> 5, and 3 -> 6
    np.testing.assert_array_equal(shared.targets, [4, 5, 6])
    np.testing.assert_array_equal(shared.slot, [0, 0, 1])
    cut = rows[2]  # 6 + 2 tokens > max_length + 1: its own row, cut on the left as lm-eval does
    np.testing.assert_array_equal(cut.tokens, [1, 1, 1, 1, 1, 2])
    np.testing.assert_array_equal(cut.targets, [2, 3])
    assert [r.requests for r in score_rows(pairs, max_length=6, share=False)] == [(0,), (1,), (2,), (3,)]
    many = score_rows([([1, 2], [3])] * 20, max_length=16)  # one context repeated: rows of at most MAX_BRANCHES
    assert [len(r.requests) for r in many] == [16, 4]
    two = score_rows([([1, 2], [3, 4]), ([1, 2], [5, 6, 7])], max_length=16)[0]
    np.testing.assert_array_equal(two.branches, [0, 0, 1, 2, 2])
    np.testing.assert_array_equal(two.positions, [0, 1, 2, 2, 3])  # each branch restarts after the context
    np.testing.assert_array_equal(two.scored, [1, 2, 1, 3, 4])  # 2 -> 3, 3 -> 4; 2 -> 5, 5 -> 6, 6 -> 7
    as_arrays = [(np.asarray(c), np.asarray(x)) for c, x in pairs]  # ids as arrays group the same as lists
    assert [r.requests for r in score_rows(as_arrays, max_length=6)] == [(0, 1), (2,), (3,)]


def test_a_branch_sees_the_context_and_itself_only():
    segments = jnp.asarray([[1, 1, 1, 1, 1, 0]])
    branches = jnp.asarray([[0, 0, 1, 2, 2, 0]])
    dense = np.asarray(AttentionMask(segments, branches).dense()[0, 0])
    np.testing.assert_array_equal(dense[3], [1, 1, 0, 1, 0, 0])  # branch 2's first token skips branch 1
    np.testing.assert_array_equal(dense[4], [1, 1, 0, 1, 1, 0])
    np.testing.assert_array_equal(dense[2], [1, 1, 1, 0, 0, 0])
    with pytest.raises(ValueError, match="cannot be windowed"):
        AttentionMask.build(AttentionMask(segments, branches), 1, 6, sliding_window=4)


@pytest.fixture(scope="module")
def small_llama():
    """A random 2-layer Llama for the shared-context tests (no PyTorch twin needed)."""
    return random_model(ModelConfig(model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16), seed=3)


@pytest.mark.parametrize("max_length", [MAX_LENGTH, 2048])
def test_shared_and_packed_rows_score_what_one_row_per_request_scores(tokenizer, small_llama, max_length):
    pairs = encode_requests(tokenizer, every_task_requests(limit=4))
    separate = loglikelihood_tokens(small_llama, pairs, batch_size=4, max_length=max_length, share_contexts=False)
    shared = loglikelihood_tokens(small_llama, pairs, batch_size=4, max_length=max_length, pack=False)
    packed = loglikelihood_tokens(small_llama, pairs, batch_size=4, max_length=max_length)
    for result in (shared, packed):
        np.testing.assert_allclose(result.loglik, separate.loglik, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(result.is_greedy, separate.is_greedy)
    # contexts are scored once per document (at 96 tokens many requests are cut on the left and not shared)
    assert shared.tokens < (0.8 if max_length == 2048 else 1.0) * separate.tokens
    # packed: the same rows, several to a line, in fewer compiled shapes
    assert packed.tokens == shared.tokens and packed.padded_tokens <= shared.padded_tokens
    assert len(packed.shapes) < len(shared.shapes), (packed.shapes, shared.shapes)


def test_packed_rows_keep_every_request_and_each_row_a_segment_of_its_own():
    pairs = [([1, 2, 3], [4, 5]), ([1, 2, 3], [6]), ([7, 8], [9, 10, 11]), ([1] * 9, [2, 3]), ([5, 6], [7])]
    rows = score_rows(pairs, max_length=16)
    packed = pack_rows(rows, length=12)
    assert sorted(r for row in packed for r in row.requests) == [0, 1, 2, 3, 4]
    assert all(len(row.tokens) <= 12 for row in packed) and len(packed) < len(rows)
    by_request = {r: row for row in rows for r in row.requests}
    for line in packed:
        assert line.packed
        firsts = np.flatnonzero(np.diff(np.r_[0, line.segments]))  # where each segment starts
        assert list(line.segments[firsts]) == list(range(1, len(firsts) + 1))
        for slot, request in enumerate(line.requests):  # each request's scored tokens and targets, moved whole
            own = by_request[request]
            mine = line.slot == slot
            theirs = own.slot == own.requests.index(request)
            np.testing.assert_array_equal(line.targets[mine], own.targets[theirs])
            np.testing.assert_array_equal(line.tokens[line.scored[mine]], own.tokens[own.scored[theirs]])
            segment = line.segments[line.scored[mine]]
            assert len(set(segment)) == 1  # every scored position of a request lies in one segment
            np.testing.assert_array_equal(line.positions[line.segments == segment[0]], own.positions)
    alone = pack_rows(rows, length=4)  # rows longer than the line keep their own, unpacked
    assert [r.requests for r in alone if not r.packed] == [(3,)]
    # a few rows: the shortest line that holds them all in one batch (one shape, no line of filler rows)
    assert pack_length([10] * 99 + [300], batch_size=4, backend="cpu") == 336
    # attention priced: long lines cost more per token, so a model whose attention dominates packs shorter lines
    many = [300] * 10 + [130] * 1000  # two a line at 384, one at 256
    assert pack_length(many, 64, backend="cpu") == 384
    assert pack_length(many, 64, backend="cpu", attention_length=50) == 256
    assert pack_length([300] * 1000, batch_size=64, backend="gpu") == 384  # many rows: a line of PACK_LENGTHS
    assert pack_length([4000], batch_size=1, backend="cpu") == 256  # nothing packs: a tie, the shortest line


@pytest.mark.parametrize("backend, batch", [("cpu", 4), ("gpu", 16)])
def test_the_estimate_s_packed_shapes_are_the_batches_scoring_makes(tokenizer, backend, batch):
    rows = score_rows(encode_requests(tokenizer, every_task_requests(limit=6)), 2048)
    lengths = [len(r.tokens) for r in rows]
    packed = pack_rows(rows, pack_length(lengths, batch, backend=backend))
    batches, _ = prepare_batches(packed, batch, 0, backend=backend)
    assert sorted(packed_shapes(lengths, batch, backend=backend)) == sorted(b.shape for b in batches)


def test_a_sliding_window_model_scores_one_row_per_request(tokenizer):
    config = ModelConfig(model_type="mistral", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                         num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, sliding_window=8)
    model = random_model(config, seed=3)
    pairs = encode_requests(tokenizer, load_docs("arc_easy", limit=2)[0].requests)
    result = loglikelihood_tokens(model, pairs, batch_size=4, max_length=MAX_LENGTH)
    assert result.tokens == sum(len(r.tokens) for r in score_rows(pairs, MAX_LENGTH, share=False))


def test_a_row_that_scores_more_positions_than_it_has_tokens(small_llama):
    """One-token context, many short choices: each branch scores the context's last position again, so the row
    scores more positions than it holds tokens (the suite hit this on the GPU's coarse length ladder)."""
    pairs = [([5], [6 + i, 7, 8]) for i in range(12)] + [([9, 10], [11])]
    row = score_rows(pairs, MAX_LENGTH)[0]
    assert len(row.scored) == 36 > 32 > len(row.tokens) == 25  # padded to 32 tokens
    shared = loglikelihood_tokens(small_llama, pairs, batch_size=4, max_length=MAX_LENGTH)
    separate = loglikelihood_tokens(small_llama, pairs, batch_size=4, max_length=MAX_LENGTH, share_contexts=False)
    np.testing.assert_allclose(shared.loglik, separate.loglik, rtol=1e-5, atol=1e-5)
