"""One compensation training step: frozen model, β and b of the chosen heads trained by AdamW.

As the reference's Trainer run: right-padded batch, next-token cross-entropy on response tokens
(Hugging Face's shifted loss with -100 labels), backward, gradient clipping at 1.0, AdamW
(lr 1e-3, no weight decay), linear learning-rate decay to zero.
"""

from __future__ import annotations

import torch
import transformers

from .hooks import Compensation
from .shapes import Shape


def random_basis(count: int, head_dim: int, generator: torch.Generator) -> torch.Tensor:
    """(count, d_h, d_h) row-orthonormal bases standing in for the SVD's lost directions."""
    q, _ = torch.linalg.qr(torch.randn(count, head_dim, head_dim, generator=generator))
    return q.transpose(1, 2).contiguous()


def random_heads(shape: Shape, top_k: int | float, generator: torch.Generator) -> list[int]:
    """`top_k` distinct heads (an int, or a fraction of L·H) in random order, standing in for the probe ranking."""
    count = top_k if isinstance(top_k, int) else max(1, round(top_k * shape.total_heads))
    return torch.randperm(shape.total_heads, generator=generator)[:count].tolist()


def make_compensation(shape: Shape, top_k: int | float, device: torch.device, seed: int) -> Compensation:
    """A compensation on random heads with random bases, β and b ~ N(0, 1e-3)."""
    generator = torch.Generator().manual_seed(seed)
    heads = random_heads(shape, top_k, generator)
    basis = random_basis(len(heads), shape.head_dim, generator).to(device)
    return Compensation(heads, basis, shape.num_heads, generator=generator)


def make_optimizer(compensation: Compensation, total_steps: int, lr: float = 1e-3
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW on β and b with linear decay over `total_steps`, as the Trainer's defaults."""
    optimizer = torch.optim.AdamW([compensation.beta, compensation.bias], lr=lr, weight_decay=0.0)
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, 0, total_steps)
    return optimizer, scheduler


def train_step(model: transformers.LlamaForCausalLM, compensation: Compensation, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler, batch: dict[str, torch.Tensor],
               device: torch.device) -> torch.Tensor:
    """Forward, backward to β and b, clip, AdamW step. Returns the loss (a device scalar, not synced)."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_([compensation.beta, compensation.bias], 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()
