"""Any source `lcc_jax.load` reads (HF folder, GGUF file, Orbax folder, built-in name), written again as a HF or
Orbax folder: what `scripts/convert.py` runs. Above both `load` and `export`, which do not import each other's
callers."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp

from lcc_jax.convert.export import (
    DEFAULT_MAX_SHARD_SIZE,
    ExportError,
    check_writable,
    parse_size,
    save_hf,
    save_orbax,
)
from lcc_jax.convert.load import load


def convert(
    source: str | Path,
    out: str | Path,
    *,
    to: str = "hf",
    dtype=jnp.float32,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Load any source `lcc_jax.load` accepts and write it as a HF folder (`to='hf'`) or Orbax folder."""
    if to not in ("hf", "orbax"):
        raise ExportError(f"to must be 'hf' or 'orbax', not {to!r}.")
    check_writable(Path(out).expanduser().absolute(), overwrite=overwrite)  # fail before the slow part
    parse_size(max_shard_size)
    model, tokenizer, _ = load(source, dtype=dtype)
    if to == "orbax":
        return save_orbax(model, tokenizer, out, overwrite=overwrite)
    return save_hf(model, tokenizer, out, overwrite=overwrite, max_shard_size=max_shard_size)
