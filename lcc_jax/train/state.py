"""Resumable training state: where a run stands, and its Orbax checkpoints.

A checkpoint holds the trainable parameters, the optimizer state, and a JSON record of progress
(optimizer steps, epoch, micro-batches of that epoch consumed, target tokens seen, history, seed,
config). Batches come from a deterministic `train_batches_fn(epoch)`, so (epoch, micro_batch) is the
whole data position and a resumed run sees exactly the batches an uninterrupted one would.

Orbax writes each step into a temporary folder and renames it when complete, so a crash never
leaves a half-written checkpoint, and a step that exists is never written again. Arrays are stored
with their global shapes and restored into the placement of the `*_like` trees, so a run saved on
one mesh (8 devices, two hosts) resumes on another (one device); with several processes each writes
its own shards and all of them must call `save` and `restore`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainProgress:
    """Where a run stands (JSON-serialisable)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch in progress (== epochs when finished)
    micro_batch: int = 0  # micro-batches of `epoch` already consumed
    tokens_seen: int = 0  # real target tokens trained on
    seed: int = 0
    history: dict[str, list[float]] = dataclasses.field(
        default_factory=lambda: {"loss": [], "lr": [], "grad_norm": [], "valid_loss": []}
    )
    config: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainProgress:
        return cls(**data)


class TrainCheckpointer:
    """Orbax CheckpointManager over `directory`: save every so often, restore the latest."""

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 2):
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self.directory = os.fspath(os.path.abspath(directory))
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("params", "progress"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, trainable: Any, opt_state: Any, progress: TrainProgress) -> None:
        """Write (asynchronously) checkpoint number `progress.step`; a step already on disk is left alone."""
        if progress.step in self.manager.all_steps():
            log.info("checkpoint %d exists in %s; not rewriting it", progress.step, self.directory)
            return
        self.manager.save(
            progress.step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave({"trainable": trainable, "opt_state": opt_state}),
                progress=ocp.args.JsonSave(progress.to_json()),
            ),
        )
        log.info("checkpoint %d -> %s", progress.step, self.directory)

    def restore(self, step: int, trainable_like: Any, opt_state_like: Any) -> tuple[Any, Any, TrainProgress]:
        """(trainable, opt_state, progress) of checkpoint `step`, placed like the `*_like` trees."""
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
            {"trainable": trainable_like, "opt_state": opt_state_like},
        )
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract),
                progress=ocp.args.JsonRestore(),
            ),
        )
        params = restored["params"]
        return params["trainable"], params["opt_state"], TrainProgress.from_json(restored["progress"])

    def close(self) -> None:
        """Wait for writes in flight, then release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()
