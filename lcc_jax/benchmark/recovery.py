"""The recovery benchmark: dense, pruned, and each recovery method on the same pruned models, budget and data.

    config = RecoveryConfig(settings=("wanda:0.5", "sparsegpt:2:4", "flap:0.2"))
    results = run_recovery("smollm2-135m", Path("out/recovery"), config)

For every pruning setting the dense model is pruned once (`<setting>/pruned`, a scripts/prune.py
checkpoint) and every method starts from that checkpoint, seed by seed:

    lora        LoRA, the Wanda paper's recipe (q, v; r 8, alpha 16), merged into the kernels
    dora        DoRA on all projections, merged
    masked_lora LoRA on all projections with the merged update masked by the pruning mask
    lofit       LoFiT (L1 head selection, then per-head biases), folded into o_proj's bias
    bias_only   RestoreLCC's bias-only ablation on the probe ranking of the RestoreLCC run
    restorelcc  the whole RestoreLCC job (`restore.pipeline`), folded into o_proj's bias

All of them train with the shared trainer on the same samples, epochs and batch as RestoreLCC (its
`RestoreConfig`); only the learning rates differ, each method's published one. Every model is
scored as it would be exported (adapters merged, vectors folded): WikiText-2 perplexity, the
zero-shot tasks, and the sparsity that survives the merge; each cell also keeps every chunk's NLL and
every document's 0/1 outcome, from which the table's paired-bootstrap intervals against the pruned
model and RestoreLCC are computed (`eval.bootstrap`). Each cell's result is written atomically
to `<setting>/seed<k>/<method>.json` and skipped when present, so a stopped run resumes. One process runs
every cell: the dense model, its tokenizer, each setting's pruned checkpoint and each seed's training data are
read once (`loaded.Loaded`), so WikiText-2 and the zero-shot requests are tokenized once, and cells of the same
shapes reuse the compiled programs (the runner's and the trainer's caches). The configuration
is `config.RecoveryConfig`, the cells' files `cells`, the methods themselves `methods`, the table and charts
`table`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

from lcc_jax.benchmark.cells import same_prune, setting_slug, write_json
from lcc_jax.benchmark.config import RecoveryConfig, RecoveryError, compute_dtype, parse_setting
from lcc_jax.benchmark.loaded import Loaded
from lcc_jax.benchmark.methods import RUNNERS, Context, export_audit, scores, wikitext2_perplexity
from lcc_jax.benchmark.table import write_report
from lcc_jax.checkpoint import load_pruned, save_prune_result
from lcc_jax.convert.load import check_source, load
from lcc_jax.progress import plan_stage
from lcc_jax.pruning.api import prune
from lcc_jax.restore.hints import OutOfMemory, first_line, is_out_of_memory, train_memory_advice
from lcc_jax.restore.job_folder import claim
from lcc_jax.signals import graceful

log = logging.getLogger(__name__)


def run_recovery(source: str, out: Path, config: RecoveryConfig, *, mesh=None, restart: bool = False,
                 prune_only: bool = False) -> dict:
    """Run (or resume) every cell; returns and writes `results.json` (and the table and charts).

    `prune_only`: the dense cell and each setting's pruned checkpoint and scores, no training: a base that runs
    on other machines or GPUs hard-link (`setting/pruned`, `setting/pruned.json`) so every method of a table
    split over them starts from the same mask.
    """
    out = Path(out)
    check_source(source)  # a typo'd model path is refused before --out is made
    claim(out, config.fingerprint(), restart)  # refuses a changed budget unless restart; lists may grow
    loaded = Loaded(source, config, mesh)  # read on first use, then shared by every cell
    with plan_stage("dense"):  # each cell a stage of the followed estimate (lcc_jax.estimate), if any
        _dense_cell(loaded, out)
    for setting in config.settings:
        setting_dir = out / setting_slug(setting)
        contexts = [Context(source, setting_dir, setting, seed, config, mesh, loaded) for seed in config.seeds]
        if (setting_dir / "pruned.json").exists() and all(
                (ctx.out / f"{method}.json").exists() for ctx in contexts for method in config.methods):
            log.info("%s: every cell done already", setting)  # no pruning again for nothing
            continue
        with plan_stage(f"{setting} prune"):
            prune_cell(source, setting_dir, setting, config, mesh, loaded)
        if prune_only:
            continue
        for ctx in contexts:
            seed = ctx.seed
            for method in config.methods:
                path = ctx.out / f"{method}.json"
                if path.exists():
                    log.info("%s / seed %d / %s: done already", setting, seed, method)
                    continue
                log.info("%s / seed %d / %s ...", setting, seed, method)
                try:  # graceful: installs the SIGINT / SIGTERM handler itself, once the device is up (see signals)
                    with graceful(), plan_stage(f"{setting}/seed{seed}/{method}"):
                        row = RUNNERS[method](ctx)
                except Exception as error:  # noqa: BLE001 - only out-of-memory is translated; the rest re-raises
                    if isinstance(error, OutOfMemory) or not is_out_of_memory(error):
                        raise
                    raise cell_out_of_memory(f"{setting_slug(setting)}/seed{seed}/{method}", out, config, mesh,
                                             error) from error
                write_json(path, {"setting": setting, "method": method, "seed": seed, **row})
                write_report(out, config)  # a table after every cell, so a stopped run shows what it has
    return write_report(out, config)


def cell_out_of_memory(cell: str, out: Path, config: RecoveryConfig, mesh, error: BaseException) -> OutOfMemory:
    """An `OutOfMemory` for a cell (a LoRA-family or LoFiT cell: RestoreLCC's own stages name their knobs), saying
    which flags lower its memory and which of them keep the finished cells of `out` usable."""
    fresh = train_memory_advice(config.restore, config.dtype, mesh)
    return OutOfMemory(
        f"cell {cell} ran out of device memory ({first_line(error)}). The finished cells stay in {out}. "
        f"--zeroshot-batch-size {max(config.zeroshot_batch_size // 2, 1)} (now {config.zeroshot_batch_size}) "
        f"changes no result, so the same --out resumes with it; with a new --out (or --restart): {'; '.join(fresh)}; "
        "or leave the method out with --methods."
    )


def _dense_cell(loaded: Loaded, out: Path) -> None:
    path = out / "dense.json"
    if path.exists():
        return
    model, config = loaded.dense(), loaded.config
    write_json(path, {"setting": "dense", "method": "dense", "seed": None,
                      **scores(model, loaded.tokenizer, config, loaded.mesh), **export_audit(model, None)})


def _check_same_prune(checkpoint, pruned_dir: Path, scored: Path, setting: str, config: RecoveryConfig, mesh) -> None:
    """Refuse to add cells from a new prune to cells made from an earlier one that scored otherwise (SparseGPT's
    near-ties flip on another GPU): the new checkpoint is removed and the folder left as it was."""
    ppl = float(wikitext2_perplexity(checkpoint.model, checkpoint.tokenizer, config, mesh).ppl)
    before = float(json.loads(scored.read_text())["ppl"])
    if same_prune(ppl, before):
        log.info("%s: pruned again (the checkpoint was gone): WikiText-2 ppl %.5f, the cells' prune %.5f", setting,
                 ppl, before)
        return
    shutil.rmtree(pruned_dir)
    raise RecoveryError(
        f"{setting}: pruning again (its checkpoint {pruned_dir} was gone) gave another pruned model: WikiText-2 ppl "
        f"{ppl:.3f}, where the cells in {scored.parent} were made from one that scored {before:.3f}. They cannot "
        "share a table. Keep the pruned checkpoint with the cells (or hard-link it in with --base), or start a new "
        "--out folder.")


def prune_cell(source: str, setting_dir: Path, setting: str, config: RecoveryConfig, mesh,
               loaded: Loaded | None = None) -> None:
    """Prune once per setting (saved as scripts/prune.py does) and score the pruned model; with `loaded`, the
    dense model and the pruned checkpoint come from (and stay in) it instead of being read here."""
    pruned_dir = setting_dir / "pruned"
    prune_config = dataclasses.replace(parse_setting(setting), batch_size=config.prune_batch_size)
    path = setting_dir / "pruned.json"

    def load_checkpoint():
        return (loaded.pruned(pruned_dir) if loaded is not None
                else load_pruned(pruned_dir, dtype=compute_dtype(config), mesh=mesh))

    if not pruned_dir.exists():
        if loaded is not None:
            model, tokenizer = loaded.dense(), loaded.tokenizer
        else:
            model, tokenizer, _ = load(source, dtype=compute_dtype(config), mesh=mesh)
        tokens = config.calibration.tokens(tokenizer) if prune_config.needs_calibration else None
        save_prune_result(pruned_dir, prune(model, tokens, prune_config, mesh=mesh), tokenizer, prune_config)
        del model
        if path.exists():  # the cells here came from an earlier prune whose checkpoint is gone
            _check_same_prune(load_checkpoint(), pruned_dir, path, setting, config, mesh)
    if not path.exists():
        checkpoint = load_checkpoint()
        write_json(path, {"setting": setting, "method": "pruned", "seed": None,
                          **scores(checkpoint.model, checkpoint.tokenizer, config, mesh),
                          **export_audit(checkpoint.model, checkpoint.masks),
                          "prune_seconds": checkpoint.meta.get("seconds")})
