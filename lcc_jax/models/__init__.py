"""Flax NNX decoders."""

from lcc_jax.models.llama import CausalLM, CausalLMOutput, last_token_positions

__all__ = ["CausalLM", "CausalLMOutput", "last_token_positions"]
