"""The optax trainer shared by RestoreLCC and every baseline: `fit` trains any pytree of parameters on a frozen
model; its jitted steps (`steps`), what it sets up before its first step and compiling that ahead (`ahead`),
resumable state and Orbax checkpoints (`state`), hyper-parameters and optimizer (`config`), losses (`losses`) and
encoded instruction data (`data`).

    from lcc_jax.train import TrainConfig, epoch_batches, fit
"""

from lcc_jax.train.ahead import BatchesFn, cast_for_compute, precompile_fit
from lcc_jax.train.config import TrainConfig, TrainResult, hf_linear_lr, make_optimizer
from lcc_jax.train.data import TrainingData, TrainingDataError, encode_training_data, pad_id
from lcc_jax.train.losses import mean_next_token_nll, next_token_nll
from lcc_jax.train.trainer import Callback, epoch_batches, evaluate, fit

__all__ = [
    "BatchesFn",
    "Callback",
    "TrainConfig",
    "TrainResult",
    "TrainingData",
    "TrainingDataError",
    "cast_for_compute",
    "encode_training_data",
    "epoch_batches",
    "evaluate",
    "fit",
    "hf_linear_lr",
    "make_optimizer",
    "mean_next_token_nll",
    "next_token_nll",
    "pad_id",
    "precompile_fit",
]
