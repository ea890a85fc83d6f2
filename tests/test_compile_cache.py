"""The persistent compilation cache: a second fresh process reads back what the first compiled; off writes nothing."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
PROGRAM = """
import logging, sys
logging.basicConfig(level=logging.WARNING)
logging.getLogger("lcc_jax").setLevel(logging.INFO)
from lcc_jax.cli import add_compile_cache_flag, use_compile_cache
import argparse
parser = argparse.ArgumentParser()
add_compile_cache_flag(parser)
use_compile_cache(parser.parse_args(sys.argv[1:]))
import json, jax, jax.numpy as jnp
from lcc_jax import compile_cache
jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(jnp.ones((16, 16))).block_until_ready()
print("STATS", json.dumps(compile_cache.stats()))
"""


def _run(cache_dir, *args, **env):
    inherited = {k: v for k, v in os.environ.items() if k not in ("LCC_COMPILE_CACHE", "JAX_COMPILATION_CACHE_DIR")}
    env = {**inherited, "LCC_CACHE_DIR": str(cache_dir), "JAX_PLATFORMS": "cpu", **env}
    proc = subprocess.run([sys.executable, "-c", PROGRAM, *args], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("STATS"))[6:])
    return stats, proc.stderr


def test_second_process_reads_back_what_the_first_compiled(tmp_path):
    first, log = _run(tmp_path)
    assert first["hits"] == 0 and first["misses"] > 0 and first["compile_seconds"] > 0
    assert f"compile cache {tmp_path / 'jax_compile'}: 0 hits, {first['misses']} misses" in log
    assert any((tmp_path / "jax_compile").iterdir())
    second, log = _run(tmp_path)
    assert second["hits"] == first["misses"] and second["misses"] == 0
    assert second["compile_seconds"] < first["compile_seconds"]  # read back, not compiled
    assert f"{second['hits']} hits, 0 misses" in log


@pytest.mark.parametrize("how", ["env", "flag"])
def test_switched_off_writes_nothing(tmp_path, how):
    stats, log = _run(tmp_path, *(["--no-compile-cache"] if how == "flag" else []),
                      **({"LCC_COMPILE_CACHE": "0"} if how == "env" else {}))
    assert stats["hits"] == 0 and stats["misses"] == 0 and "compile cache" not in log
    assert stats["compile_seconds"] > 0  # compiling is still timed with the cache off
    assert not (tmp_path / "jax_compile").exists()


@pytest.mark.parametrize("script", sorted(p.stem for p in SCRIPTS.glob("*.py")))
def test_every_script_has_the_switch(script, capsys):
    spec = importlib.util.spec_from_file_location(f"{script}_cli", SCRIPTS / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit):
        module.main(["--help"])
    assert "--no-compile-cache" in capsys.readouterr().out
