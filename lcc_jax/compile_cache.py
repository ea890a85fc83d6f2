"""JAX's persistent compilation cache, so a machine compiles each program once across runs.

    from lcc_jax import compile_cache
    compile_cache.enable()      # every script does this at start; `--no-compile-cache` or LCC_COMPILE_CACHE=0: off

The cache lives in `$LCC_CACHE_DIR/jax_compile` (`~/.cache/lcc_jax/jax_compile` by default; a
`JAX_COMPILATION_CACHE_DIR` already set wins). Every program is written, however small or quick to
compile (JAX's default skips those under 1 s): a run has dozens of small eager programs (masks,
folding, statistics); on a CPU one compiles in 10–50 ms and reads back in 1–2 ms, and a GPU's compiler
is slower still, while each entry is a few kilobytes on disk. At exit one line is logged: hits
(programs read back) and misses (compiled here). The cache is trusted: do not share its folder with
users you do not trust. `stats()` also sums the seconds spent getting executables in this process (XLA compiling
them, or reading them back from the cache), so a benchmark can say how much of a stage was compiling.

`remember`/`remembered` keep a note per program set that a job compiled through the cache (the train step of one
shape set), keyed by its description and this machine's toolchain: a job then knows, before compiling, that reading
back is all that is left, and `train.precompile_fit` leaves that to `fit` rather than doing it beside device work.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import logging
import os
from pathlib import Path

import jax
from jax import monitoring
from jax.experimental.compilation_cache import compilation_cache

from lcc_jax.convert.builtin import cache_dir

log = logging.getLogger(__name__)

ENV = "LCC_COMPILE_CACHE"
MIN_COMPILE_SECONDS = 0.0  # cache every program, see above
MIN_ENTRY_BYTES = -1  # no size threshold, and JAX may not raise it for the file system

# JAX records ".../cache_misses" only when it writes an entry; requests minus hits counts every compile here
_REQUESTS, _HITS = "/jax/compilation_cache/compile_requests_use_cache", "/jax/compilation_cache/cache_hits"
_COMPILE = "/jax/core/compile/backend_compile_duration"  # getting one executable: XLA compiling it or the cache read
_counts = {_REQUESTS: 0, _HITS: 0}
_compile_seconds = [0.0]
_folder: Path | None = None  # where the cache is on, None while off
_listening = False


def read_back_failure(error: BaseException) -> str | None:
    """What to do about a GPU program read back from the cache that failed on its first run, or None for any other
    error. cudnn-frontend ends reading a cuDNN graph back with a warm-up that captures a CUDA graph on the execution
    stream; other device work at that moment fails it with "capturing stream has unjoined work" (seen once on an H100,
    2026-12-08, benchmarks/RESULTS.md). Compiling afresh builds the graph instead of reading it back."""
    text = str(error)
    if "cuda_graph_end_capture" not in text and "capturing stream has unjoined work" not in text:
        return None
    return ("a cuDNN program read back from the compile cache failed its first run on the GPU (cuDNN's warm-up "
            "capture: 'capturing stream has unjoined work'); run the same command again with --no-compile-cache "
            "(or LCC_COMPILE_CACHE=0): a job folder keeps its finished stages")


def remember(what: str, description: str) -> None:
    """Note that `what` (a program set described by `description`) is now in the cache; nothing while it is off."""
    note = _note(what, description)
    if note is not None:
        note.parent.mkdir(parents=True, exist_ok=True)
        note.write_text(f"{what}\n")


def remembered(what: str, description: str) -> bool:
    """Whether a job on this toolchain (JAX, the backend and its devices, XLA_FLAGS, LCC_ATTENTION, lcc_jax's
    source) noted `what` with this `description`: its programs are then read back, not compiled, unless the cache
    was emptied since (then they compile as usual, only not ahead). False while the cache is off."""
    note = _note(what, description)
    return note is not None and note.exists()


def _note(what: str, description: str) -> Path | None:
    if _folder is None:
        return None
    digest = hashlib.sha256(f"{toolchain()}\n{what}\n{description}".encode()).hexdigest()
    return _folder / "lcc_jax_notes" / digest


@functools.cache
def toolchain() -> str:
    """What, besides a program's own description, decides the executables XLA makes for it on this machine."""
    import jax.extend.backend
    import jaxlib

    backend = jax.extend.backend.get_backend()
    devices = sorted({d.device_kind for d in jax.devices()})
    flags = {name: os.environ.get(name, "") for name in ("XLA_FLAGS", "LCC_ATTENTION", "LIBTPU_INIT_ARGS")}
    return "\n".join([f"jax {jax.__version__} jaxlib {jaxlib.__version__}",
                      f"{backend.platform} {backend.platform_version} {jax.device_count()} x {devices}",
                      repr(sorted(flags.items())), f"lcc_jax source {_source_digest()}"])


def _source_digest() -> str:
    """sha256 of lcc_jax's Python files: an edit to the code may change any program."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def cache_folder() -> Path:
    """`$LCC_CACHE_DIR/jax_compile`, with LCC_CACHE_DIR resolved as for the built-in models."""
    return cache_dir() / "jax_compile"


def enabled_by_env() -> bool:
    """False when LCC_COMPILE_CACHE is 0 / false / no / off."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def enable(on: bool = True) -> Path | None:
    """Turn the persistent cache on (unless `on` is False or LCC_COMPILE_CACHE=0) or off; returns its folder.

    Call it before the first compilation of the process; calling it again is harmless.
    """
    global _folder
    track()
    if not (on and enabled_by_env()):
        jax.config.update("jax_enable_compilation_cache", False)
        _folder = None
        return None
    folder = Path(jax.config.jax_compilation_cache_dir or cache_folder()).expanduser()
    if folder == _folder:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", MIN_ENTRY_BYTES)
    compilation_cache.reset_cache()  # JAX decides once per process whether to use the cache: decide again
    _folder = folder
    return folder


def track() -> None:
    """Count cache requests, hits and compile seconds from now on (idempotent; `enable()` calls it)."""
    global _listening
    if not _listening:
        monitoring.register_event_listener(_count)
        monitoring.register_event_duration_secs_listener(_duration)
        atexit.register(_report)
        _listening = True


def folder() -> Path | None:
    """Where the cache is on in this process, None while it is off."""
    return _folder


def stats() -> dict[str, float]:
    """This process's compilations since `enable()` or `track()`: {"hits": read back from the cache, "misses":
    compiled here through it, "compile_seconds": time spent getting every executable, compiled or read back, cache
    on or off}."""
    return {"hits": _counts[_HITS], "misses": _counts[_REQUESTS] - _counts[_HITS],
            "compile_seconds": round(_compile_seconds[0], 3)}


def summary() -> str:
    s = stats()
    return f"compile cache {_folder}: {s['hits']} hits, {s['misses']} misses, {s['compile_seconds']:.1f} s compiling"


def _count(event: str, **_kwargs) -> None:
    if event in _counts:
        _counts[event] += 1


def _duration(event: str, duration_secs: float, **_kwargs) -> None:
    if event == _COMPILE:
        _compile_seconds[0] += duration_secs


def _report() -> None:
    if _folder is None or not _counts[_REQUESTS]:
        return
    raise_exceptions = logging.raiseExceptions
    logging.raiseExceptions = False  # a stream closed before exit (a test's captured stderr) is no error
    try:
        log.info(summary())
    finally:
        logging.raiseExceptions = raise_exceptions
