"""Random-weight `transformers` Llama built directly on the target device in bf16, with sdpa attention."""

from __future__ import annotations

import logging
import time

import torch
import transformers

from .shapes import Shape

log = logging.getLogger(__name__)


def llama_config(shape: Shape) -> transformers.LlamaConfig:
    """A `LlamaConfig` of the given shape: no biases, sdpa attention, pad token 0, no KV cache."""
    config = transformers.LlamaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.max_position_embeddings,
        rms_norm_eps=shape.rms_norm_eps,
        rope_theta=shape.rope_theta,
        tie_word_embeddings=shape.tie_word_embeddings,
        attention_bias=False,
        mlp_bias=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        use_cache=False,
    )
    config._attn_implementation = "sdpa"
    return config


def build_model(shape: Shape, device: str | torch.device,
                dtype: torch.dtype = torch.bfloat16) -> transformers.LlamaForCausalLM:
    """A frozen, eval-mode LlamaForCausalLM with random weights, allocated on `device` in `dtype`.

    Allocating under `torch.device(device)` with `dtype` as the default skips a host copy, so a 7B
    model is ready in seconds. Weights are Hugging Face's normal(0, 0.02) init: values do not
    matter for speed, but activations stay finite (checked once on a short input).
    """
    start = time.perf_counter()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(llama_config(shape))
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    model.requires_grad_(False)
    with torch.no_grad():
        logits = model(torch.arange(1, 9, device=device)[None] % shape.vocab_size).logits
    if not torch.isfinite(logits).all():
        raise RuntimeError(f"random {shape.name} model gives non-finite logits")
    log.info("built %s on %s in %s: %.2fB parameters, %.1f s", shape.name, device, dtype,
             model.num_parameters() / 1e9, time.perf_counter() - start)
    return model
