"""Named Llama shapes for the PyTorch reference benchmarks, and the one FLOP formula both sides use.

The weights are random: only the shape matters for speed. `model_flops` is the single place where
FLOPs are counted, so the lcc_jax benchmarks can mirror it exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class Shape:
    """A Llama-family decoder shape (Hugging Face `LlamaConfig` fields under shorter names)."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5

    @property
    def total_heads(self) -> int:
        """L·H: the number of attention heads RestoreLCC ranks."""
        return self.num_layers * self.num_heads

    def layer_params(self) -> int:
        """Matmul weights of one decoder layer: q, k, v, o projections and the gated MLP."""
        q_o = 2 * self.hidden_size * self.num_heads * self.head_dim
        k_v = 2 * self.hidden_size * self.num_kv_heads * self.head_dim
        return q_o + k_v + 3 * self.hidden_size * self.intermediate_size

    def matmul_params(self, lm_head: bool = True) -> int:
        """Weights that take part in matmuls: all decoder layers, plus the lm_head if asked (tied or not).

        The embedding lookup is not a matmul and is never counted.
        """
        head = self.vocab_size * self.hidden_size if lm_head else 0
        return self.num_layers * self.layer_params() + head

    def total_params(self) -> int:
        """Stored parameters (embedding, layers, norms, untied lm_head), as `model.num_parameters()` counts."""
        embed = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        norms = (2 * self.num_layers + 1) * self.hidden_size
        return embed + self.num_layers * self.layer_params() + norms


SHAPES: dict[str, Shape] = {
    s.name: s
    for s in (
        Shape("tiny", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
              num_kv_heads=2, head_dim=16, tie_word_embeddings=True, max_position_embeddings=1024),
        Shape("smollm2-135m", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
              num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0, tie_word_embeddings=True,
              max_position_embeddings=8192),
        Shape("llama2-7b", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
              num_heads=32, num_kv_heads=32, head_dim=128, max_position_embeddings=4096),
        Shape("llama3-8b", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
              num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0, max_position_embeddings=8192),
    )
}


def get_shape(name: str) -> Shape:
    """The named shape, or a ValueError listing the known names."""
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    return SHAPES[name]


def model_flops(shape: Shape, seq_lens: Sequence[int], backward: bool, lm_head: bool = True) -> float:
    """Model FLOPs of a causal forward (and, if `backward`, the backward to activations) over real tokens.

    With P = `shape.matmul_params(lm_head)` and, per sequence of real length T,
    attention A(T) = 2 · L · H · d_h · T² (QKᵀ and PV, 2·T²·H·d_h each, halved for the causal mask):

        forward            2 · P · ΣT + Σ A(T)
        forward+backward   4 · P · ΣT + 3 · Σ A(T)

    The backward computes activation gradients only (the model is frozen, β and b are negligible):
    one matmul per linear (dX = dY·W, no dW) and four per attention (dP, dV, dQ, dK).
    Padding is never counted: these are the model's useful FLOPs, so MFU compares implementations
    that pad differently. Without the attention term the training step is the usual "4·params per
    real token". Capture counts no lm_head (`lm_head=False`): it needs no logits, so a forward that
    computes them anyway (as the reference's does) does work this count leaves out.
    """
    tokens = sum(int(t) for t in seq_lens)
    attention = sum(2.0 * shape.num_layers * shape.num_heads * shape.head_dim * float(t) ** 2 for t in seq_lens)
    linear = 2.0 * shape.matmul_params(lm_head) * tokens
    if backward:
        return 2.0 * linear + 3.0 * attention
    return linear + attention
