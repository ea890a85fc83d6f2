"""The zero-shot token cache: a new process reads the suite's token pairs back instead of tokenizing again,
and only when the tokenizer, the special-token switch and every request string are the same."""

from __future__ import annotations

import gc
import importlib
import logging

import pytest

from lcc_jax.eval import token_cache
from lcc_jax.eval.loglik import encode_requests
from lcc_jax.tokenizer import load_tokenizer

REQUESTS = [("Question: is the sky blue?\nAnswer:", " yes"), ("Question: is the sky blue?\nAnswer:", " no"),
            ("The cat sat on the ", "mat."), ("", "Only a continuation."), ("Trailing space moves ", "on")]


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LCC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv(token_cache.ENV, "1")
    return tmp_path / "zeroshot_tokens"


@pytest.fixture()
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def counting(tokenizer, requests, special=None):
    calls = []

    def encode():
        calls.append(1)
        return encode_requests(tokenizer, requests, add_special_tokens=special)

    return calls, encode


def test_a_second_read_comes_from_disk_with_the_same_ids(cache, tokenizer, tiny_model_dir):
    calls, encode = counting(tokenizer, REQUESTS)
    first = token_cache.cached_pairs(tokenizer, REQUESTS, None, encode)
    assert len(calls) == 1 and len(list(cache.glob("*.npz"))) == 1
    fresh = load_tokenizer(tiny_model_dir)  # a new process's tokenizer object, same files
    calls, encode = counting(fresh, REQUESTS)
    second = token_cache.cached_pairs(fresh, REQUESTS, None, encode)
    assert calls == [] and second == first == encode_requests(tokenizer, REQUESTS)
    assert all(isinstance(t, int) for pair in second for ids in pair for t in ids)


def test_other_requests_specials_or_tokenizer_miss(cache, tokenizer):
    token_cache.cached_pairs(tokenizer, REQUESTS, None, counting(tokenizer, REQUESTS)[1])
    changed = [*REQUESTS[:-1], ("Trailing space moves ", "off")]
    for requests, special in ((changed, None), (REQUESTS, False)):
        calls, encode = counting(tokenizer, requests, special)
        assert token_cache.cached_pairs(tokenizer, requests, special, encode) == encode_requests(
            tokenizer, requests, add_special_tokens=special)
        assert calls == [1]
    other = load_tokenizer_with_extra_token(tokenizer)
    assert token_cache.tokenizer_fingerprint(other) != token_cache.tokenizer_fingerprint(tokenizer)
    assert len(list(cache.glob("*.npz"))) == 3


def load_tokenizer_with_extra_token(tokenizer):
    import copy

    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<extra_token>"])
    return other


def test_off_by_env_and_for_tokenizers_without_a_serialized_form(cache, tokenizer, monkeypatch):
    class Plain:  # a tokenizer with no `tokenizers` backend
        def __call__(self, texts, **kwargs):
            return tokenizer(texts, **kwargs)

        eos_token_id = tokenizer.eos_token_id

    calls, encode = counting(Plain(), REQUESTS)
    token_cache.cached_pairs(Plain(), REQUESTS, None, encode)
    monkeypatch.setenv(token_cache.ENV, "0")
    token_cache.cached_pairs(tokenizer, REQUESTS, None, counting(tokenizer, REQUESTS)[1])
    assert calls == [1] and not cache.exists()


def test_a_damaged_entry_is_tokenized_again_and_replaced(cache, tokenizer, caplog):
    first = token_cache.cached_pairs(tokenizer, REQUESTS, None, counting(tokenizer, REQUESTS)[1])
    [entry] = cache.glob("*.npz")
    entry.write_bytes(b"not an npz file")
    calls, encode = counting(tokenizer, REQUESTS)
    with caplog.at_level(logging.WARNING, logger="lcc_jax.eval.token_cache"):
        again = token_cache.cached_pairs(tokenizer, REQUESTS, None, encode)
    assert again == first and calls == [1] and "tokenizing again" in caplog.text
    calls, encode = counting(tokenizer, REQUESTS)
    assert token_cache.cached_pairs(tokenizer, REQUESTS, None, encode) == first and calls == []  # rewritten


@pytest.mark.parametrize("collector_on", [True, False])
def test_reading_leaves_the_garbage_collector_as_it_found_it(cache, tokenizer, collector_on):
    token_cache.cached_pairs(tokenizer, REQUESTS, None, counting(tokenizer, REQUESTS)[1])
    [entry] = cache.glob("*.npz")
    was = gc.isenabled()
    (gc.enable if collector_on else gc.disable)()
    try:
        assert token_cache._read(entry) == encode_requests(tokenizer, REQUESTS)  # paused inside, for speed
        assert gc.isenabled() is collector_on
        entry.write_bytes(b"not an npz file")
        with pytest.raises(Exception):  # noqa: B017 - whatever np.load raises, the collector comes back
            token_cache._read(entry)
        assert gc.isenabled() is collector_on
    finally:
        (gc.enable if was else gc.disable)()


def test_zeroshot_encoded_requests_use_the_disk_cache(cache, tokenizer, tiny_model_dir, monkeypatch):
    zeroshot = importlib.import_module("lcc_jax.eval.zeroshot")  # the package re-exports a function of that name
    monkeypatch.setattr(zeroshot, "_encoded_cache", [])
    _, _, pairs = zeroshot.encoded_requests(tokenizer, ["rte"], 8, None)
    monkeypatch.setattr(zeroshot, "_encoded_cache", [])  # a new process
    monkeypatch.setattr(zeroshot, "encode_requests", lambda *a, **k: pytest.fail("tokenized again"))
    _, _, again = zeroshot.encoded_requests(load_tokenizer(tiny_model_dir), ["rte"], 8, None)
    assert again == pairs
