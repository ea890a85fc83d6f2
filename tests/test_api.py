"""The verbs of `import lcc_jax` (load, prune, restore, evaluate, save): the README's Python API snippet run as
written, each verb's overrides and results, and `restore` in memory against the resumable job folder."""

import dataclasses
import math
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

# tiny sizes for the tiny random model (tests/conftest.py); the job-folder test uses the same
TINY = dict(num_train=24, num_probe=16, num_valid=8, max_length=64, capture_length=64, epochs=1, batch_size=4,
            capture_batch_size=8, eval_seqlen=64, eval_limit_chunks=2, top_k=0.25)
PRUNE = dict(method="wanda", sparsity="0.5", batch_size=4)
CALIBRATION = dict(nsamples=4, seqlen=64)


def readme_python_api() -> str:
    """The ```python block of the README's "## Python API" section, as written."""
    text = README.read_text()
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, f"expected one python block under '## Python API', found {len(blocks)}"
    return blocks[0]


@pytest.fixture(scope="module")
def in_memory(tiny_model_dir):
    """dense model, tokenizer, PruneResult of a pruned copy, and its RestoreResult (TINY sizes, seed 42)."""
    import lcc_jax

    model, tokenizer, _ = lcc_jax.load(tiny_model_dir)
    pruned = lcc_jax.prune(model, tokenizer, lcc_jax.PruneConfig(**PRUNE), in_place=False,
                           calibration=lcc_jax.CalibrationConfig(**CALIBRATION))
    result = lcc_jax.restore(model, pruned, tokenizer, lcc_jax.RestoreConfig(**{**TINY, "top_k": 1.0}), top_k=0.25)
    return model, tokenizer, pruned, result


@pytest.mark.slow
def test_readme_python_api_snippet_runs_as_written(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """The snippet verbatim; only the built-in name resolves to the tiny model (no download in tests)."""
    from lcc_jax.convert import builtin

    monkeypatch.setattr(builtin, "ensure_builtin", lambda name: tiny_model_dir)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_python_api(), str(README), "exec"), namespace)  # a NameError fails here
    out = capsys.readouterr().out
    assert not re.search(r"\b(nan|inf)\b", out.lower()), out
    assert out.count("WikiText-2 ppl") == 3
    result, report = namespace["result"], namespace["report"]
    assert np.isfinite(result.history["loss"]).all() and math.isfinite(report.ppl)
    assert len(result.heads) == 2 * 4  # preset "recipe": every head of the tiny model
    assert (tmp_path / "restored_hf" / "config.json").is_file()


def test_readme_python_api_uses_only_the_verbs():
    snippet = readme_python_api()
    assert "lcc_jax.pruning" not in snippet and "lcc_jax.prune." not in snippet and "lcc_jax.restore." not in snippet
    imports = [line for line in snippet.splitlines() if line.startswith(("import ", "from "))]
    assert imports == ["import lcc_jax"]
    for verb in ("lcc_jax.load(", "lcc_jax.prune(", "lcc_jax.restore(", "lcc_jax.evaluate(", "lcc_jax.save_hf("):
        assert verb in snippet, verb


def test_the_verbs_are_on_the_package_and_the_packages_still_import():
    import importlib

    import lcc_jax
    from lcc_jax import api

    assert lcc_jax.prune is api.prune and lcc_jax.evaluate is api.evaluate
    assert callable(lcc_jax.restore)  # the package itself, callable as the verb
    pipeline = importlib.import_module("lcc_jax.restore.pipeline")
    assert lcc_jax.restore.pipeline is pipeline and lcc_jax.restore.steps.train  # the package's modules resolve
    assert importlib.import_module("lcc_jax.pruning.api").prune
    with pytest.raises(ModuleNotFoundError, match="lcc_jax.pruning"):
        importlib.import_module("lcc_jax.prune.api")
    assert lcc_jax.prune is api.prune  # the failed import shadowed nothing


def test_prune_applies_overrides_to_its_config_and_prunes_in_place(tiny_model_dir):
    import lcc_jax
    from lcc_jax.pruning.masks import sparsity_report
    from lcc_jax.pruning.patterns import SparsityError

    model, tokenizer, _ = lcc_jax.load(tiny_model_dir)
    result = lcc_jax.prune(model, tokenizer, lcc_jax.PruneConfig(method="wanda"), sparsity="2:4", batch_size=2,
                           calibration=lcc_jax.CalibrationConfig(nsamples=2, seqlen=32))
    assert result.model is model  # unstructured / N:M: in place
    assert set(result.masks) and result.head_map is None
    assert abs(sparsity_report(model).total - 0.5) < 1e-6
    kernel = np.asarray(model.layers.mlp.up_proj.kernel[...])  # (layers, in, out): 2 of every 4 inputs are zero
    assert ((kernel.reshape(2, -1, 4, kernel.shape[-1]) == 0).sum(2) == 2).all()

    again, _, _ = lcc_jax.load(tiny_model_dir)
    tokens = lcc_jax.CalibrationConfig(nsamples=2, seqlen=32).tokens(tokenizer)
    lcc_jax.prune(again, tokens, method="wanda", sparsity="2:4", batch_size=2)  # tokens instead of a tokenizer
    np.testing.assert_array_equal(np.asarray(again.layers.mlp.up_proj.kernel[...]), kernel)
    with pytest.raises(ValueError, match="tokens already"):
        lcc_jax.prune(again, tokens, calibration=lcc_jax.CalibrationConfig())
    with pytest.raises(SparsityError, match="calibration tokens"):
        lcc_jax.prune(again)  # wanda needs calibration
    assert lcc_jax.prune(again, method="magnitude", sparsity="0.75").masks  # magnitude needs none

    dense, _, _ = lcc_jax.load(tiny_model_dir)
    copy = lcc_jax.prune(dense, tokenizer, method="wanda", sparsity="2:4", batch_size=2, in_place=False,
                         calibration=lcc_jax.CalibrationConfig(nsamples=2, seqlen=32))
    assert copy.model is not dense and (np.asarray(dense.layers.mlp.up_proj.kernel[...]) != 0).all()
    np.testing.assert_array_equal(np.asarray(copy.model.layers.mlp.up_proj.kernel[...]), kernel)


def test_evaluate_applies_overrides_and_returns_ppl_and_zeroshot(tiny_model_dir):
    import lcc_jax

    model, tokenizer, _ = lcc_jax.load(tiny_model_dir)
    report = lcc_jax.evaluate(model, tokenizer, lcc_jax.EvalConfig(tasks="rte"), seqlen=64, limit_chunks=2,
                              tasks="boolq", limit=4, batch_size=4)
    assert report.config == lcc_jax.EvalConfig(seqlen=64, limit_chunks=2, tasks="boolq", limit=4, batch_size=4)
    assert math.isfinite(report.ppl) and report.perplexity.num_chunks == 2 and report.perplexity.seqlen == 64
    assert list(report.zeroshot.tasks) == ["boolq"] and report.zeroshot["boolq"].n == 4
    assert report.accuracy == report.zeroshot.mean and report.to_dict()["ppl"] == report.ppl
    only_ppl = lcc_jax.evaluate(model, tokenizer, seqlen=64, limit_chunks=1, tasks=None)
    assert only_ppl.zeroshot is None and only_ppl.accuracy is None and math.isfinite(only_ppl.ppl)
    with pytest.raises(ValueError, match="measures nothing"):
        lcc_jax.EvalConfig(text=None, tasks=None)
    with pytest.raises(ValueError, match="limit_chunks"):
        lcc_jax.evaluate(model, tokenizer, limit_chunks=0)


def test_eval_config_defaults_are_the_papers_protocol():
    import lcc_jax

    config = lcc_jax.EvalConfig()
    assert (config.text, config.seqlen, config.limit_chunks, config.tasks, config.limit) == (
        "wikitext2", 2048, None, "suite", None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seqlen = 1


@pytest.mark.slow
def test_restore_result_holds_the_folded_model_heads_components_probes_and_losses(in_memory):
    import lcc_jax
    from lcc_jax.pruning.masks import masks_from_zeros
    from lcc_jax.restore.compensation import dense_compensation

    model, _, pruned, result = in_memory
    assert isinstance(result, lcc_jax.RestoreResult)
    assert result.config == lcc_jax.RestoreConfig(**TINY)  # the override top_k=0.25 replaced the config's 1.0
    heads = 2 * 4
    assert result.heads.shape == (2,) and np.array_equal(result.heads, result.probes.ranking[:2])
    assert result.components.basis.shape == (heads, 16, 16) and result.probes.accuracy.shape == (heads,)
    assert result.compensation.beta.shape == (2, 16) and result.trainable_params == 2 * 2 * 16
    assert 1 <= len(result.history["loss"]) <= math.ceil(TINY["num_train"] / TINY["batch_size"])  # one per step
    assert np.isfinite(result.history["loss"]).all() and np.isfinite(result.history["valid_loss"]).all()
    assert set(result.timings) >= {"pairs", "dense_capture", "pruned_capture", "probes", "train", "fold"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.model = None

    # folded: the restored model computes the pruned model plus the compensation, with the same zeros
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 384, (2, 16)))
    unfolded = pruned.model(tokens, compensation=dense_compensation(result.compensation, pruned.model.config)).logits
    assert float(jnp.max(jnp.abs(result.model(tokens).logits - unfolded))) <= 1e-5
    after = masks_from_zeros(result.model, list(pruned.masks))
    for path, keep in pruned.masks.items():
        np.testing.assert_array_equal(np.asarray(after[path]), np.asarray(keep), err_msg=path)
    # the inputs are unchanged: the dense model is still dense, the pruned one has no o_proj bias
    assert masks_from_zeros(model, list(pruned.masks))["layers.mlp.up_proj.kernel"].all()
    assert not pruned.model.config.o_bias and result.model.config.o_bias


def test_restore_refuses_a_dense_model_whose_weights_pruning_took(tiny_model_dir):
    from flax import nnx

    import lcc_jax
    from lcc_jax.restore.job_folder import RestoreError

    model, tokenizer, _ = lcc_jax.load(tiny_model_dir)
    pruned = lcc_jax.prune(model, method="magnitude", sparsity="0.5")  # in place: `model` is pruned now
    with pytest.raises(RestoreError, match="same object"):
        lcc_jax.restore(model, pruned, tokenizer, **TINY)

    model, _, _ = lcc_jax.load(tiny_model_dir)
    clone = lcc_jax.prune(nnx.clone(model), tokenizer, method="wanda", batch_size=2,  # donates the shared arrays
                          calibration=lcc_jax.CalibrationConfig(nsamples=2, seqlen=32))
    with pytest.raises(RestoreError, match="in_place=False"):
        lcc_jax.restore(model, clone, tokenizer, **TINY)


@pytest.mark.slow
def test_restore_in_memory_trains_the_same_compensation_as_the_job_folder(in_memory, tiny_model_dir, tmp_path):
    from lcc_jax.data.calibration import CalibrationConfig
    from lcc_jax.pruning.api import PruneConfig
    from lcc_jax.restore.config import RestoreConfig
    from lcc_jax.restore.pipeline import Job, run

    _, _, _, result = in_memory
    out = tmp_path / "run"
    summary = run(Job(model=str(tiny_model_dir), out=out, restore=RestoreConfig(**TINY), prune=PruneConfig(**PRUNE),
                      calibration=CalibrationConfig(**CALIBRATION)))
    assert summary["selected_heads"] == result.heads.tolist()
    stored = np.load(out / "compensation.npz")
    np.testing.assert_allclose(np.asarray(result.compensation.beta), stored["beta"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(result.compensation.bias), stored["bias"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(result.components.basis, np.load(out / "components.npz")["basis"], atol=1e-6)


@pytest.mark.slow
def test_spread_heads_reach_the_in_memory_restore_and_the_job_folder_alike(in_memory, tiny_model_dir, tmp_path):
    """`spread_heads=True` through both entry points: the compensated heads are the probes' ranking taken in rounds
    over the layers (one per layer for 2 heads of a 2-layer model), the same in memory and in a job folder."""
    import lcc_jax
    from lcc_jax.data.calibration import CalibrationConfig
    from lcc_jax.pruning.api import PruneConfig
    from lcc_jax.restore.config import RestoreConfig
    from lcc_jax.restore.pipeline import Job, run
    from lcc_jax.restore.probe import spread_over_layers

    model, tokenizer, pruned, plain = in_memory
    spread = lcc_jax.restore(model, pruned, tokenizer, lcc_jax.RestoreConfig(**TINY), spread_heads=True)
    np.testing.assert_array_equal(spread.probes.ranking, plain.probes.ranking)  # the same probes either way
    assert spread.heads.tolist() == spread_over_layers(plain.probes.ranking, 4)[:2].tolist()
    assert sorted(spread.heads // 4) == [0, 1]
    summary = run(Job(model=str(tiny_model_dir), out=tmp_path / "run", prune=PruneConfig(**PRUNE),
                      restore=RestoreConfig(**TINY, spread_heads=True), calibration=CalibrationConfig(**CALIBRATION)))
    assert summary["selected_heads"] == spread.heads.tolist()
