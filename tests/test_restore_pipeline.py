"""scripts/restore.py end to end on a tiny model with a tiny tokenizer: stages, resume, refusal, invariants."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

TINY_TRAIN = dict(num_train=24, num_probe=16, num_valid=8, max_length=64, capture_length=64, epochs=1,
                  batch_size=4, capture_batch_size=8, eval_seqlen=64, eval_limit_chunks=2, top_k=0.25)


def _job(model_dir, out, **restore_overrides):
    from lcc_jax.data.calibration import CalibrationConfig
    from lcc_jax.pruning.api import PruneConfig
    from lcc_jax.restore.config import RestoreConfig
    from lcc_jax.restore.pipeline import Job

    return Job(model=str(model_dir), out=out, restore=RestoreConfig(**{**TINY_TRAIN, **restore_overrides}),
               prune=PruneConfig(method="wanda", sparsity="0.5", batch_size=4),
               calibration=CalibrationConfig(nsamples=4, seqlen=64))


@pytest.mark.slow
def test_restore_job_runs_every_stage_keeps_sparsity_and_resumes(tiny_model_dir, tmp_path):
    import lcc_jax
    from lcc_jax.checkpoint import load_pruned
    from lcc_jax.pruning.masks import masks_from_zeros
    from lcc_jax.restore.pipeline import RestoreError, run

    out = tmp_path / "run"
    summary = run(_job(tiny_model_dir, out))
    for stage in ("pairs.jsonl", "dense_capture", "pruned", "pruned_capture.npy", "components.npz", "probes.npz",
                  "compensation.npz", "restored", "restored_hf", "eval_dense.json", "eval_pruned.json",
                  "eval_restored.json", "summary.json"):
        assert (out / stage).exists(), stage
    assert summary["heads"] == 2 and summary["trainable_params"] == 2 * 2 * 16
    assert np.isfinite([summary["ppl_dense"], summary["ppl_pruned"], summary["ppl_restored"]]).all()

    # sparsity identical before and after restoration: the folded model has the pruned model's zeros
    pruned = load_pruned(out / "pruned")
    restored, _, _ = lcc_jax.load(out / "restored", tokenizer=False)
    after = masks_from_zeros(restored, list(pruned.masks))
    for path, keep in pruned.masks.items():
        np.testing.assert_array_equal(np.asarray(after[path]), np.asarray(keep), err_msg=path)

    # only beta and b of the selected heads are trained and stored
    stored = np.load(out / "compensation.npz")
    assert set(stored.files) == {"beta", "bias"} and stored["beta"].shape == (2, 16)

    # a finished run resumes to the same summary without redoing stages
    before = (out / "timings.json").read_text()
    again = run(_job(tiny_model_dir, out))
    assert again["ppl_restored"] == summary["ppl_restored"]
    assert json.loads((out / "timings.json").read_text()).keys() == json.loads(before).keys() | {"load"}

    # a changed configuration against the same folder is refused, unless restarting
    with pytest.raises(RestoreError, match="different configuration"):
        run(_job(tiny_model_dir, out, top_k=0.5))


@pytest.mark.slow
def test_folded_restored_model_equals_pruned_model_with_compensation(tiny_model_dir, tmp_path):
    import jax

    import lcc_jax
    from lcc_jax.checkpoint import load_pruned
    from lcc_jax.restore.compensation import dense_compensation, init_compensation, merge_trainable, split_trainable
    from lcc_jax.restore.components import LostComponents
    from lcc_jax.restore.pipeline import run
    from lcc_jax.restore.probe import ProbeResult

    out = tmp_path / "run"
    run(_job(tiny_model_dir, out, mode="bias_only"))
    pruned = load_pruned(out / "pruned").model
    restored, _, _ = lcc_jax.load(out / "restored", tokenizer=False)
    comps, probes = LostComponents.load(out / "components.npz"), ProbeResult.load(out / "probes.npz")
    comp = init_compensation(comps.basis, probes.ranking, 0.25, jax.random.key(42), mode="bias_only")
    trainable, frozen = split_trainable(comp)
    stored = np.load(out / "compensation.npz")
    comp = merge_trainable({k: jnp.asarray(stored[k]) for k in trainable}, frozen)
    np.testing.assert_array_equal(np.asarray(comp.beta), 0)  # bias_only: beta stays zero
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 384, (2, 16)))
    unfolded = pruned(tokens, compensation=dense_compensation(comp, pruned.config)).logits
    folded = restored(tokens).logits
    assert float(jnp.max(jnp.abs(folded - unfolded))) <= 1e-5


@pytest.mark.slow
def test_restore_accepts_a_model_pruned_elsewhere_and_recovers_masks_from_zeros(tiny_model_dir, tmp_path):
    import lcc_jax
    from lcc_jax.pruning.api import prune
    from lcc_jax.pruning.masks import masks_from_zeros
    from lcc_jax.restore.pipeline import run

    model, tokenizer, _ = lcc_jax.load(tiny_model_dir)
    pruned = prune(model, None, method="magnitude", sparsity="2:4").model
    lcc_jax.save_hf(pruned, tokenizer, tmp_path / "pruned_hf")
    job = _job(tiny_model_dir, tmp_path / "run", epochs=1, eval_limit_chunks=1)
    job.pruned = str(tmp_path / "pruned_hf")
    summary = run(job)
    assert summary["pruning"] == str(tmp_path / "pruned_hf")
    restored, _, _ = lcc_jax.load(tmp_path / "run" / "restored", tokenizer=False)
    before, after = masks_from_zeros(pruned), masks_from_zeros(restored)
    for path in before:
        np.testing.assert_array_equal(np.asarray(after[path]), np.asarray(before[path]), err_msg=path)


@pytest.mark.slow
def test_restore_after_structured_pruning_compares_kept_heads_with_their_dense_origin(tiny_model_dir, tmp_path):
    from lcc_jax.data.calibration import CalibrationConfig
    from lcc_jax.pruning.api import PruneConfig
    from lcc_jax.restore.capture import CaptureSet
    from lcc_jax.restore.pipeline import run

    job = _job(tiny_model_dir, tmp_path / "run", epochs=1, eval_limit_chunks=1)
    job.prune = PruneConfig(method="flap", sparsity=None, structured=0.5, batch_size=4)
    job.calibration = CalibrationConfig(nsamples=4, seqlen=64)
    summary = run(job)
    captures = CaptureSet.load(tmp_path / "run" / "dense_capture").replace(
        pruned_prompt=np.load(tmp_path / "run" / "pruned_capture.npy"),
        head_map=np.load(tmp_path / "run" / "pruned" / "head_map.npy"),
    )
    dense_q, _, _, pruned_q = captures.aligned()
    assert pruned_q.shape[1] == dense_q.shape[1] == 2 * 2  # 2 layers x 2 kept heads of 4
    assert np.isfinite(summary["ppl_restored"])


@pytest.mark.slow
def test_the_job_compiles_its_train_step_while_the_pruned_model_is_evaluated(tiny_model_dir, tmp_path, caplog):
    import logging

    from lcc_jax.restore.pipeline import run

    with caplog.at_level(logging.INFO):
        run(_job(tiny_model_dir, tmp_path / "run", learning_rate=2e-3))  # a step no other test compiled
    compiled = [r for r in caplog.records if r.getMessage().startswith("compiled the train step")]
    assert compiled and all(r.threadName.startswith("precompile_fit") for r in compiled), \
        [(r.threadName, r.getMessage()) for r in compiled]
    stages = [r.getMessage() for r in caplog.records if r.name == "lcc_jax.restore.job_folder"
              and " done in " in r.getMessage()]
    order = [m.split()[1] for m in stages]
    assert order.index("probes") < order.index("eval_pruned") < order.index("train"), order
