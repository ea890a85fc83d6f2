"""The recovery baselines RestoreLCC is compared with, on the shared trainer, data and budget.

Every baseline is (init -> trainable, constants; apply_fn; merge) over the frozen model, trained by
`lcc_jax.train.fit` exactly as RestoreLCC's compensation is:

    LoRA / DoRA / masked LoRA   lora.init_lora, lora.apply_lora,     merge.merge_lora
    LoFiT                       lofit.select_heads, then bias_only.train_compensation on its heads
    bias-only (ablation)        bias_only.init_bias_only, bias_only.apply_compensation
    any per-head vectors        merge.merge_head_vectors (folded into the o_proj bias)

`merge.surviving_sparsity` says how much of the pruning a merged model keeps. `recover.recover_lora` is the masked
LoRA recovery end to end in memory (data, training, merge, audit), the strongest sparsity-keeping one measured.
"""

from lcc_jax.baselines.bias_only import apply_compensation, head_bias, init_bias_only, train_compensation
from lcc_jax.baselines.kernels import TARGETS, with_kernels
from lcc_jax.baselines.lofit import (
    LOFIT_REFERENCE,
    HeadSelection,
    LofitConfig,
    LofitResult,
    apply_head_scaling,
    init_head_scaling,
    rank_heads,
    select_heads,
    train_lofit,
)
from lcc_jax.baselines.lora import (
    ALL_LORA,
    DORA,
    MASKED_LORA,
    PRESETS,
    WANDA_LORA,
    LoraConfig,
    LoraResult,
    LoraSetup,
    apply_lora,
    init_lora,
    num_trainable,
    train_lora,
)
from lcc_jax.baselines.merge import SparsitySurvival, merge_head_vectors, merge_lora, surviving_sparsity
from lcc_jax.baselines.recover import LoraRecovery, RecoverError, recover_lora, train_merged_lora

__all__ = [
    "ALL_LORA",
    "DORA",
    "HeadSelection",
    "LOFIT_REFERENCE",
    "LofitConfig",
    "LofitResult",
    "LoraConfig",
    "LoraRecovery",
    "LoraResult",
    "LoraSetup",
    "MASKED_LORA",
    "PRESETS",
    "RecoverError",
    "SparsitySurvival",
    "TARGETS",
    "WANDA_LORA",
    "apply_compensation",
    "apply_head_scaling",
    "apply_lora",
    "head_bias",
    "init_bias_only",
    "init_head_scaling",
    "init_lora",
    "merge_head_vectors",
    "merge_lora",
    "num_trainable",
    "rank_heads",
    "recover_lora",
    "select_heads",
    "surviving_sparsity",
    "train_compensation",
    "train_lofit",
    "train_lora",
    "train_merged_lora",
    "with_kernels",
]
