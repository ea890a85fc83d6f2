"""Length-bucketed batching, filler rows, and device prefetch."""

import jax
import numpy as np
import pytest

from lcc_jax.data.batching import Batch, bucket_lengths, make_batches, prefetch


def _data(n=23, seed=0, low=1, high=150):
    rng = np.random.default_rng(seed)
    seqs = [list(rng.integers(3, 100, rng.integers(low, high))) for _ in range(n)]
    masks = [list((rng.random(len(s)) > 0.5).astype(np.float32)) for s in seqs]
    return seqs, masks


def test_bucket_lengths_are_multiples_up_to_rounded_max():
    assert bucket_lengths(500) == (64, 128, 192, 256, 320, 384, 448, 512)
    assert bucket_lengths(128) == (64, 128)
    assert bucket_lengths(10, multiple=16) == (16,)
    with pytest.raises(ValueError):
        bucket_lengths(0)


@pytest.mark.parametrize("order", ["length", "shuffle", "given"])
def test_every_sample_appears_once_with_its_tokens_and_loss_mask(order):
    seqs, masks = _data()
    batches = make_batches(seqs, 4, pad_id=0, loss_masks=masks, order=order, seed=3)
    seen = []
    for b in batches:
        assert b.tokens.shape == b.attention_mask.shape == b.loss_mask.shape == (4, b.tokens.shape[1])
        assert b.tokens.dtype == np.int32 and b.attention_mask.dtype == np.int32
        assert b.loss_mask.dtype == np.float32 and b.index.dtype == np.int32
        assert b.tokens.shape[1] in bucket_lengths(max(map(len, seqs)))
        for row, i in enumerate(b.index):
            if i < 0:
                continue
            seen.append(int(i))
            n = len(seqs[i])
            np.testing.assert_array_equal(b.tokens[row, :n], seqs[i])
            np.testing.assert_array_equal(b.tokens[row, n:], 0)
            np.testing.assert_array_equal(b.attention_mask[row], np.arange(b.tokens.shape[1]) < n)
            np.testing.assert_array_equal(b.loss_mask[row, :n], masks[i])
            np.testing.assert_array_equal(b.loss_mask[row, n:], 0)
    assert sorted(seen) == list(range(len(seqs)))


def test_each_batch_takes_the_smallest_bucket_that_holds_its_longest_row():
    seqs, _ = _data(n=40)
    for order in ("shuffle", "given", "length"):
        for b in make_batches(seqs, 8, pad_id=0, buckets=(64, 128, 192), order=order):
            longest = max(len(seqs[i]) for i in b.index if i >= 0)
            assert b.tokens.shape[1] == min(x for x in (64, 128, 192) if x >= longest)


def test_orders():
    seqs, _ = _data(n=10)
    given = np.concatenate([b.index for b in make_batches(seqs, 3, pad_id=0, order="given")])
    assert given[:10].tolist() == list(range(10))
    by_length = np.concatenate([b.index for b in make_batches(seqs, 3, pad_id=0, order="length")])[:10]
    assert [len(seqs[i]) for i in by_length] == sorted(map(len, seqs), reverse=True)
    a = [b.index.tolist() for b in make_batches(seqs, 3, pad_id=0, order="shuffle", seed=1)]
    again = [b.index.tolist() for b in make_batches(seqs, 3, pad_id=0, order="shuffle", seed=1)]
    other = [b.index.tolist() for b in make_batches(seqs, 3, pad_id=0, order="shuffle", seed=2)]
    assert a == again and a != other


def test_filler_rows_keep_the_batch_size_and_one_visible_key():
    seqs, masks = _data(n=10)
    batches = make_batches(seqs, 4, pad_id=7, loss_masks=masks, order="given")
    last = batches[-1]
    assert len(batches) == 3 and last.tokens.shape[0] == 4 and last.num_real == 2
    assert last.index.tolist()[2:] == [-1, -1]
    np.testing.assert_array_equal(last.tokens[2:], 7)
    np.testing.assert_array_equal(last.loss_mask[2:], 0)
    np.testing.assert_array_equal(last.attention_mask[2:, 0], 1)  # no query attends to nothing
    np.testing.assert_array_equal(last.attention_mask[2:, 1:], 0)
    short = make_batches(seqs, 4, pad_id=7, order="given", fill_last=False)[-1]
    assert short.tokens.shape[0] == 2 and short.loss_mask is None


def test_rejects_too_long_empty_and_mismatched_rows():
    with pytest.raises(ValueError, match="longer than the largest bucket"):
        make_batches([[1] * 70], 2, pad_id=0, buckets=(64,))
    with pytest.raises(ValueError, match="empty"):
        make_batches([[1], []], 2, pad_id=0)
    with pytest.raises(ValueError, match="lengths differ"):
        make_batches([[1, 2]], 2, pad_id=0, loss_masks=[[1.0]])
    assert make_batches([], 2, pad_id=0) == []


def test_prefetch_places_batches_in_order_and_passes_errors_on():
    seqs, masks = _data(n=9)
    batches = make_batches(seqs, 4, pad_id=0, loss_masks=masks, order="given")
    out = list(prefetch(batches, size=2))
    assert len(out) == len(batches)
    for host, dev in zip(batches, out):
        assert isinstance(dev, Batch) and isinstance(dev.tokens, jax.Array)
        np.testing.assert_array_equal(np.asarray(dev.tokens), host.tokens)
        np.testing.assert_array_equal(np.asarray(dev.loss_mask), host.loss_mask)
        np.testing.assert_array_equal(dev.index, host.index)
    trees = list(prefetch(({"x": np.full(3, i)} for i in range(5)), size=1))
    assert [int(t["x"][0]) for t in trees] == list(range(5))

    def broken():
        yield {"x": np.zeros(2)}
        raise RuntimeError("host side failed")

    with pytest.raises(RuntimeError, match="host side failed"):
        list(prefetch(broken()))


def test_prefetch_shards_over_a_mesh():
    from lcc_jax.sharding import batch_sharding, make_mesh

    mesh = make_mesh()
    seqs, _ = _data(n=16)
    (first, *_) = list(prefetch(make_batches(seqs, 8, pad_id=0), sharding=batch_sharding(mesh)))
    assert first.tokens.sharding.is_equivalent_to(batch_sharding(mesh), 2)
    assert len(first.tokens.addressable_shards) == len(jax.devices())
