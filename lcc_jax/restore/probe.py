"""Contrastive probes that rank heads: one logistic regression per head, all heads trained at once (vmap).

Per head, as the reference (`train_probing_classifier`): features [z_pruned(q) + c ; z_dense(q+r)]
(2·d), label 1 for r⁺ and 0 for r⁻; `Linear(2d, 1)` with a bias, PyTorch's default initialisation
(weight and bias ~ U(±1/√(2d))), sigmoid + mean BCE (here in its with-logits form), Adam lr 0.01,
200 full-batch epochs; validation accuracy with σ(logit) ≥ 0.5 is the head's score.
The 70/30 split is by pair (both rows of a pair on one side) and shared by all heads; with the default
seed 42 it is exactly the reference's `train_test_split(range(N), test_size=0.3, random_state=42)`.
Initial weights come from `jax.random` (fold_in(key, head)), not PyTorch's generator.

Ranking: accuracy descending, ties by validation loss ascending, then by head index. The reference
ranks with `torch.topk`, whose tie order is unspecified. Heads are indexed l·H + h; the reference
decodes its ranking with the layer count in place of H, which is right only when L == H.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

log = logging.getLogger(__name__)

HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    """The reference's probe settings."""

    learning_rate: float = 0.01
    epochs: int = 200
    val_fraction: float = 0.3
    split_seed: int = 42  # the reference's random_state
    init_seed: int = 0
    head_chunk: int = 128  # heads trained together (memory: ~3·N·chunk·d floats)


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """Scores of every head (index l·H + h) and the ranking they give."""

    accuracy: np.ndarray  # (heads,) validation accuracy
    val_loss: np.ndarray  # (heads,) validation BCE
    weight: np.ndarray  # (heads, 2d): [on z_pruned + c ; on z_dense(q+r)]
    bias: np.ndarray  # (heads,)
    train_pairs: np.ndarray  # (n_train,) pair indices
    val_pairs: np.ndarray  # (n_val,)

    @property
    def ranking(self) -> np.ndarray:
        """(heads,) head indices, best first."""
        return rank_heads(self.accuracy, self.val_loss)

    def save(self, path) -> None:
        np.savez(path, **dataclasses.asdict(self))

    @classmethod
    def load(cls, path) -> ProbeResult:
        with np.load(path) as f:
            return cls(**{field.name: f[field.name] for field in dataclasses.fields(cls)})


def rank_heads(accuracy: np.ndarray, val_loss: np.ndarray | None = None) -> np.ndarray:
    """Head indices by accuracy (high first), then validation loss (low first), then index."""
    accuracy = np.asarray(accuracy, np.float64)
    loss = np.zeros_like(accuracy) if val_loss is None else np.asarray(val_loss, np.float64)
    return np.lexsort((np.arange(accuracy.size), loss, -accuracy))


def spread_over_layers(ranking: np.ndarray, heads_per_layer: int) -> np.ndarray:
    """`ranking` (l·H + h, best first) re-ordered in rounds: every layer's best head (in `ranking`'s order of those
    heads), then every layer's second best, and so on; a top-k of L·m heads then holds m heads of each layer."""
    ranking = np.asarray(ranking)
    layers = ranking // heads_per_layer
    place_in_layer = np.zeros(len(ranking), np.int64)
    seen: dict[int, int] = {}
    for i, layer in enumerate(layers.tolist()):
        place_in_layer[i] = seen.get(layer, 0)
        seen[layer] = place_in_layer[i] + 1
    return ranking[np.lexsort((np.arange(len(ranking)), place_in_layer))]


def layer_head(index, num_heads: int):
    """Head index l·H + h -> (l, h)."""
    return np.divmod(index, num_heads)


def split_pairs(n: int, val_fraction: float = 0.3, seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) pair indices, as sklearn's `train_test_split(range(n), test_size=val_fraction, random_state=seed)`
    (a RandomState permutation; the first ceil(val_fraction · n) are validation)."""
    n_val = math.ceil(val_fraction * n)
    if n_val < 1 or n - n_val < 1:
        raise ValueError(f"{n} pairs cannot be split {1 - val_fraction:.0%}/{val_fraction:.0%} with both sides filled.")
    order = np.random.RandomState(seed).permutation(n)
    return order[n_val:], order[:n_val]


def train_probes(
    pruned: np.ndarray,  # (N, heads, d): z_pruned(q)
    component: np.ndarray,  # (heads, d): c
    positive: np.ndarray,  # (N, heads, d): z_dense(q + r⁺)
    negative: np.ndarray,  # (N, heads, d): z_dense(q + r⁻)
    config: ProbeConfig = ProbeConfig(),
) -> ProbeResult:
    """Train and score a probe per head (module docstring); heads in chunks, vmapped within a chunk."""
    n, heads, d = pruned.shape
    if positive.shape != pruned.shape or negative.shape != pruned.shape or component.shape != (heads, d):
        raise ValueError(
            f"shapes disagree: pruned {pruned.shape}, positive {positive.shape}, negative {negative.shape}, "
            f"component {component.shape}."
        )
    train, val = split_pairs(n, config.val_fraction, config.split_seed)
    key = jax.random.key(config.init_seed)
    fit = _fit_chunk(config.learning_rate, config.epochs)
    outs = []
    for start in range(0, heads, config.head_chunk):
        chunk = slice(start, min(start + config.head_chunk, heads))
        anchor = _head_major(pruned, chunk) + jnp.asarray(component[chunk], jnp.float32)[:, None]
        keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(chunk.start, chunk.stop))
        out = fit(keys, anchor, _head_major(positive, chunk), _head_major(negative, chunk), train, val)
        outs.append(jax.device_get(out))
    weight, bias, accuracy, loss = (np.concatenate(x) for x in zip(*outs, strict=True))
    result = ProbeResult(accuracy=accuracy, val_loss=loss, weight=weight, bias=bias, train_pairs=train, val_pairs=val)
    best = result.ranking[0]
    log.info("probed %d heads on %d/%d pairs: accuracy mean %.3f, best %.3f (head %d)",
             heads, train.size, val.size, float(accuracy.mean()), float(accuracy[best]), int(best))
    return result


def _head_major(x: np.ndarray, chunk: slice) -> jax.Array:
    """(N, heads, d) -> (chunk, N, d) fp32 for the heads in `chunk`."""
    return jnp.asarray(np.asarray(x[:, chunk], np.float32).transpose(1, 0, 2))


def init_probe(key: jax.Array, d_in: int) -> dict[str, jax.Array]:
    """PyTorch nn.Linear(d_in, 1) default init: weight and bias ~ U(-1/√d_in, 1/√d_in)."""
    bound = 1.0 / math.sqrt(d_in)
    wk, bk = jax.random.split(key)
    return {
        "weight": jax.random.uniform(wk, (d_in,), jnp.float32, -bound, bound),
        "bias": jax.random.uniform(bk, (), jnp.float32, -bound, bound),
    }


def probe_logits(params, anchor, response):
    """Logits of rows [anchor ; response] (..., d) each, without forming the concatenation."""
    d = anchor.shape[-1]
    w = params["weight"]
    return (jnp.dot(anchor, w[:d], precision=HIGHEST) + jnp.dot(response, w[d:], precision=HIGHEST)
            + params["bias"])


def _bce(logits, labels):
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels))


@functools.lru_cache(maxsize=8)
def _fit_chunk(learning_rate: float, epochs: int):
    optimizer = optax.adam(learning_rate)

    def fit_one(key, anchor, positive, negative, train, val):
        """One head: anchor/positive/negative (N, d) -> weight (2d,), bias, val accuracy, val loss."""
        a, p, q = anchor[train], positive[train], negative[train]
        labels = jnp.concatenate([jnp.ones(a.shape[0]), jnp.zeros(a.shape[0])])

        def loss_fn(params):
            return _bce(jnp.concatenate([probe_logits(params, a, p), probe_logits(params, a, q)]), labels)

        def epoch(carry, _):
            params, opt_state = carry
            grads = jax.grad(loss_fn)(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        params = init_probe(key, 2 * anchor.shape[-1])
        (params, _), _ = jax.lax.scan(epoch, (params, optimizer.init(params)), None, length=epochs)
        va, vp, vq = anchor[val], positive[val], negative[val]
        logits = jnp.concatenate([probe_logits(params, va, vp), probe_logits(params, va, vq)])
        val_labels = jnp.concatenate([jnp.ones(va.shape[0]), jnp.zeros(va.shape[0])])
        accuracy = jnp.mean(((jax.nn.sigmoid(logits) >= 0.5) == (val_labels == 1)).astype(jnp.float32))
        return params["weight"], params["bias"], accuracy, _bce(logits, val_labels)

    return jax.jit(jax.vmap(fit_one, in_axes=(0, 0, 0, 0, None, None)))
