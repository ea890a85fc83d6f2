"""Tokenizers for loaded models: from a HF folder, or rebuilt from a GGUF file's vocabulary.

A HF folder's tokenizer is read by `transformers.AutoTokenizer` (no PyTorch needed). A GGUF file
carries its vocabulary as metadata; byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`:
SmolLM2, Qwen2, GPT-2 style) are rebuilt here with the `tokenizers` library, so no PyTorch is needed
either. Other GGUF vocabularies go through `transformers`' GGUF reader, which needs PyTorch.

`transformers` and `tokenizers` are imported inside the functions that build a tokenizer: importing them takes
seconds, which `import lcc_jax` (and every script's --help) should not pay; PyTorch is optional.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types
# Pre-tokenizers we rebuild exactly (`tokenizer.ggml.pre`); others are left to transformers.
_BYTE_LEVEL_PRE = ("default", "gpt2", "smollm", "qwen2")
# Qwen2's split regex (its tokenizer.json, and llama.cpp's LLAMA_VOCAB_PRE_TYPE_QWEN2): digits one by one.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def load_tokenizer(folder: str | Path):
    """`AutoTokenizer` for a HF folder, or None (with a warning) when the folder has no tokenizer files."""
    folder = Path(folder)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        log.warning("%s has no tokenizer files (%s); returning no tokenizer.", folder, ", ".join(TOKENIZER_FILES))
        return None
    if (folder / "tokenizer.json").is_file() and _tokenizer_class(folder) in _GENERIC_CLASSES:
        # No model-specific class to pick: skip AutoTokenizer, whose config lookup imports PyTorch if installed (~10 s).
        return fast_tokenizer_class().from_pretrained(str(folder))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


_GENERIC_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def fast_tokenizer_class():
    """transformers' `PreTrainedTokenizerFast`, saying in the log when importing it also imported PyTorch.

    transformers 5.17 imports its GGUF reader, and with it PyTorch, as soon as its tokenizer module loads (5.18 and
    5.25 were seen not to): on the GPU machine, whose image has 5.17 and CUDA PyTorch, a process's first tokenizer
    load took 8.3-9.6 s against 1.2-1.6 s for a later one. The log line names the version and the seconds.
    """
    torch_before = "torch" in sys.modules
    started = time.perf_counter()
    from transformers import PreTrainedTokenizerFast

    if not torch_before and "torch" in sys.modules:
        import transformers

        log.info("importing transformers %s's tokenizer imported PyTorch too (%.1f s in all); transformers 5.18 and "
                 "later load a tokenizer without it", transformers.__version__, time.perf_counter() - started)
    return PreTrainedTokenizerFast


def _tokenizer_class(folder: Path) -> str | None:
    try:
        return json.loads((folder / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None


def tokenizer_from_gguf(source):
    """The tokenizer described by a `GGUFSource`'s metadata, or None when the file has none."""
    meta = source.metadata
    kind = meta.get("tokenizer.ggml.model")
    if kind is None or "tokenizer.ggml.tokens" not in meta:
        log.warning("%s carries no tokenizer; returning no tokenizer.", source.path.name)
        return None
    if kind == "gpt2" and str(meta.get("tokenizer.ggml.pre", "default")) in _BYTE_LEVEL_PRE:
        return _byte_level_bpe(meta)
    return _via_transformers(source.path, kind)


def _byte_level_bpe(meta: dict):
    """GPT-2 style byte-level BPE from `tokenizer.ggml.{tokens,merges,token_type}`.

    SmolLM's pre-tokenizer ('smollm') makes every number character (`\\p{N}`: digits, but also '½',
    'Ⅸ') a piece of its own before the GPT-2 regex, as its original tokenizer.json does
    (Digits(individual_digits) before ByteLevel) and llama.cpp does (LLAMA_VOCAB_PRE_TYPE_SMOLLM:
    "\\p{N}", then the GPT-2 regex). transformers' GGUF reader ignores 'smollm' and uses the GPT-2 regex
    alone, whose " ?\\p{N}+" keeps a space with the number after it. No SmolLM2 merge touches a digit,
    so the ids differ only where that space then merges otherwise: after a longer run of whitespace
    (" \\n\\n\\n 1": ours "ĠĊĊ ĊĠ 1", its "Ġ ĊĊĊ Ġ 1") and before a non-ASCII number (" ½": ours
    "Ġ Â½", its "ĠÂ ½"), 10 places of WikiText-2's test text.

    Qwen2's ('qwen2') is its own split regex plus NFC normalization, as in Qwen's tokenizer.json
    (transformers' GGUF reader leaves NFC out: the two differ only on text that is not NFC already).
    No BOS is added (as transformers does for these files).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    fast_tokenizer = fast_tokenizer_class()

    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pre = meta.get("tokenizer.ggml.pre")
    if pre == "smollm":
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre == "qwen2":
        backend.normalizer = normalizers.NFC()
        split = pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False)
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    else:
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL]
    )
    backend.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED]
    )

    def token(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}")
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    return fast_tokenizer(
        tokenizer_object=backend,
        bos_token=token("bos_token_id"),
        eos_token=token("eos_token_id"),
        unk_token=token("unknown_token_id"),
        pad_token=token("padding_token_id"),
        chat_template=meta.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
    )


def _via_transformers(path: Path, kind: str):
    try:
        import torch  # noqa: F401  (transformers' GGUF reader imports it)
    except ImportError as e:
        raise ImportError(
            f"{path.name} has a {kind!r} vocabulary; lcc_jax rebuilds only byte-level BPE (gpt2) GGUF "
            "vocabularies itself and needs transformers' GGUF reader, which imports PyTorch, for the rest. "
            "Install torch (CPU is enough), load the model's Hugging Face folder instead, or pass "
            "tokenizer=False to lcc_jax.load to skip the tokenizer."
        ) from e
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
