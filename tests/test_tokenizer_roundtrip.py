"""The tokenizer saved with a checkpoint encodes every evaluation text into the source tokenizer's ids.

The texts are the ones lcc_jax evaluates on, tokenized the way it tokenizes them: WikiText-2's test text
through `perplexity.tokenize`, and the zero-shot requests `eval.tasks` builds through
`loglik.encode_requests`. Each source the loader accepts is round-tripped through the writers:
save_hf -> load (HF folder) -> save_orbax -> load (Orbax folder) -> save_pruned -> load_pruned.

Always run (seconds): a tiny Qwen2-style byte-level BPE (NFC + Qwen2's split regex, merges trained with
`tokenizers` on WikiText-2, padded past 100,000 tokens so transformers' large-vocabulary checks apply),
as a tokenizer object and as GGUF metadata, on a WikiText-2 slice and the first 25 documents of each
task; GGUF pre-tokenizers against llama.cpp's regexes. Marked `real`: SmolLM2-135M and
Qwen2.5-Coder-1.5B from their cached GGUF (skipped when it is not in the cache) and their built-in
folders, on the whole WikiText-2 test text and all 69,660 zero-shot requests of the eight tasks.

Two findings these pin down:
  * transformers from 4.57.3 (before its fix) warns "incorrect regex pattern ... fix_mistral_regex=True"
    for any local tokenizer of over 100,000 tokens whose config.json has no `transformers_version`: every
    saved Qwen2 checkpoint. `write_config` now records the version, which passes that check.
  * transformers' own GGUF tokenizer ignores `tokenizer.ggml.pre == "smollm"` (a plain GPT-2 regex) and
    differs from ours at 10 places of WikiText-2. Ours follows llama.cpp (`\\p{N}`, then the GPT-2 regex)
    and SmolLM2's tokenizer.json (Digits(individual_digits) before ByteLevel): a number character is a
    piece of its own, so " \\n\\n\\n 1" keeps its whole whitespace run and " ½" its space apart.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
import unicodedata
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from lcc_jax.checkpoint import load_pruned, save_pruned
from lcc_jax.config import ModelConfig
from lcc_jax.convert.builtin import cache_dir
from lcc_jax.convert.export import save_hf, save_orbax
from lcc_jax.convert.load import load
from lcc_jax.data.text import load_text
from lcc_jax.eval.loglik import _move_trailing_space, encode_requests
from lcc_jax.eval.perplexity import tokenize
from lcc_jax.eval.tasks import TASKS, load_docs
from lcc_jax.tokenizer import _QWEN2_SPLIT, load_tokenizer, tokenizer_from_gguf

REPO = Path(__file__).resolve().parents[1]
MISTRAL_WARNING = "incorrect regex pattern"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LARGE_VOCAB = 100_000  # transformers runs its Mistral-regex check on tokenizers larger than this

# llama.cpp's pre-tokenizer regexes (src/llama-vocab.cpp). SMOLLM: "\p{N}", then GPT-2's (its trailing
# "|\s+" only names the whitespace llama.cpp keeps as an unmatched piece anyway). QWEN2: Qwen's tokenizer.json
# regex, on NFC text as Qwen's tokenizer.json normalizes it (llama.cpp itself does not normalize).
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


# ------------------------------------------------------------------------------------------- texts


def wikitext() -> str:
    return load_text("wikitext2")


def requests(limit: int | None = None) -> list[tuple[str, str]]:
    return [req for name in TASKS for doc in load_docs(name, limit=limit) for req in doc.requests]


def unique_texts(reqs: list[tuple[str, str]]) -> list[str]:
    """Every string `encode_requests` hands the tokenizer: contexts and context + continuation."""
    moved = [_move_trailing_space(c, x) for c, x in reqs]
    return sorted({c for c, _ in moved if c} | {c + x for c, x in moved if c})


def encode_all(tokenizer, text: str, reqs: list[tuple[str, str]]) -> tuple[np.ndarray, list]:
    return tokenize(tokenizer, text), encode_requests(tokenizer, reqs)


def assert_same_ids(expected, actual, what: str) -> None:
    (text_ids, pairs), (got_text, got_pairs) = expected, actual
    if not np.array_equal(text_ids, got_text):
        n = min(text_ids.size, got_text.size)
        first = int(np.flatnonzero(text_ids[:n] != got_text[:n])[0]) if (text_ids[:n] != got_text[:n]).any() else n
        pytest.fail(f"{what}: WikiText-2 ids differ from token {first} ({text_ids.size} vs {got_text.size} tokens)")
    bad = [i for i, (a, b) in enumerate(zip(pairs, got_pairs)) if a != b]
    assert len(pairs) == len(got_pairs) and not bad, f"{what}: {len(bad)} zero-shot requests differ, first {bad[:5]}"


# ------------------------------------------------------------------------------------------- logs


@pytest.fixture
def transformers_log(caplog):
    """caplog that also sees transformers' warnings (its library logger does not propagate by default)."""
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    caplog.set_level(logging.WARNING)
    yield caplog
    hf_logging.disable_propagation()


def assert_no_regex_warning(caplog, recwarn) -> None:
    assert MISTRAL_WARNING not in caplog.text
    assert not [str(w.message) for w in recwarn if "regex" in str(w.message)]


# ------------------------------------------------------------------------------------------- writers


def tiny_model(model_type: str, vocab_size: int):
    from model_utils import random_model

    config = ModelConfig(model_type=model_type, vocab_size=vocab_size, hidden_size=16, intermediate_size=32,
                         num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, tie_word_embeddings=True,
                         qkv_bias=model_type == "qwen2")
    return random_model(config)


def through_writers(model, tokenizer, root: Path) -> dict[str, object]:
    """{writer: the tokenizer read back}, each writer fed the tokenizer the previous one read back."""
    out = {}
    save_hf(model, tokenizer, root / "hf")
    _, out["save_hf"], _ = load(root / "hf")
    save_orbax(model, out["save_hf"], root / "orbax")
    _, out["save_orbax"], _ = load(root / "orbax")
    save_pruned(root / "pruned", model, out["save_orbax"], {}, meta={"what": "tokenizer round trip"})
    out["save_pruned"] = load_pruned(root / "pruned").tokenizer
    return out


SAVED_FOLDERS = {"save_hf": "hf", "save_orbax": "orbax", "save_pruned": "pruned/model"}


# ------------------------------------------------------------------------------------------- tiny tokenizer


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map (ByteLevel's alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def qwen2_backend():
    """A `tokenizers` Tokenizer with Qwen2's normalizer, pre-tokenizer and decoder, no vocabulary yet."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


@pytest.fixture(scope="module")
def qwen2_vocab():
    """(tokens, merges, token types) of a Qwen2-style BPE trained on WikiText-2's first 300,000 characters,
    padded with unreachable tokens past 100,000 and ending with Qwen's three control tokens."""
    from tokenizers import pre_tokenizers, trainers

    tok = qwen2_backend()
    trainer = trainers.BpeTrainer(vocab_size=800, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(wikitext()[:300_000].splitlines(), trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    tokens += [f"<filler_{i}>" for i in range(LARGE_VOCAB + 1 - len(tokens))]
    types = [1] * len(tokens) + [3] * len(SPECIALS)
    return tokens + SPECIALS, merges, types


def tokenizer_object(tokens, merges):
    """The Qwen2-style tokenizer as a `tokenizers` object wrapped for transformers (an HF folder's kind)."""
    from tokenizers import AddedToken, models
    from transformers import PreTrainedTokenizerFast

    tok = qwen2_backend()
    vocab = {t: i for i, t in enumerate(tokens[: -len(SPECIALS)])}
    tok.model = models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   clean_up_tokenization_spaces=False)


def gguf_source(meta: dict):
    """What `tokenizer_from_gguf` reads of a GGUFSource: its metadata (and a path for messages)."""
    return SimpleNamespace(metadata=meta, path=Path("tiny.gguf"))


def qwen2_gguf_meta(tokens, merges, types) -> dict:
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.merges": merges, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.eos_token_id": tokens.index("<|im_end|>"),
            "tokenizer.ggml.padding_token_id": tokens.index("<|endoftext|>")}


# ------------------------------------------------------------------------------------------- tiny tests


@pytest.mark.parametrize("kind", ["tokenizer object", "gguf metadata"])
def test_qwen2_style_tokenizer_round_trips_through_every_writer(kind, qwen2_vocab, tmp_path, transformers_log,
                                                                 recwarn):
    tokens, merges, types = qwen2_vocab
    source = tokenizer_object(tokens, merges) if kind == "tokenizer object" else tokenizer_from_gguf(
        gguf_source(qwen2_gguf_meta(tokens, merges, types)))
    assert len(source) > LARGE_VOCAB
    text, reqs = wikitext()[:200_000], requests(limit=25)
    expected = encode_all(source, text, reqs)
    model = tiny_model("qwen2", len(source))

    for writer, saved in through_writers(model, source, tmp_path).items():
        assert_same_ids(expected, encode_all(saved, text, reqs), writer)
        config = json.loads((tmp_path / SAVED_FOLDERS[writer] / "config.json").read_text())
        assert config["transformers_version"] == version("transformers")  # what makes the regex check pass
    assert_no_regex_warning(transformers_log, recwarn)


def test_saved_qwen2_tokenizer_loads_without_regex_warning_in_every_place(qwen2_vocab, tmp_path, transformers_log,
                                                                         recwarn):
    """Reloading the saved folders directly, as other tools do (transformers' AutoTokenizer and our loader)."""
    from transformers import AutoTokenizer

    tokens, merges, _ = qwen2_vocab
    through_writers(tiny_model("qwen2", len(tokens)), tokenizer_object(tokens, merges), tmp_path)
    for folder in SAVED_FOLDERS.values():
        AutoTokenizer.from_pretrained(str(tmp_path / folder))
        load_tokenizer(tmp_path / folder)
    assert_no_regex_warning(transformers_log, recwarn)


TF517 = REPO / ".official" / "tf517"  # transformers 5.17, installed there for the official harness


@pytest.mark.skipif(not (TF517 / "transformers").is_dir(), reason=f"no transformers 5.17 at {TF517}")
def test_transformers_5_17_reads_saved_qwen2_tokenizer_quietly_and_identically(qwen2_vocab, tmp_path):
    """transformers 5.17 (which has the check's bug) loads a folder save_hf wrote without the warning, and
    encodes as the source does; the same folder without `transformers_version` does warn (the check is live)."""
    tokens, merges, _ = qwen2_vocab
    source = tokenizer_object(tokens, merges)
    save_hf(tiny_model("qwen2", len(source)), source, tmp_path / "hf")
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        (bare / name).write_text((tmp_path / "hf" / name).read_text())
    config = json.loads((bare / "config.json").read_text())
    config.pop("transformers_version", None)
    (bare / "config.json").write_text(json.dumps(config))
    sample = wikitext()[:20_000]
    script = ("import json, sys, transformers\nassert transformers.__version__ == '5.17.0'\n"
              "tok = transformers.AutoTokenizer.from_pretrained(sys.argv[1])\n"
              "print(json.dumps(tok(sys.stdin.read())['input_ids']))\n")

    def run(folder: Path) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": str(TF517), "HF_HUB_OFFLINE": "1"}
        return subprocess.run([sys.executable, "-c", script, str(folder)], input=sample, env=env,
                              capture_output=True, text=True, timeout=300, check=True)

    saved = run(tmp_path / "hf")
    assert MISTRAL_WARNING not in saved.stderr + saved.stdout
    assert json.loads(saved.stdout.splitlines()[-1]) == source(sample)["input_ids"]
    assert MISTRAL_WARNING in run(bare).stderr


# ------------------------------------------------------------------------------------------- pre-tokenizers


def llama_cpp_pieces(pre: str, text: str) -> list[str]:
    """llama.cpp's pre-tokenization of `text` (see the regexes above), in ByteLevel's alphabet."""
    import regex

    if pre == "smollm":
        parts = [p for p in regex.split(r"(\p{N})", text) if p]
        pieces = [m for part in parts for m in regex.findall(GPT2_REGEX, part)]
    else:
        text = unicodedata.normalize("NFC", text)
        pieces = regex.findall(_QWEN2_SPLIT, text)
    assert "".join(pieces) == text
    alphabet = byte_alphabet()
    return ["".join(alphabet[b] for b in piece.encode("utf-8")) for piece in pieces]


def our_pieces(tokenizer, text: str) -> list[str]:
    backend = tokenizer.backend_tokenizer
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    return [piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text)]


def assert_pieces_as_llama_cpp(tokenizer, pre: str, texts: list[str]) -> None:
    bad = [t for t in texts if our_pieces(tokenizer, t) != llama_cpp_pieces(pre, t)]
    assert not bad, f"{len(bad)} of {len(texts)} texts pre-tokenize unlike llama.cpp's {pre!r}; first: {bad[0][:200]!r}"


def alphabet_meta(pre: str) -> dict:
    tokens = list(byte_alphabet().values())
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.merges": [], "tokenizer.ggml.token_type": [1] * len(tokens)}


@pytest.mark.parametrize("pre", ["smollm", "qwen2"])
def test_gguf_pre_tokenizer_splits_as_llama_cpp(pre):
    pytest.importorskip("regex")
    tokenizer = tokenizer_from_gguf(gguf_source(alphabet_meta(pre)))
    texts = [wikitext()[:300_000], *unique_texts(requests(limit=50))]
    texts += ["Caf\u0065\u0301 \u00bd 4 \u00bd \u2168 \uff11\uff12 \u0661\u0662", " \n\n\n 1 Temn", "a  1\t\t2\n 3"]
    assert_pieces_as_llama_cpp(tokenizer, pre, texts)


def test_smollm_number_characters_are_pieces_of_their_own():
    """The two kinds of place where transformers' GGUF tokenizer (plain GPT-2 regex) cuts SmolLM2 text otherwise."""
    tokenizer = tokenizer_from_gguf(gguf_source(alphabet_meta("smollm")))
    # the GPT-2 regex alone: "Ġ:", "ĠĊĊĊ", "Ġ1", "ĠTemn" and "died", "Ġ4", "ĠÂ½", "Ġmonths"
    assert our_pieces(tokenizer, " : \n\n\n 1 Temn") == ["Ġ:", "ĠĊĊĊĠ", "1", "ĠTemn"]
    assert our_pieces(tokenizer, "died 4 ½ months") == ["died", "Ġ", "4", "Ġ", "Â½", "Ġmonths"]


# ------------------------------------------------------------------------------------------- real models

REAL = {  # name: (GGUF in the cache, built-in folder, model type, tokenizer.ggml.pre)
    "smollm2-135m": ("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m", "llama", "smollm"),
    "qwen2.5-coder-1.5b": ("Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf", "qwen2.5-coder-1.5b", "qwen2", "qwen2"),
}


def real_gguf(name: str) -> Path:
    path = cache_dir() / "downloads" / REAL[name][0]
    if not path.is_file():
        pytest.skip(f"{path} is not in the cache (load {name!r} once to fetch it)")
    return path


@pytest.fixture(scope="module")
def everything():
    """WikiText-2's whole test text and every zero-shot request of the eight tasks."""
    return wikitext(), requests()


@pytest.fixture(scope="module")
def real_source(request, everything):
    """(name, GGUF tokenizer, its ids on everything, seconds one pass took) of one cached GGUF."""
    from lcc_jax.convert.gguf_source import GGUFSource

    name = request.param
    tokenizer = tokenizer_from_gguf(GGUFSource(real_gguf(name)))
    start = time.perf_counter()
    ids = encode_all(tokenizer, *everything)
    return name, tokenizer, ids, time.perf_counter() - start


REAL_PARAMS = [pytest.param(name, marks=[pytest.mark.real, pytest.mark.slow]) for name in REAL]


def tokenizer_files(folder: Path) -> dict:
    """The saved tokenizer's files, less the two load-call arguments transformers 5 writes into
    tokenizer_config.json when it saves a tokenizer it read from a folder ("is_local", "local_files_only")."""
    config = json.loads((folder / "tokenizer_config.json").read_text())
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    return {"tokenizer.json": (folder / "tokenizer.json").read_bytes(), "tokenizer_config.json": config,
            "chat_template.jinja": (folder / "chat_template.jinja").read_text()
            if (folder / "chat_template.jinja").is_file() else None}


@pytest.mark.parametrize("real_source", REAL_PARAMS, indirect=True)
def test_real_gguf_tokenizer_round_trips_exactly_through_every_writer(real_source, everything, tmp_path,
                                                                      transformers_log, recwarn):
    """GGUF -> save_hf -> HF folder -> save_orbax -> Orbax folder -> save_pruned -> pruned checkpoint: the
    three saved tokenizers are one set of files (`tokenizer_files`), and the last one read back gives the
    GGUF's ids on everything (each one also on all of WikiText-2)."""
    name, source, expected, _ = real_source
    text, reqs = everything
    saved = through_writers(tiny_model(REAL[name][2], len(source)), source, tmp_path)
    files = [tokenizer_files(tmp_path / folder) for folder in SAVED_FOLDERS.values()]
    assert files[0] == files[1] == files[2]
    for writer, tokenizer in saved.items():
        assert np.array_equal(tokenize(tokenizer, text), expected[0]), writer
    assert_same_ids(expected, encode_all(saved["save_pruned"], text, reqs), "save_pruned after save_orbax, save_hf")
    assert_no_regex_warning(transformers_log, recwarn)


@pytest.mark.parametrize("real_source", REAL_PARAMS, indirect=True)
def test_real_builtin_folder_tokenizer_encodes_as_its_gguf(real_source, everything):
    """The built-in name's converted folder (written once by save_source_hf) against the GGUF it came from."""
    name, _, expected, _ = real_source
    folder = cache_dir() / REAL[name][1]
    if not (folder / "config.json").is_file():
        pytest.skip(f"{name} has not been converted into {folder} yet")
    assert_same_ids(expected, encode_all(load_tokenizer(folder), *everything), f"built-in {name}")


@pytest.mark.parametrize("real_source", REAL_PARAMS, indirect=True)
def test_real_gguf_tokenizer_pre_tokenizes_as_llama_cpp(real_source, everything):
    """All of WikiText-2 and every 4th zero-shot text (Python's regex takes ~1 min on all 27 MB on 2 cores;
    all of them matched when this was written)."""
    pytest.importorskip("regex")
    name, tokenizer, _, _ = real_source
    text, reqs = everything
    assert_pieces_as_llama_cpp(tokenizer, REAL[name][3], [text, *unique_texts(reqs)[::4]])


@pytest.mark.real
def test_real_smollm2_splits_wikitext_where_transformers_gguf_reader_does_not():
    """The 10 places of WikiText-2 where transformers' GGUF tokenizer differs: ours gives llama.cpp's pieces."""
    from lcc_jax.convert.gguf_source import GGUFSource

    tokenizer = tokenizer_from_gguf(GGUFSource(real_gguf("smollm2-135m")))
    text = wikitext()
    assert re.findall(r"\s\s+(?=\d)", text) == [" \n\n\n "] * 9 and text.count(" ½") == 1
    pieces = tokenizer.convert_ids_to_tokens(tokenizer(" : \n\n\n 1 Temn")["input_ids"])
    assert pieces[1:4] == ["ĠĊĊ", "ĊĠ", "1"]  # transformers: "Ġ", "ĊĊĊ", "Ġ", "1"
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("died 4 ½ months")["input_ids"])
    assert pieces[1:5] == ["Ġ", "4", "Ġ", "Â½"]  # transformers: "Ġ", "4", "ĠÂ", "½"


# ------------------------------------------------------------------------------------------- import cost


@pytest.mark.parametrize("imports_torch", [True, False])
def test_the_log_says_when_loading_a_tokenizer_imported_pytorch(imports_torch, monkeypatch, caplog):
    """transformers 5.17 imports PyTorch with its tokenizer module (seconds on the GPU machine's image): the log names
    it, and says nothing where the import did not happen. Stand-ins replace both modules for this process."""
    import logging
    import types

    from lcc_jax.tokenizer import fast_tokenizer_class

    class Fast:
        pass

    fake = types.ModuleType("transformers")
    fake.__version__ = "5.17.0"

    def attribute(name):
        if name != "PreTrainedTokenizerFast":
            raise AttributeError(name)
        if imports_torch:
            sys.modules["torch"] = types.ModuleType("torch")
        return Fast

    fake.__getattr__ = attribute
    real_torch = sys.modules.pop("torch", None)  # put back by hand: monkeypatch would leave the stand-in behind
    monkeypatch.setitem(sys.modules, "transformers", fake)
    try:
        with caplog.at_level(logging.INFO, logger="lcc_jax.tokenizer"):
            assert fast_tokenizer_class() is Fast
    finally:
        sys.modules.pop("torch", None)
        if real_torch is not None:
            sys.modules["torch"] = real_torch
    said = "importing transformers 5.17.0's tokenizer imported PyTorch too" in caplog.text
    assert said == imports_torch
