"""Command-line flags generated from frozen config dataclasses, so `--help` and the Python API agree; and how
every script reports errors: a user's mistake as one `error: ...` line and exit code 2, a fault in lcc_jax
with its traceback and exit code 1 (`script`, `ArgumentParser`)."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import traceback
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from lcc_jax import compile_cache, progress
from lcc_jax.convert.builtin import BuiltinError
from lcc_jax.errors import UserError, is_disk_full
from lcc_jax.fields import help_text
from lcc_jax.restore.hints import OutOfMemory

USER_ERROR_EXIT = 2  # argparse's code for a bad command line, used for every mistake a user can fix
FAULT_EXIT = 1  # an unexpected exception: a bug, reported with its traceback


def _scalar_type(annotation: Any):
    """int/float/str/bool for `x: int`, `x: float | None`, `x: str | None = ...` (an evaluated annotation)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return annotation


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, *, prefix: str = "", skip: tuple[str, ...] = ()) -> None:
    """One `--field-name` flag per field of `cls`, default from the dataclass, help from field metadata."""
    group = parser.add_argument_group(f"{cls.__name__} ({cls.__doc__.splitlines()[0] if cls.__doc__ else ''})")
    hints = typing.get_type_hints(cls)  # annotations are strings under `from __future__`; this evaluates them
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        kind = _scalar_type(hints[field.name])
        flag = "--" + (prefix + field.name).replace("_", "-")
        default = field.default if field.default is not dataclasses.MISSING else None
        text = help_text(field).replace("%", "%%") + " (default: %(default)s)"
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        elif kind in (int, float, str):
            group.add_argument(flag, type=kind, default=default, help=text, dest=prefix + field.name)
        else:
            group.add_argument(flag, type=str, default=default, help=text, dest=prefix + field.name)


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


def comma_list(text: str) -> tuple[str, ...]:
    """"a, b,,c" -> ("a", "b", "c"): a comma-separated flag value."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def comma_ints(text: str, flag: str) -> tuple[int, ...]:
    """"0,1,2" -> (0, 1, 2); anything else is a user's mistake naming `flag`."""
    try:
        return tuple(int(item) for item in comma_list(text))
    except ValueError:
        raise UserError(f"{flag} takes comma-separated whole numbers (e.g. 0,1,2), not {text!r}.") from None


def tasks_flag(text: str | None) -> str | None:
    """--tasks: None for '', 'none' or no value (perplexity only), else the names as given."""
    return None if text in (None, "", "none") else text


def parse_with_preset(parser: argparse.ArgumentParser, argv, presets: dict[str, dict[str, Any]]) -> argparse.Namespace:
    """Add `--preset NAME` and parse: the preset's values become the defaults, so explicit flags still win.
    A preset's values for flags this parser does not have are left out (one table serves several scripts)."""
    dests = {action.dest for action in parser._actions}
    presets = {name: {k: v for k, v in values.items() if k in dests} for name, values in presets.items()}
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
    compile_cache.enable(not getattr(args, "no_compile_cache", False))


# ------------------------------------------------------------------------------ errors


class ArgumentParser(argparse.ArgumentParser):
    """argparse with `--debug` (full tracebacks) and a bad flag reported in one line, not usage + error."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true",
                          help="show the traceback of any error (without it, a mistake in the input prints one "
                          "'error: ...' line and exits with 2; a fault in lcc_jax, its traceback and 1)")

    def error(self, message: str) -> typing.NoReturn:
        self.exit(USER_ERROR_EXIT, f"error: {message} (see {self.prog} --help)\n")


def script(main: Callable[..., int]) -> Callable[..., int]:
    """Decorate a script's `main(argv=None) -> int` with `run_main`: in-process callers get the exit code too."""

    @functools.wraps(main)
    def wrapped(argv: Sequence[str] | None = None) -> int:
        return run_main(main, argv)

    return wrapped


def run_main(main: Callable[..., int], argv: Sequence[str] | None = None) -> int:
    """`main(argv)`, with its errors turned into exit codes.

    A mistake the user can fix (`user_message` knows which) prints one `error: ...` line to stderr and
    returns 2; any other exception prints its traceback and returns 1; Ctrl-C / SIGTERM return 130 / 143.
    With `--debug` in argv every exception propagates untouched (full traceback, Python's exit code).
    """
    debug = "--debug" in (sys.argv[1:] if argv is None else list(argv))
    try:
        return main(argv)
    except SystemExit:  # --help, argparse's own errors, an explicit exit
        raise
    except KeyboardInterrupt as e:  # lcc_jax.signals.Interrupted carries the shell's code for its signal
        if debug:
            raise
        if not hasattr(e, "exit_code"):
            print("interrupted", file=sys.stderr)
        return getattr(e, "exit_code", 130)
    except Exception as e:
        if debug:
            raise
        message = user_message(e)
        if message is None:
            traceback.print_exc()
            print(f"error: unexpected {type(e).__name__}; this looks like a bug in lcc_jax, please report it with "
                  "the traceback above (a rerun with --debug shows the same)", file=sys.stderr)
            return FAULT_EXIT
        print(f"error: {message}", file=sys.stderr)
        return USER_ERROR_EXIT
    finally:
        progress.stop_following()  # a job's estimate ends with its script (in-process callers run several)


def user_message(error: BaseException) -> str | None:
    """The one-line message of an error the user can fix, or None for a fault in lcc_jax: a `UserError`, an
    `OutOfMemory` (it says which flags lower the memory), a `BuiltinError` (a download or hash check that failed), a
    full disk, a refused permission, a cuDNN program read back from the compile cache that failed (run without it)."""
    if isinstance(error, (UserError, OutOfMemory, BuiltinError)):
        return one_line(str(error)) or type(error).__name__
    if is_disk_full(error):
        where = f" writing {error.filename}" if error.filename else ""
        return (f"the disk is full ({error.strerror}{where}); free space there, or write to another disk, "
                "and run again")
    if isinstance(error, PermissionError):
        return f"{error.strerror or 'permission denied'}: {error.filename}; check the path and its permissions"
    return compile_cache.read_back_failure(error)


def one_line(message: str) -> str:
    """A multi-line message (a list of problems, a list of flags) joined into one line."""
    out = ""
    for line in (raw.strip() for raw in message.splitlines()):
        if not line:
            continue
        line = line.removeprefix("- ").strip()
        out = line if not out else out + (" " if out.endswith((":", ".", ";", ",")) else "; ") + line
    return out
