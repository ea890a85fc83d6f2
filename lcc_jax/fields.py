"""Config dataclass fields that carry their own help text, so `--help` and the Python API say the same thing.

    method: str = described("wanda", "magnitude | wanda | sparsegpt | flap (structured)")

`lcc_jax.cli.add_dataclass_flags` turns each such field into a flag whose help is `help_text(field)`.
"""

from __future__ import annotations

import dataclasses

HELP_KEY = "help"  # the field metadata key holding the help string


def described(default, help: str):
    """A dataclass field with a default and a help string for the generated flag."""
    return dataclasses.field(default=default, metadata={HELP_KEY: help})


def help_text(field: dataclasses.Field) -> str:
    """The help string of a `described` field ('' for any other field)."""
    return field.metadata.get(HELP_KEY, "")
