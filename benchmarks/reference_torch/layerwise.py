"""Layer-by-layer calibration, as Wanda's and SparseGPT's drivers run it.

The calibration windows go through the embedding one at a time until the first decoder layer,
where a hook stores the hidden states and the layer's keyword arguments (mask, positions, rotary
cos/sin) and stops the forward. Each layer is then run on the stored inputs one window at a time.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from torch import nn


class _Caught(Exception):
    pass


def find_linears(module: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear under `module`, by dotted name (q/k/v/o_proj, gate/up/down_proj for a Llama layer)."""
    return {name: m for name, m in module.named_modules() if isinstance(m, nn.Linear)}


@torch.no_grad()
def first_layer_inputs(model: transformers.LlamaForCausalLM, calibration: torch.Tensor, device: torch.device
                       ) -> tuple[torch.Tensor, dict[str, Any]]:
    """(inputs (N, S, hidden) in the model dtype on `device`, the first layer's keyword arguments)."""
    nsamples, seqlen = calibration.shape
    inps = torch.zeros((nsamples, seqlen, model.config.hidden_size), dtype=model.dtype, device=device)
    caught: dict[str, Any] = {"i": 0, "kwargs": {}}

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        inps[caught["i"]] = args[0] if args else kwargs["hidden_states"]
        caught["i"] += 1
        caught["kwargs"] = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "cache", "past_key_values")}
        raise _Caught

    handle = model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for row in calibration:
            try:
                model(row[None].to(device))
            except _Caught:
                pass
    finally:
        handle.remove()
    return inps, caught["kwargs"]


@torch.no_grad()
def forward_layer(layer: nn.Module, inps: torch.Tensor, outs: torch.Tensor, kwargs: dict[str, Any]) -> None:
    """outs[j] = layer(inps[j]) for every window, one at a time."""
    for j in range(inps.shape[0]):
        out = layer(inps[j][None], **kwargs)
        outs[j] = (out[0] if isinstance(out, tuple) else out)[0]


@torch.no_grad()
def collect_inputs(linears: dict[str, nn.Linear], collectors: dict[str, Any], layer: nn.Module, inps: torch.Tensor,
                   outs: torch.Tensor, kwargs: dict[str, Any]) -> None:
    """One forward of `layer` over every window, each linear's input fed to `collectors[name].add_batch`."""
    handles = [m.register_forward_hook(lambda _m, inp, _o, name=name: collectors[name].add_batch(inp[0].data))
               for name, m in linears.items()]
    try:
        forward_layer(layer, inps, outs, kwargs)
    finally:
        for handle in handles:
            handle.remove()
