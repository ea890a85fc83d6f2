"""Command-line flags generated from frozen config dataclasses, so `--help` and the Python API agree."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

_HELP_KEY = "help"


def _scalar_type(annotation: Any):
    """int/float/str/bool for `x: int`, `x: float | None`, `x: str | None = ...`."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {"typing": typing}, {})  # annotations are strings under `from __future__`
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return annotation


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, *, prefix: str = "", skip: tuple[str, ...] = ()) -> None:
    """One `--field-name` flag per field of `cls`, default from the dataclass, help from field metadata."""
    group = parser.add_argument_group(f"{cls.__name__} ({cls.__doc__.splitlines()[0] if cls.__doc__ else ''})")
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        kind = _scalar_type(field.type)
        flag = "--" + (prefix + field.name).replace("_", "-")
        default = field.default if field.default is not dataclasses.MISSING else None
        help_text = field.metadata.get(_HELP_KEY, "").replace("%", "%%") + " (default: %(default)s)"
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif kind in (int, float, str):
            group.add_argument(flag, type=kind, default=default, help=help_text, dest=prefix + field.name)
        else:
            group.add_argument(flag, type=str, default=default, help=help_text, dest=prefix + field.name)


def dataclass_from_flags(cls, args: argparse.Namespace, *, prefix: str = "", skip: tuple[str, ...] = (), **overrides):
    """Build `cls` from the flags `add_dataclass_flags` added (plus explicit overrides); skipped fields keep defaults."""
    values = {}
    for field in dataclasses.fields(cls):
        key = prefix + field.name
        if field.name in skip:
            continue
        if hasattr(args, key):
            values[field.name] = getattr(args, key)
    values.update(overrides)
    return cls(**values)


def described(default, help: str):
    """A dataclass field with a default and a help string for the generated flag."""
    return dataclasses.field(default=default, metadata={_HELP_KEY: help})


def parse_with_preset(parser: argparse.ArgumentParser, argv, presets: dict[str, dict[str, Any]]) -> argparse.Namespace:
    """Add `--preset NAME` and parse: the preset's values become the defaults, so explicit flags still win."""
    parser.add_argument("--preset", choices=sorted(presets), default=None,
                        help="named settings (" + "; ".join(f"{k}: {v or 'the defaults'}" for k, v in presets.items())
                        .replace("%", "%%") + "); flags given explicitly override them")
    known, _ = parser.parse_known_args(argv)
    if known.preset:
        parser.set_defaults(**presets[known.preset])
    return parser.parse_args(argv)


def add_compile_cache_flag(parser: argparse.ArgumentParser) -> None:
    """`--no-compile-cache`: every script's switch for JAX's persistent compilation cache (`lcc_jax.compile_cache`)."""
    parser.add_argument("--no-compile-cache", action="store_true",
                        help="do not read or write compiled programs under $LCC_CACHE_DIR/jax_compile "
                        "(LCC_COMPILE_CACHE=0 does the same)")


def use_compile_cache(args: argparse.Namespace) -> None:
    """Turn the persistent compilation cache on unless `--no-compile-cache` (or LCC_COMPILE_CACHE=0); call it
    before anything compiles."""
    from lcc_jax import compile_cache

    compile_cache.enable(not getattr(args, "no_compile_cache", False))
