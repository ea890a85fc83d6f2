"""What limits RestoreLCC: a grid of restorations from one pruned model, trained side by side, chosen on validation.

Every member is "<ranking>:<mode>:<top_k>:<learning rate>[:e<epochs>]" on the RestoreLCC budget (samples, epochs,
batch, length), e.g. "probe:full:0.25:1e-3" (the paper's setting):
  ranking  probe (contrastive probes, the configured negatives) | probe-model (probes with the dense
           model's fallback negatives) | probe-layers (the probes' ranking spread evenly over the layers) |
           lofit (LoFiT's learned scaling) | grad (loss gradient) | random
  mode     full (δ = Vᵀβ + b) | bias (δ = b: LoFiT's bias step on these heads) | nobias (δ = Vᵀβ) |
           span<K> (δ = Σ_{i<K} β_i v_i: only the top-K lost directions, no bias)
  top_k    a fraction of all heads or a count

The study first screens every member on `screen_seeds`, then trains the `finalists` members with the
lowest Alpaca validation loss (never a test set) plus the reference members on `final_seeds`, and
scores those on WikiText-2 and the zero-shot tasks. Members are trained with `restore.grid.fit_grid`
(one compile, many restorations); each member's result is written atomically to
`<out>/<setting>/ablation/seed<k>/<member>.json` and skipped when present, so a stopped run resumes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lcc_jax.baselines.lofit import LofitConfig, select_heads
from lcc_jax.benchmark.cells import setting_slug, write_json
from lcc_jax.benchmark.config import RecoveryConfig, parse_setting
from lcc_jax.benchmark.methods import export_audit, scores
from lcc_jax.benchmark.recovery import prune_cell
from lcc_jax.eval.perplexity import perplexity_of_tokens, wikitext2_test_ids
from lcc_jax.restore.compensation import dense_compensation, init_compensation, num_trainable, restrict_span
from lcc_jax.restore.config import RestoreConfig
from lcc_jax.restore.fold import fold_compensation
from lcc_jax.restore.grid import GridMember, fit_grid
from lcc_jax.restore.hints import OutOfMemory, first_line, is_out_of_memory, train_memory_advice
from lcc_jax.restore.job_folder import claim
from lcc_jax.restore.pipeline import Job, prepare
from lcc_jax.restore.probe import spread_over_layers
from lcc_jax.signals import graceful
from lcc_jax.study.members import DEFAULT_MEMBERS, REFERENCES, AblationError, MemberSpec
from lcc_jax.study.rankings import gradient_ranking, random_ranking
from lcc_jax.study.table import load_rows

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AblationConfig:
    """The study: settings, members, seeds, and the shared RestoreLCC budget and scoring."""

    settings: tuple[str, ...] = ("wanda:0.5", "sparsegpt:2:4")
    members: tuple[str, ...] = DEFAULT_MEMBERS
    screen_seeds: tuple[int, ...] = (0,)
    final_seeds: tuple[int, ...] = (0, 1, 2)
    finalists: int = 3  # best screened members by validation loss, trained on every final seed
    members_per_grid: int = 16  # restorations trained side by side (memory grows with it)
    lofit_select_learning_rate: float = 5e-3
    gradient_batches: int = 32  # training micro-batches for the gradient ranking
    recovery: RecoveryConfig = RecoveryConfig()  # the budget (restore), scoring (tasks, limit), dtype, calibration

    def __post_init__(self):
        for name in self.members:
            MemberSpec.parse(name)
        for name in REFERENCES:
            MemberSpec.parse(name)
        if self.finalists < 0 or self.members_per_grid < 1:
            raise AblationError("finalists must be >= 0 and members_per_grid >= 1.")

    @property
    def restore(self) -> RestoreConfig:
        return self.recovery.restore


def run_ablation(source: str, out: Path, config: AblationConfig, *, mesh=None) -> dict[str, Any]:
    """Run (or resume) the study on every setting; returns {setting: rows}."""
    out = Path(out)
    for setting in config.settings:
        setting_dir = out / setting_slug(setting)
        prune_cell(source, setting_dir, setting, config.recovery, mesh)
        _Setting(source, setting, setting_dir, config, mesh).run()
    results = load_rows(out)  # every setting in the folder, also those of earlier runs
    write_json(out / "ablation.json", {s: [_without_per_doc(r) for r in rows] for s, rows in results.items()})
    return results


class _Setting:
    """One pruning setting: its prepared restorations, rankings, grids and scores."""

    def __init__(self, source: str, setting: str, setting_dir: Path, config: AblationConfig, mesh):
        self.source, self.setting, self.dir, self.config, self.mesh = source, setting, setting_dir, config, mesh
        self.folder = setting_dir / "ablation"
        self._prepared: dict[str, Any] = {}
        self._rankings: dict[str, np.ndarray] = {}
        self._grid_size: int | None = None  # set smaller than members_per_grid once a grid ran out of memory

    # ---------------------------------------------------------------- stages

    def run(self) -> None:
        """Screen every member, choose the finalists by validation loss, train and score them on the final seeds."""
        c = self.config
        screened = [self._member_rows(c.members, seed) for seed in c.screen_seeds]
        by_loss = sorted(c.members, key=lambda name: np.mean([rows[name]["valid_loss"] for rows in screened]))
        finalists = list(dict.fromkeys(by_loss[: c.finalists] + list(REFERENCES)))
        log.info("%s: finalists by validation loss: %s", self.setting, by_loss[: c.finalists])
        write_json(self.folder / "finalists.json", {"by_valid_loss": by_loss, "finalists": finalists})
        for seed in c.final_seeds:
            self._member_rows(finalists, seed, score=True)

    def _member_rows(self, names, seed: int, *, score: bool = False) -> dict[str, dict]:
        """Train the members of `names` not yet done for `seed`, in grids; score them; return their rows."""
        folder = self.folder / f"seed{seed}"
        todo = [n for n in names if not (folder / f"{_slug(n)}.json").exists()]
        by_epochs: dict[int, list[str]] = {}  # one grid trains one schedule: members group by their epochs
        for name in todo:
            by_epochs.setdefault(MemberSpec.parse(name).epochs or self.config.restore.epochs, []).append(name)
        for epochs, group in by_epochs.items():
            self._train_in_grids(group, seed, folder, epochs)
        rows = {n: json.loads((folder / f"{_slug(n)}.json").read_text()) for n in names}
        if score:
            for name, row in rows.items():
                if "zeroshot" not in row and self.config.recovery.tasks:
                    row.update(self._score(name, seed, folder, full=True))
                    write_json(folder / f"{_slug(name)}.json", row)
        return rows

    def _train_in_grids(self, names: list[str], seed: int, folder: Path, epochs: int) -> None:
        """Train `names` in grids of at most `members_per_grid`; a grid that runs out of device memory is halved and
        retried (the smaller size then holds for the rest of the run), so one setting serves an 80 GB and a 141 GB
        card. A single member that does not fit raises OutOfMemory with the flags that lower the memory."""
        start = 0
        while start < len(names):
            size = self._grid_size or self.config.members_per_grid
            chunk = names[start : start + size]
            try:
                with graceful():  # the handler installed anew once the device is up (see lcc_jax.signals)
                    self._train_grid(chunk, seed, folder, epochs)
            except Exception as error:  # noqa: BLE001 - only out-of-memory is handled; the rest re-raises
                if not is_out_of_memory(error):
                    raise
                if len(chunk) == 1:
                    advice = train_memory_advice(self.config.restore, self.config.recovery.dtype, self.mesh)
                    raise OutOfMemory(f"one restoration of {chunk[0]!r} does not fit the device even alone "
                                      f"({first_line(error)}); lower its memory with: {'; '.join(advice)}") from error
                self._grid_size = len(chunk) // 2
                log.warning("%d members in one grid ran out of device memory; retrying in grids of %d "
                            "(--members-per-grid %d skips this retry)", len(chunk), self._grid_size, self._grid_size)
                continue
            start += len(chunk)

    def _train_grid(self, names: list[str], seed: int, folder: Path, epochs: int) -> None:
        prepared = self._prepare("probe")
        restore = dataclasses.replace(self.config.restore, seed=self.config.restore.seed + seed, epochs=epochs)
        members = [GridMember(n, self._init(MemberSpec.parse(n), restore.seed, seed), MemberSpec.parse(n).learning_rate,
                              restore.seed) for n in names]
        config = restore.train_config()
        data = prepared.train_data
        folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        results = fit_grid(prepared.model, members, lambda s: data.epoch_batches(dataclasses.replace(config, seed=s)),
                           config, valid_batches=data.valid, mesh=self.mesh)
        seconds = time.perf_counter() - started
        for member, result in zip(members, results):
            row = {"setting": self.setting, "member": member.name, "seed": seed,
                   "valid_loss": result.history["valid_loss"][-1] if result.history["valid_loss"] else None,
                   "valid_loss_per_epoch": result.history["valid_loss"], "train_loss_last": result.history["loss"][-1],
                   "heads": np.asarray(result.compensation.heads).tolist(),
                   "trainable_params": _trainable(result.compensation), "epochs": epochs,
                   "grid_size": len(members), "grid_seconds": seconds}
            np.savez(folder / f".{_slug(member.name)}.npz.tmp.npz", beta=np.asarray(result.compensation.beta),
                     bias=np.asarray(result.compensation.bias), heads=np.asarray(result.compensation.heads))
            (folder / f".{_slug(member.name)}.npz.tmp.npz").replace(folder / f"{_slug(member.name)}.npz")
            row.update(self._score(member.name, seed, folder, full=False, compensation=result.compensation))
            write_json(folder / f"{_slug(member.name)}.json", row)

    def _score(self, name: str, seed: int, folder: Path, *, full: bool, compensation=None) -> dict:
        """Perplexity (and its per-chunk NLL) through the compensation door; with `full`, the exported (folded)
        model's scores."""
        prepared = self._prepare("probe")
        comp = compensation if compensation is not None else self._load(name, seed, folder)
        delta = dense_compensation(comp, prepared.model.config)
        r = self.config.restore
        if not full:
            ppl = perplexity_of_tokens(prepared.model, wikitext2_test_ids(prepared.tokenizer), r.eval_seqlen,
                                       limit_chunks=r.eval_limit_chunks, mesh=self.mesh, source="wikitext2",
                                       model_kwargs={"compensation": delta.astype(prepared.model.dtype)})
            return {"ppl": float(ppl.ppl), "ppl_chunk_nll": list(ppl.chunk_nll)}  # paired intervals need the chunks
        folded = fold_compensation(prepared.model, delta)
        return {**scores(folded, prepared.tokenizer, self.config.recovery, self.mesh),
                **export_audit(folded, prepared.masks)}

    # ---------------------------------------------------------------- inputs

    def _prepare(self, kind: str):
        """The RestoreLCC job up to the probes on this setting's pruned checkpoint ("probe-model": fallback negatives)."""
        if kind not in self._prepared:
            restore = self.config.restore
            if kind == "probe-model":
                restore = dataclasses.replace(restore, negatives="model")
            job = Job(model=self.source, out=self.dir / ("restore" if kind == "probe" else "restore-model-negatives"),
                      restore=restore, prune=parse_setting(self.setting), calibration=self.config.recovery.calibration,
                      pruned=str(self.dir / "pruned"), dtype=self.config.recovery.dtype, mesh=self.mesh,
                      export_hf=False)
            claim(job.out, job.fingerprint(), False)
            self._prepared[kind] = prepare(job)
        return self._prepared[kind]

    def _ranking(self, kind: str, seed: int) -> np.ndarray:
        if kind == "random":
            return random_ranking(self._prepare("probe").model.config.total_heads, 1000 + seed)
        if kind in self._rankings:
            return self._rankings[kind]
        path = self.dir / "ablation" / f"ranking_{kind}.npy"
        if path.exists():
            self._rankings[kind] = np.load(path)
            return self._rankings[kind]
        prepared = self._prepare("probe")
        if kind in ("probe", "probe-model"):
            ranking = self._prepare(kind).probes.ranking
        elif kind == "probe-layers":
            ranking = spread_over_layers(self._ranking("probe", seed), prepared.model.config.num_heads)
        elif kind == "grad":
            batches = prepared.train_data.epoch_batches(self.config.restore.train_config())(0)
            ranking = gradient_ranking(prepared.model, batches[: self.config.gradient_batches])[1]
        else:  # lofit
            config = self.config.restore.train_config()
            selection = select_heads(prepared.model, prepared.train_data.epoch_batches(config), config,
                                     LofitConfig(select_learning_rate=self.config.lofit_select_learning_rate),
                                     jax.random.key(self.config.restore.seed), valid_batches=None, mesh=self.mesh)
            ranking = selection.ranking
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path.with_name(f".{path.name}.tmp.npy"), np.asarray(ranking))
        path.with_name(f".{path.name}.tmp.npy").replace(path)
        self._rankings[kind] = np.asarray(ranking)
        return self._rankings[kind]

    def _init(self, spec: MemberSpec, init_seed: int, seed: int):
        """The member's initial Compensation, drawn exactly as a single RestoreLCC run with that seed draws it."""
        prepared = self._prepare("probe")
        comp = init_compensation(prepared.components.basis, self._ranking(spec.ranking, seed), spec.top_k,
                                 jax.random.key(init_seed), std=self.config.restore.init_std, mode=spec.mode)
        return restrict_span(comp, spec.span) if spec.span is not None else comp

    def _load(self, name: str, seed: int, folder: Path):
        stored = np.load(folder / f"{_slug(name)}.npz")
        comp = self._init(MemberSpec.parse(name), self.config.restore.seed + seed, seed)
        return dataclasses.replace(comp, beta=jax.numpy.asarray(stored["beta"]), bias=jax.numpy.asarray(stored["bias"]))


def _without_per_doc(row: dict) -> dict:
    """A row without its per-document outcomes and per-chunk NLL (kept in the member's own file)."""
    row = {k: v for k, v in row.items() if k != "ppl_chunk_nll"}
    if "zeroshot" in row:
        row["zeroshot"] = {t: {k: v for k, v in r.items() if not k.startswith("correct")} for t, r in row["zeroshot"].items()}
    return row


def _slug(name: str) -> str:
    return name.replace(":", "_")


def _trainable(comp) -> int:
    if comp.mode == "no_bias":  # a restricted span trains only its K rows per head
        return int(np.count_nonzero(np.abs(np.asarray(comp.basis)).sum(-1)))
    return num_trainable(comp)
