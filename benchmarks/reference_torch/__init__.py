"""PyTorch reference pipeline for RestoreLCC: the baseline lcc_jax's speed is measured against.

`transformers` Llama in bf16 with random weights, o_proj forward pre-hooks for capture and
compensation, Wanda and SparseGPT as their public code runs them, and the whole restore job in the
reference code's style (one sample at a time for capture, padded batches for training).
Run `python -m benchmarks.reference_torch --help`.
"""
