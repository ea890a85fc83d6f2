"""RestoreConfig: every setting of the RestoreLCC job, with the paper's defaults (and its ablation switches)."""

from __future__ import annotations

import dataclasses

from lcc_jax.errors import UserError
from lcc_jax.fields import described
from lcc_jax.restore.top_k import TopK
from lcc_jax.train.config import TrainConfig

# Counts that must be at least 1 (checked here, so a bad flag fails before the model loads).
_POSITIVE = ("num_train", "num_probe", "max_length", "capture_length", "components", "epochs", "batch_size",
             "grad_accum", "capture_batch_size", "eval_seqlen")


@dataclasses.dataclass(frozen=True)
class RestoreConfig:
    """What RestoreLCC restores and how (defaults: the paper's general-recovery setting)."""

    train_data: str = described("alpaca", "alpaca | a prompt/response .jsonl | a task name (task-specific mode)")
    train_split: str = described("train", "split of a task or hub set (local zero-shot files: validation/test)")
    num_train: int = described(2000, "training samples (paper: 2,000 Alpaca; task-specific: ~100)")
    num_probe: int = described(1000, "probing samples: the first N training samples")
    valid_data: str | None = described("alpaca", "validation samples (alpaca: valid.jsonl); 'none' to skip")
    num_valid: int = described(1760, "validation samples")
    max_length: int = described(500, "tokens per training sample (truncated from the right)")
    capture_length: int = described(512, "tokens per probing text")
    negatives: str = described("auto", "negatives of the probing pairs: auto (all-MiniLM-L6-v2 when installed, "
                               "else the dense model) | minilm | model")
    top_k: TopK | int | float | str = described(0.25, "heads to compensate: a count (68) or a fraction of all L*H heads "
                                         "(0.25, 25%; 1.0 = every head)")
    components: int = described(10, "K: singular directions summed into the probe-time component (paper 1, code 10)")
    mode: str = described("full", "full (beta and b) | bias_only (no beta*V) | no_bias (no b)")
    random_heads: bool = described(False, "ablation: random heads instead of the probe ranking")
    spread_heads: bool = described(False, "take the probe ranking's best head of every layer, then every layer's "
                                   "second best, ...: top-k heads spread over all layers (README, ablation)")
    init_std: float = described(1e-3, "std of the N(0, std) init of beta and b")
    learning_rate: float = described(1e-3, "AdamW learning rate (linear decay to 0)")
    epochs: int = described(3, "training epochs")
    batch_size: int = described(8, "training batch")
    grad_accum: int = described(1, "micro-batches per optimizer step")
    capture_batch_size: int = described(16, "sequences per capture step")
    compute_dtype: str = described("bfloat16", "bfloat16 | float32 compute while training")
    param_dtype: str = described("float32", "float32 | bfloat16: beta, b and AdamW's moments while training (the "
                                 "reference code trains them in bfloat16)")
    remat: bool = described(False, "recompute layers in the backward pass (less memory)")
    seed: int = described(42, "data order and compensation init")
    probe_seed: int = described(0, "init of the head probes: fixed by default, so every --seed trains the same heads "
                                   "(the reference's seed sets its probes' init too; pass --probe-seed SEED for that)")
    eval_seqlen: int = described(2048, "WikiText-2 chunk length")
    eval_limit_chunks: int | None = described(None, "evaluate only the first N chunks (default: all)")

    def __post_init__(self):
        if self.mode not in ("full", "bias_only", "no_bias"):
            raise UserError(f"mode (--mode) must be full, bias_only or no_bias, not {self.mode!r}.")
        for name in ("compute_dtype", "param_dtype"):
            if getattr(self, name) not in ("bfloat16", "float32"):
                raise UserError(f"{name} (--{name.replace('_', '-')}) must be bfloat16 or float32, "
                                f"not {getattr(self, name)!r}.")
        if self.spread_heads and self.random_heads:
            raise UserError("spread_heads (--spread-heads) orders the probe ranking, random_heads (--random-heads) "
                            "replaces it: pass one of them.")
        if self.negatives not in ("auto", "minilm", "model"):
            raise UserError(f"negatives (--negatives) must be auto, minilm or model, not {self.negatives!r}.")
        for name in _POSITIVE:
            if getattr(self, name) < 1:
                raise UserError(f"{name} (--{name.replace('_', '-')}) must be at least 1, not {getattr(self, name)}.")
        if not self.learning_rate > 0:
            raise UserError(f"learning_rate (--learning-rate) must be positive, not {self.learning_rate}.")
        if self.num_probe > self.num_train:
            raise UserError(f"num_probe ({self.num_probe}) cannot exceed num_train ({self.num_train}); lower "
                            "--num-probe or raise --num-train.")
        object.__setattr__(self, "top_k", TopK.parse(self.top_k))  # a TopK from here on: a count or a fraction

    @staticmethod
    def unprobed_num_probe(num_train: int, num_probe: int | None = None) -> int:
        """num_probe for a run that probes nothing (the LoRA-family baselines): the default (or `num_probe`) held
        at `num_train`, so a small --num-train alone is accepted instead of failing the num_probe check."""
        return min(RestoreConfig.num_probe if num_probe is None else num_probe, num_train)

    def train_config(self, learning_rate: float | None = None) -> TrainConfig:
        """The trainer's configuration for this budget (epochs, batch, accumulation, dtype, remat, seed);
        `learning_rate` overrides this one (the baselines train with their own)."""
        return TrainConfig(learning_rate=self.learning_rate if learning_rate is None else learning_rate,
                           epochs=self.epochs, batch_size=self.batch_size, grad_accum=self.grad_accum,
                           compute_dtype=self.compute_dtype, param_dtype=self.param_dtype, remat=self.remat,
                           seed=self.seed)


# Named settings of the recovery (what `--preset` sets; flags given explicitly still win):
#  paper:  the paper's general recovery (top 25 % of heads by the probes, lr 1e-3): the defaults above;
#  recipe: the lowest Alpaca validation loss of the ablation (results/smollm2/ablation): every head, lr 5e-3.
#          With every head compensated the probe ranking no longer chooses anything.
#  quick:  a faithful small run of the whole job (every stage, the same method and schedule) for a CPU or a first
#          try: 48 samples (32 probed), 128-token samples, 256-token captures, 2 epochs, 8 WikiText-2 chunks of
#          512 tokens, remat (the same numbers in half the memory); with PRESET_EXTRAS' calibration of 8 x 512
#          tokens SmolLM2-135M restores in a few minutes on 2 CPU cores (README, "On a CPU"). Its perplexities
#          show the pipeline works, not the paper's numbers.
PRESETS: dict[str, dict[str, object]] = {
    "paper": {},
    "recipe": {"top_k": 1.0, "learning_rate": 5e-3},
    "quick": {"num_train": 48, "num_probe": 32, "num_valid": 16, "max_length": 128, "capture_length": 256,
              "epochs": 2, "eval_seqlen": 512, "eval_limit_chunks": 8, "remat": True},
}
# What a preset sets beyond RestoreConfig, by the scripts' flag names: calibration (CalibrationConfig) and the
# recovery benchmark's zero-shot documents per task, seeds and pruning settings. Each script takes the flags it has.
PRESET_EXTRAS: dict[str, dict[str, object]] = {
    "quick": {"nsamples": 8, "seqlen": 512, "limit": 50, "seeds": "0", "settings": "wanda:0.5"},
}
PRESET_FLAGS: dict[str, dict[str, object]] = {name: {**values, **PRESET_EXTRAS.get(name, {})}
                                              for name, values in PRESETS.items()}


def preset(name: str, **overrides) -> RestoreConfig:
    """RestoreConfig of a named preset (`PRESETS`), with keyword overrides."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}.")
    return RestoreConfig(**{**PRESETS[name], **overrides})
