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


TRAIN = """
import logging, sys
logging.basicConfig(level=logging.WARNING)
logging.getLogger("lcc_jax").setLevel(logging.INFO)
import json, jax, jax.numpy as jnp, numpy as np
from flax import nnx
from lcc_jax import compile_cache
from lcc_jax.config import ModelConfig
from lcc_jax.data.batching import make_batches
from lcc_jax.models import CausalLM
from lcc_jax.train import TrainConfig, fit, precompile_fit
compile_cache.enable()
model = CausalLM(ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=8), rngs=nnx.Rngs(0))
def apply_delta(model, trainable, tokens, mask, remat=False):
    return model(tokens, mask).logits + trainable["delta"].sum()
rng = np.random.default_rng(0)
seqs = [rng.integers(1, 64, rng.integers(4, 20)).tolist() for _ in range(8)]
batches = lambda epoch: make_batches(seqs, 4, pad_id=0, order="given")
config = TrainConfig(epochs=1, batch_size=4, compute_dtype="float32")
shapes = {"delta": jax.ShapeDtypeStruct((3,), jnp.float32)}
ahead = precompile_fit(model, shapes, apply_delta, batches, config).result()
before = compile_cache.stats()
result = fit(model, {"delta": jnp.zeros((3,), jnp.float32)}, apply_delta, batches, config)
after = compile_cache.stats()
print("STATS", json.dumps({"ahead": ahead, "fit_hits": after["hits"] - before["hits"],
                           "fit_misses": after["misses"] - before["misses"], "loss": result.history["loss"]}))
"""


def test_a_second_job_reads_its_train_step_back_in_fit_not_ahead(tmp_path):
    """The first process compiles its train step ahead (on a thread beside device work) and notes it; the second
    finds the note and leaves the read-back to fit, where no other device work runs (a cuDNN program read back
    beside device work failed a warm GPU run); both train the same."""
    first, _ = _run(tmp_path, program=TRAIN)
    assert first["ahead"] >= 1
    second, log = _run(tmp_path, program=TRAIN)
    assert second["ahead"] == 0 and "the train step for these shapes is in the compile cache" in log
    assert second["fit_hits"] >= 1 and second["fit_misses"] == 0  # read back in fit, nothing compiled afresh
    assert second["loss"] == first["loss"]
    assert len(list((tmp_path / "jax_compile" / "lcc_jax_notes").iterdir())) == 1


def _run(cache_dir, *args, program=PROGRAM, **env):
    inherited = {k: v for k, v in os.environ.items() if k not in ("LCC_COMPILE_CACHE", "JAX_COMPILATION_CACHE_DIR")}
    env = {**inherited, "LCC_CACHE_DIR": str(cache_dir), "JAX_PLATFORMS": "cpu", **env}
    proc = subprocess.run([sys.executable, "-c", program, *args], env=env, capture_output=True, text=True, timeout=120)
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
