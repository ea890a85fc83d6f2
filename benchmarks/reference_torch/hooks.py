"""The two doors at the o_proj input, as forward pre-hooks on `self_attn.o_proj` of every layer.

The o_proj input is the concatenation of the heads' outputs, (B, T, H·d_h), head h at columns
[h·d_h, (h+1)·d_h). `OProjCapture` reads it (RestoreLCC's probing activations); `Compensation`
adds δ_h = basis_hᵀ β_h + b_h to the chosen heads at every token (its training target).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def o_projs(model: nn.Module) -> list[nn.Linear]:
    """The o_proj of every decoder layer of a `transformers` Llama, in layer order."""
    return [layer.self_attn.o_proj for layer in model.model.layers]


class OProjCapture:
    """Records the o_proj input of every layer during a forward.

    `last_only=False` keeps a clone of the whole (B, T, H·d_h) input, as the reference's pyvene
    collector does; `last_only=True` keeps only each row's last real token (set `last_index`
    before a right-padded forward), so nothing but (B, H·d_h) per layer is stored.
    """

    def __init__(self, model: nn.Module, last_only: bool):
        self.last_only = last_only
        self.last_index: torch.Tensor | None = None  # (B,) position of each row's last real token
        self.states: list[torch.Tensor] = []
        self._handles = [m.register_forward_pre_hook(self._hook) for m in o_projs(model)]

    def _hook(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0]
        if not self.last_only:
            self.states.append(x.detach().clone())
            return
        index = self.last_index if self.last_index is not None else torch.full((x.shape[0],), x.shape[1] - 1)
        rows = torch.arange(x.shape[0], device=x.device)
        self.states.append(x.detach()[rows, index.to(x.device)])

    def pop(self) -> list[torch.Tensor]:
        """The states recorded since the last pop, one per layer."""
        states, self.states = self.states, []
        return states

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class Compensation(nn.Module):
    """Trainable compensation on k chosen heads, fp32 master parameters added in the model's dtype.

    `heads` are global indices l·H + h. β and b are (k, d_h) and start at N(0, std) as in the
    reference; `basis` (k, d_h, d_h) is frozen, its rows the lost directions, so
    δ = Σ_i β_i · basis[i] + b (the reference's `bmm(main_comp.transpose(1, 2), attn_v)` + attn_b).
    """

    def __init__(self, heads: Sequence[int], basis: torch.Tensor, num_heads: int, std: float = 1e-3,
                 generator: torch.Generator | None = None):
        super().__init__()
        k, d, _ = basis.shape
        self.num_heads = num_heads
        self.head_dim = d
        self.register_buffer("heads", torch.as_tensor(list(heads), dtype=torch.long, device=basis.device))
        self.register_buffer("basis", basis.float())
        self.beta = nn.Parameter(torch.randn(k, d, generator=generator, device="cpu").to(basis.device) * std)
        self.bias = nn.Parameter(torch.randn(k, d, generator=generator, device="cpu").to(basis.device) * std)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def delta(self, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """(k, d_h) δ of the selected rows, in fp32."""
        return torch.einsum("ki,kid->kd", self.beta[rows], self.basis[rows]) + self.bias[rows]

    def attach(self, model: nn.Module) -> None:
        """Adds δ to the o_proj input of each layer that holds a chosen head."""
        layers = (self.heads // self.num_heads).tolist()
        for layer, proj in enumerate(o_projs(model)):
            rows = torch.tensor([i for i, l in enumerate(layers) if l == layer], dtype=torch.long,
                                device=self.heads.device)
            if rows.numel():
                self._handles.append(proj.register_forward_pre_hook(self._make_hook(rows)))

    def _make_hook(self, rows: torch.Tensor):
        local = self.heads[rows] % self.num_heads

        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            x = args[0]
            full = x.new_zeros(self.num_heads, self.head_dim).index_copy(0, local, self.delta(rows).to(x.dtype))
            return (x + full.reshape(-1),) + tuple(args[1:])

        return hook

    def detach_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
