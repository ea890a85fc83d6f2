"""Data: evaluation and calibration text, instruction pairs, zero-shot task formats."""

from lcc_jax.data.text import SOURCES, TextSourceError, data_dir, load_rows, load_text

__all__ = ["SOURCES", "TextSourceError", "data_dir", "load_rows", "load_text"]
