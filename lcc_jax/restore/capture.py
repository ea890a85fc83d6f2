"""Last-token per-head activations (the o_proj inputs) of many sequences, and the four sets RestoreLCC needs.

Sequences run in length buckets (`make_batches(order="length")`, the ladder `choose_buckets` picks),
right-padded, through `lcc_jax.data.runner.Runner`: each bucket shape compiles once, ahead of time and
concurrently, and is reused across calls (dense and pruned models share it when their graphs match).
Only the last-token heads leave the device, fetched one batch behind the one running. Results come back
in input order.

`CaptureSet` holds dense(q), dense(q+r⁺), dense(q+r⁻) and pruned(q), each (N, L·H, head_dim) fp32, as
.npy files in a folder, written atomically: the dense ones are collected before pruning so the dense
and pruned weights never share the device.

Structured pruning removes whole heads; `head_map` (layers, heads_pruned) names, for each head of the
pruned model, the dense head it came from, and `align_heads` gathers the dense sets to match, so every
later stage works in the pruned model's head index l·H_pruned + j.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from lcc_jax.data.batching import make_batches
from lcc_jax.data.negatives import Embedder
from lcc_jax.data.runner import Runner, batch_rows, choose_buckets, ladder
from lcc_jax.errors import UserError
from lcc_jax.models.llama import last_token_positions

log = logging.getLogger(__name__)

def capture_buckets(lengths: Sequence[int] | int, batch_size: int = 16, backend: str | None = None) -> tuple[int, ...]:
    """Bucket lengths for these sequence lengths (or the longest alone: the finest ladder), by `choose_buckets`."""
    if isinstance(lengths, int):
        return ladder(lengths)
    return choose_buckets(lengths, batch_size, backend=backend)


class CaptureError(UserError):
    """Inputs that cannot be captured, or capture files that do not fit together."""


# ---------------------------------------------------------------------------------- running


def encode_texts(tokenizer, texts: Sequence[str], max_length: int = 512) -> list[np.ndarray]:
    """Token ids of each text with the tokenizer's default special tokens, cut to the first `max_length`
    (the reference tokenizes one text at a time with truncation=True, max_length=512)."""
    ids = tokenizer(list(texts))["input_ids"]
    out = [np.asarray(s, np.int32)[:max_length] for s in ids]
    if any(s.size == 0 for s in out):
        raise CaptureError("a text tokenized to no tokens; captures need at least one token per text.")
    return out


def run_batched(
    model: nnx.Module,
    sequences: Sequence[Sequence[int]],
    fn: Callable,
    *,
    batch_size: int = 8,
    mesh: Mesh | None = None,
    buckets: Sequence[int] | None = None,
    pad_id: int = 0,
    desc: str = "",
) -> np.ndarray:
    """`fn(model, tokens, mask) -> (batch, ...)` over all sequences, batched in length buckets; (N, ...) in input order.

    `fn` must be a module-level function (its jitted form is cached per model graph). With a mesh,
    batches are split over its batch axes (`batch_size` rounded up to a multiple of their size).
    """
    if len(sequences) == 0:
        raise CaptureError("no sequences to run.")
    batch_size = batch_rows(batch_size, mesh, CaptureError)
    buckets = tuple(buckets) if buckets is not None else capture_buckets([len(s) for s in sequences], batch_size)
    batches = make_batches(list(sequences), batch_size, pad_id=pad_id, buckets=buckets, order="length")
    out: np.ndarray | None = None

    def store(index: np.ndarray, result: np.ndarray) -> int:
        nonlocal out
        if out is None:
            out = np.empty((len(sequences), *result.shape[1:]), result.dtype)
        real = index >= 0
        out[index[real]] = result[real]
        return int(real.sum())

    runner = Runner(model, _tokens_and_mask(fn), mesh=mesh)
    runner.run([(b.index, dict(tokens=b.tokens, mask=b.attention_mask)) for b in batches], store,
               desc=desc or "capture", total=len(sequences))
    return out


@functools.lru_cache(maxsize=16)
def _tokens_and_mask(fn: Callable):
    """`fn(model, tokens, mask)` as a runner step (one per `fn`, so its compiles are cached)."""

    def step(model, arrays, model_kwargs):
        return fn(model, arrays["tokens"], arrays["mask"])

    step.__name__ = getattr(fn, "__name__", "capture")
    return step


def last_token_heads(model: nnx.Module, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """(batch, L·H, head_dim) fp32: each row's o_proj input at its last real token, head index l·H + h."""
    out = model(tokens, mask, capture=last_token_positions(mask), return_logits=False)
    heads = out.heads[:, :, 0]  # (layers, batch, heads, head_dim)
    layers, batch, num_heads, head_dim = heads.shape
    return heads.transpose(1, 0, 2, 3).reshape(batch, layers * num_heads, head_dim).astype(jnp.float32)


def capture_last_token(
    model: nnx.Module,
    inputs: Sequence[str] | Sequence[Sequence[int]],
    batch_size: int = 8,
    *,
    tokenizer=None,
    mesh: Mesh | None = None,
    buckets: Sequence[int] | None = None,
    max_length: int = 512,
    desc: str = "capture",
) -> np.ndarray:
    """(N, L·H, head_dim) fp32 last-real-token per-head o_proj inputs of texts (with `tokenizer`) or token ids."""
    if tokenizer is not None:
        sequences = encode_texts(tokenizer, inputs, max_length)
    else:
        if inputs and isinstance(inputs[0], str):
            raise CaptureError("got texts but no tokenizer; pass tokenizer= or token id sequences.")
        sequences = [np.asarray(s, np.int32)[:max_length] for s in inputs]
    pad_id = getattr(getattr(model, "config", None), "pad_token_id", None) or 0
    return run_batched(model, sequences, last_token_heads, batch_size=batch_size, mesh=mesh, buckets=buckets,
                       pad_id=pad_id, desc=desc)


# ---------------------------------------------------------------------------------- the four sets

SET_NAMES = ("dense_prompt", "dense_positive", "dense_negative", "pruned_prompt")


@dataclasses.dataclass(frozen=True)
class CaptureSet:
    """RestoreLCC's activation sets, each (N, heads, head_dim) fp32; any may be absent while collecting."""

    dense_prompt: np.ndarray | None = None  # dense model on q: (N, L·H, d)
    dense_positive: np.ndarray | None = None  # dense model on q + r⁺
    dense_negative: np.ndarray | None = None  # dense model on q + r⁻
    pruned_prompt: np.ndarray | None = None  # pruned model on q: (N, L·H_pruned, d)
    head_map: np.ndarray | None = None  # (L, H_pruned) int: dense head of each pruned head (structured pruning)

    def replace(self, **changes) -> CaptureSet:
        return dataclasses.replace(self, **changes)

    def missing(self) -> list[str]:
        return [name for name in SET_NAMES if getattr(self, name) is None]

    def save(self, folder: str | os.PathLike) -> Path:
        """Write each present array to `folder/<name>.npy` atomically (temporary file, then rename)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in (*SET_NAMES, "head_map"):
            value = getattr(self, name)
            if value is not None:
                save_npy(folder / f"{name}.npy", np.asarray(value))
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, mmap: bool = False) -> CaptureSet:
        """The sets present in `folder` (the others None); `mmap` maps them instead of reading them."""
        folder = Path(folder)
        found = {}
        for name in (*SET_NAMES, "head_map"):
            path = folder / f"{name}.npy"
            if path.is_file():
                found[name] = np.load(path, mmap_mode="r" if mmap and name != "head_map" else None)
        return cls(**found)

    def aligned(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(dense(q), dense(q+r⁺), dense(q+r⁻), pruned(q)), the dense ones gathered to the pruned heads."""
        if self.missing():
            raise CaptureError(f"capture set lacks {self.missing()}.")
        dense = [self.dense_prompt, self.dense_positive, self.dense_negative]
        if len({d.shape for d in dense}) != 1 or dense[0].shape[0] != self.pruned_prompt.shape[0]:
            raise CaptureError(
                f"capture sets disagree in shape: dense {[d.shape for d in dense]}, pruned {self.pruned_prompt.shape}; "
                "they must come from the same pairs."
            )
        if self.head_map is not None:
            dense = [align_heads(d, self.head_map) for d in dense]
        if dense[0].shape != self.pruned_prompt.shape:
            raise CaptureError(
                f"dense sets have shape {dense[0].shape} but pruned(q) has {self.pruned_prompt.shape}; a structurally "
                "pruned model needs head_map (layers, heads_pruned)."
            )
        return dense[0], dense[1], dense[2], np.asarray(self.pruned_prompt)


def align_heads(dense: np.ndarray, head_map: np.ndarray) -> np.ndarray:
    """(N, L·H, d) dense activations -> (N, L·H_pruned, d): pruned head (l, j) gets its dense origin.

    head_map (layers, heads_pruned) holds each kept head's dense index, either global (l·H + h, as
    structured pruning records it) or within its layer (h).
    """
    head_map = np.asarray(head_map)
    n, total, d = dense.shape
    if head_map.ndim != 2 or total % head_map.shape[0]:
        raise CaptureError(f"head_map must be (layers, heads_pruned); got {head_map.shape} for {total} dense heads.")
    layers, kept = head_map.shape
    heads = total // layers
    offsets = np.arange(layers)[:, None] * heads
    if np.all((head_map >= offsets) & (head_map < offsets + heads)):
        head_map = head_map - offsets  # global l·H + h -> h
    elif head_map.min() < 0 or head_map.max() >= heads:
        raise CaptureError(
            f"head_map holds indices outside each layer's heads (global l*{heads}+h or local [0, {heads}))."
        )
    grouped = np.asarray(dense).reshape(n, layers, heads, d)
    return np.take_along_axis(grouped, head_map[None, :, :, None].astype(np.int64), axis=2).reshape(n, layers * kept, d)


def capture_dense(model, tokenizer, pairs, batch_size: int = 8, *, mesh=None, max_length: int = 512) -> CaptureSet:
    """dense(q), dense(q+r⁺), dense(q+r⁻) of `pairs` (objects with .prompt, .positive, .negative)."""
    run = functools.partial(capture_last_token, model, batch_size=batch_size, tokenizer=tokenizer, mesh=mesh,
                            max_length=max_length)
    return CaptureSet(
        dense_prompt=run([p.prompt for p in pairs], desc="dense q"),
        dense_positive=run([p.prompt + p.positive for p in pairs], desc="dense q+r+"),
        dense_negative=run([p.prompt + p.negative for p in pairs], desc="dense q+r-"),
    )


def capture_pruned(model, tokenizer, pairs, batch_size: int = 8, *, mesh=None, max_length: int = 512) -> np.ndarray:
    """pruned(q) of `pairs`: (N, L·H_pruned, d)."""
    return capture_last_token(model, [p.prompt for p in pairs], batch_size, tokenizer=tokenizer, mesh=mesh,
                              max_length=max_length, desc="pruned q")


def model_embedder(model, tokenizer, batch_size: int = 16, max_length: int = 512, mesh=None) -> Embedder:
    """Mean-pooled, L2-normalised final hidden states of an lcc_jax CausalLM (jitted per length bucket): the
    sentence embedder of `data.negatives` when all-MiniLM-L6-v2 is missing, or when negatives='model'."""

    def embed(texts: Sequence[str]) -> np.ndarray:
        sequences = encode_texts(tokenizer, texts, max_length)
        return run_batched(model, sequences, _mean_hidden, batch_size=batch_size, mesh=mesh, desc="embed")

    return embed


def _mean_hidden(model, tokens, mask):
    hidden = model(tokens, mask, return_logits=False).hidden.astype(jnp.float32)  # (b, seq, embed)
    weight = mask.astype(jnp.float32)[..., None]
    pooled = (hidden * weight).sum(1) / jnp.maximum(weight.sum(1), 1.0)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def save_npy(path: Path, array: np.ndarray) -> None:
    """np.save to `path` atomically: a reader sees the old file or the whole new one, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
