"""What every cell of a recovery benchmark shares, read once per process: the dense model and its tokenizer,
the current setting's pruned checkpoint, and the training data of each seed.

Cells used to load the pruned checkpoint (and with it a new tokenizer) from disk, and the RestoreLCC job the
dense model too, in every cell; a new tokenizer object also missed the per-tokenizer caches of WikiText-2's
tokens and of the zero-shot requests (`eval.perplexity.wikitext2_test_ids`, `eval.zeroshot.encoded_requests`),
so every cell tokenized both again. Here one tokenizer serves every cell.

Every model handed out is a copy with its own variables, so a method cannot see another's changes: the pruned
checkpoint's copies share its (immutable) weight arrays; the dense model is kept in host memory between uses
and placed on the device(s) afresh for each (pruning donates its arrays, and a resident dense model would
double the weights' device memory while a pruned one is in use). With several JAX processes, whose arrays no
single process holds, the dense model is read from its source again instead.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from lcc_jax.benchmark.config import RecoveryConfig, compute_dtype
from lcc_jax.checkpoint import PrunedCheckpoint, load_pruned
from lcc_jax.convert.load import load
from lcc_jax.restore.config import RestoreConfig
from lcc_jax.restore.steps import training_data

log = logging.getLogger(__name__)


class Loaded:
    """The dense model, tokenizer, pruned checkpoint and training data of one benchmark run, read once."""

    def __init__(self, source: str, config: RecoveryConfig, mesh=None):
        self.source, self.config, self.mesh = source, config, mesh
        self._tokenizer = None
        self._dense: tuple[nnx.GraphDef, Any, Any] | None = None  # graphdef, host state, shardings
        self._pruned: tuple[Path, PrunedCheckpoint] | None = None
        self._data: dict[str, Any] = {}

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self.dense()
        return self._tokenizer

    def dense(self) -> nnx.Module:
        """A dense model of its own (free to prune in place); the source is read on the first call only."""
        if self._dense is None or jax.process_count() > 1:
            model, tokenizer, _ = load(self.source, dtype=compute_dtype(self.config), mesh=self.mesh)
            if self._tokenizer is None:
                self._tokenizer = tokenizer
            if jax.process_count() == 1:
                graphdef, state = nnx.split(model)
                shardings = jax.tree.map(lambda x: x.sharding if isinstance(x, jax.Array) else None, state)
                host = jax.tree.map(lambda x: np.array(x) if isinstance(x, jax.Array) else x, state)  # a copy: on a
                self._dense = (graphdef, host, shardings)  # CPU a view would see the buffers pruning donates
            return model
        graphdef, host, shardings = self._dense
        state = jax.tree.map(lambda x, s: jax.device_put(x, s) if isinstance(x, np.ndarray) else x, host, shardings)
        return nnx.merge(graphdef, state)

    def pruned(self, folder: Path) -> PrunedCheckpoint:
        """A copy of the setting's pruned checkpoint (read once per setting) with the shared tokenizer."""
        folder = Path(folder)
        if self._pruned is None or self._pruned[0] != folder:
            self._pruned = None  # the previous setting's weights go before this one's come
            checkpoint = load_pruned(folder, dtype=compute_dtype(self.config), mesh=self.mesh)
            self._pruned = (folder, dataclasses.replace(checkpoint, tokenizer=self.tokenizer))
        checkpoint = self._pruned[1]
        return dataclasses.replace(checkpoint, model=nnx.merge(*nnx.split(checkpoint.model)))

    def training_data(self, restore: RestoreConfig):
        """`restore.steps.training_data` of this configuration (seed included), encoded once."""
        key = repr(restore)
        if key not in self._data:
            self._data[key] = training_data(restore, self.tokenizer)
        return self._data[key]

    def for_job(self, pruned_dir: Path) -> dict[str, Any]:
        """`Job.preloaded` of a RestoreLCC job on this benchmark's model and a setting's pruned checkpoint."""
        return {self.source: (self.dense(), self.tokenizer), str(pruned_dir): self.pruned(pruned_dir)}
