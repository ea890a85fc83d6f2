"""How much work each lcc_jax benchmark stage does, per shape, and the context the stages share.

The sizes follow the PyTorch reference's defaults (`benchmarks.reference_torch.config.BenchConfig`)
where the two are compared, and the job's own defaults (`RestoreConfig`, `CalibrationConfig`, `PruneConfig`)
wherever a size is the job's, read from them rather than restated; the `tiny` shape gets small sizes so every
stage runs in seconds on a CPU.
"""

from __future__ import annotations

import dataclasses
import logging

import jax.numpy as jnp

from benchmarks.common import Shape, get_shape, measure_peak_tflops, random_model
from lcc_jax.data.calibration import CalibrationConfig
from lcc_jax.models import CausalLM
from lcc_jax.pruning.api import PruneConfig
from lcc_jax.restore.config import RestoreConfig
from lcc_jax.restore.top_k import TopK

log = logging.getLogger("benchmarks")

PAPER = RestoreConfig()  # the job's defaults: the paper's general recovery
CALIBRATION = CalibrationConfig()


@dataclasses.dataclass(frozen=True)
class Workload:
    """Sizes of every stage (defaults: the real shapes on a GPU)."""

    seed: int = 0
    # capture: Alpaca-prompt-like lengths, uniform in [min, max] (the reference's capture set)
    capture_samples: int = 1024
    capture_batch: int = 64
    capture_min_len: int = 50
    capture_max_len: int = 150
    # compensation training steps: lengths uniform in [min, max], batch 8, top 25 % of heads
    train_steps: int = 30
    train_batch: int = PAPER.batch_size
    train_min_len: int = 120
    train_max_len: int = PAPER.max_length
    top_k: TopK = PAPER.top_k
    train_pack: bool = True  # False: right-padded length buckets instead of packed rows
    # the compensated heads: the top_k of a real run's ranking of this shape's heads (its probes.npz, or a .npy of
    # head indices, best first), else of a random ranking restricted to layers >= train_lowest_layer
    train_ranking: str | None = None
    train_lowest_layer: int = 0
    train_compare_cut: bool = True  # also time the same fit with the backward pass through every layer
    attention_check: bool = False  # compare cuDNN and XLA attention on a two-layer model (costs ~4 min on 7B; --set)
    # Wanda / SparseGPT calibration windows
    nsamples: int = 32
    seqlen: int = CALIBRATION.seqlen
    prune_batch: int = PruneConfig().batch_size
    layer_patterns: tuple[str, ...] = ("unstructured", "2:4")
    model_patterns: tuple[str, ...] = ("unstructured",)
    sparsegpt_model_layers: int | None = None  # prune only the first N layers and extrapolate (None: all)
    # the whole job: the paper's general recovery
    probe_samples: int = PAPER.num_probe
    job_train_samples: int = PAPER.num_train
    job_epochs: int = PAPER.epochs
    job_max_len: int = PAPER.max_length
    probe_max_len: int = PAPER.capture_length
    job_capture_batch: int = 32
    job_calibration: int = CALIBRATION.nsamples  # Wanda calibration windows of `seqlen` tokens
    job_compile_ahead: bool = True  # compile the train step while capture runs (train.precompile_fit)

    def replace(self, **changes) -> Workload:
        return dataclasses.replace(self, **changes)


TINY = Workload(capture_samples=40, capture_batch=8, train_steps=3, train_batch=4, train_min_len=12,
                train_max_len=40, nsamples=4, seqlen=32, prune_batch=2, probe_samples=24, job_train_samples=16,
                job_epochs=1, job_max_len=48, probe_max_len=48, job_capture_batch=8, job_calibration=4)


def default_workload(shape: str) -> Workload:
    if shape == "tiny":
        return TINY
    if shape == "llama2-7b" or shape == "llama3-8b":
        return Workload(sparsegpt_model_layers=8)  # 8 of 32 layers, extrapolated: keeps the GPU run short
    return Workload()


@dataclasses.dataclass
class Context:
    """One shape's benchmark state: the workload, the measured bf16 peak, and the random model (built once)."""

    shape: Shape
    work: Workload
    peak_tflops: float | None = None
    profile_dir: str | None = None  # profile one extra run of capture and train_step here (benchmarks.profile)
    _model: CausalLM | None = None

    @classmethod
    def create(cls, shape: str, work: Workload | None = None, peak_tflops: float | None = None,
               profile_dir: str | None = None) -> Context:
        peak = peak_tflops if peak_tflops is not None else measure_peak_tflops()
        return cls(get_shape(shape), work or default_workload(shape), peak, profile_dir)

    def profile(self, stage: str, fn) -> dict | None:
        """The device-time summary of one more run of `fn` (None without a profile folder; errors are reported)."""
        if self.profile_dir is None:
            return None
        from benchmarks.profile import profiled

        try:
            return profiled(fn, f"{self.profile_dir}/{self.shape.name}_{stage}")
        except Exception as e:  # a profile is extra information, never a reason to lose the measurement
            log.warning("profiling %s failed: %s", stage, e)
            return {"error": str(e)}

    @property
    def model(self) -> CausalLM:
        """The shape's random bf16 model (stages may prune it in place: speed does not depend on values)."""
        if self._model is None:
            self._model = random_model(self.shape, jnp.bfloat16, self.work.seed)
        return self._model
