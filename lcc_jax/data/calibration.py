"""Calibration token samples for pruning: `nsamples` windows of `seqlen` tokens, seeded as Wanda/SparseGPT do.

Two ways to draw, following the reference loaders (Wanda `lib/data.py`):
  * documents (C4 train): pick a random document longer than `seqlen` tokens, then a random window in it;
  * stream (WikiText-2 train, a text file, Alpaca): tokenize the joined text once, random windows.

The papers calibrate on C4 (`source="c4"`, which needs a local copy or a hub). Offline, the default is
the local Alpaca training set ("alpaca": prompt + response of each sample, joined with "\\n\\n"), the same
text RestoreLCC later trains on; say which you used when you report numbers. "piqa" is the local text that is
neither the recovery set nor one of the seven zero-shot tasks: each PIQA validation goal with its correct
solution (about 1,838 short rows, so 128 x 2,048 windows overlap; the log says how much).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
from pathlib import Path

import numpy as np

from lcc_jax.data.instructions import read_jsonl
from lcc_jax.data.text import TextSourceError, data_dir, data_dir_hint, load_rows
from lcc_jax.errors import UserError
from lcc_jax.fields import described

log = logging.getLogger(__name__)

DEFAULT_CALIBRATION = "alpaca"
_DOCUMENT_SOURCES = ("c4",)


class CalibrationError(UserError):
    """Calibration text that cannot give the samples asked for."""


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    """Where calibration tokens come from and how many."""

    calibration: str = described(DEFAULT_CALIBRATION, "alpaca | piqa | c4 | wikitext2 | a text/jsonl file")
    nsamples: int = described(128, "calibration sequences")
    seqlen: int = described(2048, "tokens per calibration sequence")
    seed: int = described(0, "seed of the window draw")

    def tokens(self, tokenizer) -> np.ndarray:
        return calibration_tokens(tokenizer, self.calibration, nsamples=self.nsamples, seqlen=self.seqlen, seed=self.seed)


def calibration_tokens(
    tokenizer, source: str | os.PathLike = DEFAULT_CALIBRATION, *, nsamples: int = 128, seqlen: int = 2048, seed: int = 0
) -> np.ndarray:
    """(nsamples, seqlen) int32 token windows drawn from `source` with Python's `random` seeded by `seed`."""
    if nsamples < 1 or seqlen < 2:
        raise CalibrationError(f"need nsamples >= 1 and seqlen >= 2 (got {nsamples}, {seqlen}).")
    rng = random.Random(seed)
    if str(source).lower() in _DOCUMENT_SOURCES:
        rows, _ = load_rows(source, "train")
        return _from_documents(tokenizer, rows, nsamples, seqlen, rng)
    ids = _encode(tokenizer, _stream_text(source))
    if len(ids) <= seqlen + 1:
        raise CalibrationError(
            f"calibration text {source!r} has {len(ids)} tokens, fewer than one window of seqlen={seqlen}; "
            "use a longer text or a smaller --calibration-seqlen."
        )
    windows = np.empty((nsamples, seqlen), np.int32)
    for n in range(nsamples):
        start = rng.randint(0, len(ids) - seqlen - 1)
        windows[n] = ids[start : start + seqlen]
    covered = min(1.0, nsamples * seqlen / len(ids))
    log.info("calibration: %d x %d tokens from %s (%d tokens; windows cover up to %.0f%%)", nsamples, seqlen, source, len(ids), 100 * covered)
    return windows


def _from_documents(tokenizer, rows: list[str], nsamples: int, seqlen: int, rng: random.Random) -> np.ndarray:
    windows = np.empty((nsamples, seqlen), np.int32)
    for n in range(nsamples):
        for _attempt in range(100 * len(rows)):
            ids = _encode(tokenizer, rows[rng.randint(0, len(rows) - 1)])
            if len(ids) > seqlen:
                break
        else:
            raise CalibrationError(f"no calibration document is longer than seqlen={seqlen} tokens.")
        start = rng.randint(0, len(ids) - seqlen - 1)
        windows[n] = ids[start : start + seqlen]
    return windows


def _stream_text(source: str | os.PathLike) -> str:
    if str(source).lower() == "alpaca":
        return "\n\n".join(_alpaca_texts(_local_file("alpaca_2000/train.jsonl", "Alpaca")))
    if str(source).lower() == "piqa":
        return "\n\n".join(_piqa_texts(_local_file("eval/piqa/validation.jsonl", "PIQA")))
    if str(source).lower() in ("wikitext2", "wikitext", "wikitext-2"):
        rows, sep = load_rows(source, "train")
        return sep.join(rows)
    rows, sep = load_rows(source, "test")  # a file: the split is ignored
    return sep.join(rows)


def _local_file(relative: str, name: str) -> Path:
    """`$LCC_DATA_DIR/relative`, or an error naming where it was looked for and the fix."""
    root = data_dir()
    path = root / relative if root else None
    if path is None or not path.is_file():
        raise TextSourceError(f"the {name} calibration text was not found (looked at {path}): "
                              f"{data_dir_hint(relative)}; or pass --calibration PATH.")
    return path


def _alpaca_texts(path: Path) -> list[str]:
    texts = []
    for record, where in read_jsonl(path):
        if "prompt" not in record or "response" not in record:
            raise TextSourceError(f"{where} lacks 'prompt' or 'response'.")
        texts.append(record["prompt"] + record["response"])
    return texts


def _piqa_texts(path: Path) -> list[str]:
    """Each PIQA validation goal followed by its correct solution: calibration text outside the recovery set
    (Alpaca) and outside the seven-task suite."""
    texts = []
    for record, where in read_jsonl(path):
        try:
            texts.append(record["goal"] + " " + record[f"sol{int(record['label']) + 1}"])
        except (KeyError, ValueError) as error:
            raise TextSourceError(f"{where} is not a PIQA row with goal, sol1, sol2 and label ({error}).") from None
    return texts


def _encode(tokenizer, text: str) -> np.ndarray:
    return np.asarray(tokenizer(text)["input_ids"], dtype=np.int32).reshape(-1)
