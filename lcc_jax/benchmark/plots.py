"""Pictures of a RestoreLCC run: which heads the probes chose, where pruning lost the most, what came back.

  * `plot_head_scores`: probe accuracy of every head as a (layers × heads) heatmap, the selected heads boxed;
  * `plot_component_energy`: lost-component energy Σ_h ‖ΔZ_h‖²_F (= Σ S²) per layer;
  * `plot_recovery`: grouped bars of methods (dense, pruned, LoRA, …, RestoreLCC) per pruning setting;
  * `plot_restore_run`: all of the above (and the training loss) from a finished `scripts/restore.py` folder.

Each `*_figure` builds a `matplotlib.figure.Figure` without pyplot (no global backend is touched, so a
notebook's inline plots keep working); each `plot_*` saves one PNG of exactly `figsize · dpi` pixels and
returns its path. matplotlib is imported only here, so `import lcc_jax` does not need it.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import numpy as np

from lcc_jax.restore.compensation import init_compensation
from lcc_jax.restore.components import LostComponents
from lcc_jax.restore.config import RestoreConfig
from lcc_jax.restore.probe import ProbeResult
from lcc_jax.restore.steps import head_ranking

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

DPI = 120
SELECTED_GID = "selected"  # gid of the boxes around selected heads (tests count them)
METRIC_LABELS = {
    "ppl": "WikiText-2 perplexity (lower is better)",
    "mean_acc": "mean zero-shot accuracy, % (higher is better)",
}
PLOTS_DIR = "plots"


# ----------------------------------------------------------------------------------- figures


def head_scores_figure(scores, selected=(), *, title: str | None = None, figsize=None) -> Figure:
    """Heatmap of (layers, heads) probe scores; `selected` heads, as (layer, head) pairs or flat l·H + h, boxed."""
    from matplotlib.patches import Rectangle

    scores = np.asarray(scores, np.float64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be (layers, heads), not {scores.shape}.")
    layers, heads = scores.shape
    pairs = selected_pairs(selected, heads)
    if pairs.size and (pairs[:, 0].max() >= layers or pairs.min() < 0):
        raise ValueError(f"selected heads {pairs.tolist()} lie outside {layers} layers × {heads} heads.")
    fig = _figure(figsize or (_clamp(2.5 + 0.35 * heads, 5, 14), _clamp(1.5 + 0.22 * layers, 3.5, 12)))
    ax = fig.add_subplot()
    image = ax.imshow(scores, aspect="auto", cmap="viridis", origin="lower", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="probe validation accuracy")
    for layer, head in pairs:
        ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="#ff3b30", linewidth=1.6,
                               gid=SELECTED_GID))
    ax.set(xlabel="head", ylabel="layer",
           title=title or f"head probe scores ({len(pairs)} of {layers * heads} heads selected, boxed)")
    _integer_ticks(ax, heads, layers)
    return fig


def component_energy_figure(energy, *, title: str | None = None, figsize=None) -> Figure:
    """Bars of lost-component energy per layer; `energy` is (layers,) or per head (layers, heads), summed."""
    energy = np.asarray(energy, np.float64)
    if energy.ndim == 2:
        energy = energy.sum(-1)
    if energy.ndim != 1:
        raise ValueError(f"energy must be (layers,) or (layers, heads), not {energy.shape}.")
    fig = _figure(figsize or (_clamp(2 + 0.25 * energy.size, 5, 14), 3.8))
    ax = fig.add_subplot()
    ax.bar(np.arange(energy.size), energy, color="#4c72b0")
    ax.set(xlabel="layer", ylabel="Σ over heads of ‖ΔZ‖²  (Σ S²)",
           title=title or f"lost-component energy per layer (total {energy.sum():.4g})")
    _integer_ticks(ax, energy.size, None)
    return fig


def recovery_figure(rows: Sequence[Mapping], metric: str = "ppl", error: str | None = None, *,
                    title: str | None = None, figsize=None) -> Figure:
    """Grouped bars: one group per `setting`, one bar per `method`, height `row[metric]` (None skipped),
    error bars from `row[error]` where given. Perplexities spanning more than 10× get a log axis."""
    kept = [r for r in rows if r.get(metric) is not None and math.isfinite(float(r[metric]))]
    if not kept:
        raise ValueError(f"no row has a finite {metric!r}.")
    settings = list(dict.fromkeys(str(r["setting"]) for r in kept))
    methods = list(dict.fromkeys(str(r["method"]) for r in kept))
    fig = _figure(figsize or (_clamp(2.5 + 0.45 * len(settings) * len(methods), 6, 16), 4.2))
    ax = fig.add_subplot()
    width = 0.8 / len(methods)
    colors = _colors(len(methods))
    for m, method in enumerate(methods):
        xs, ys, errs = [], [], []
        for r in kept:
            if str(r["method"]) == method:
                xs.append(settings.index(str(r["setting"])) + (m - (len(methods) - 1) / 2) * width)
                ys.append(float(r[metric]))
                errs.append(float(r[error]) if error and r.get(error) is not None else 0.0)
        bars = ax.bar(xs, ys, width, label=method, color=colors[m], yerr=errs if any(errs) else None, capsize=3)
        ax.bar_label(bars, fmt="%.3g", fontsize=7, padding=2)
    values = [float(r[metric]) for r in kept]
    if metric == "ppl" and min(values) > 0 and max(values) / min(values) > 10:
        ax.set_yscale("log")
    elif min(values) >= 0:
        ax.set_ylim(bottom=0)
    ax.set_xticks(range(len(settings)), settings)
    ax.set(ylabel=METRIC_LABELS.get(metric, metric), title=title or "recovery after pruning")
    ax.legend(fontsize=8, ncols=min(len(methods), 4), loc="upper left", bbox_to_anchor=(0, -0.12), frameon=False)
    return fig


def loss_figure(history: Mapping[str, Sequence[float]], *, figsize=None) -> Figure:
    """Training loss per step (and validation loss at the end of each epoch, where recorded)."""
    fig = _figure(figsize or (6, 3.8))
    ax = fig.add_subplot()
    loss = list(history.get("loss") or [])
    ax.plot(np.arange(1, len(loss) + 1), loss, label="train", color="#4c72b0")
    valid = list(history.get("valid_loss") or [])
    if valid and loss:
        ax.plot(np.linspace(len(loss) / len(valid), len(loss), len(valid)), valid, "o-", label="validation",
                color="#dd8452")
    ax.set(xlabel="step", ylabel="cross-entropy on responses", title="compensation training")
    _integer_ticks(ax, max(len(loss), 1), None)
    ax.legend()
    return fig


# ----------------------------------------------------------------------------------- files


def plot_head_scores(scores, selected, path, **kwargs) -> Path:
    """Write `head_scores_figure` to `path` (PNG); returns the path."""
    return save_figure(head_scores_figure(scores, selected, **kwargs), path)


def plot_component_energy(energy, path, **kwargs) -> Path:
    """Write `component_energy_figure` to `path` (PNG); returns the path."""
    return save_figure(component_energy_figure(energy, **kwargs), path)


def plot_recovery(rows: Sequence[Mapping], path, metric: str = "ppl", error: str | None = None, **kwargs) -> Path:
    """Write `recovery_figure` to `path` (PNG); returns the path."""
    return save_figure(recovery_figure(rows, metric, error, **kwargs), path)


def plot_restore_run(out_folder) -> list[Path]:
    """Pictures of a finished restore folder into `out_folder/plots/`: head scores, component energy,
    training loss, and the dense / pruned / restored perplexities; returns the paths written."""
    out = Path(out_folder)
    folder = out / PLOTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    layers = run_num_layers(out)
    probes = ProbeResult.load(out / "probes.npz")
    components = LostComponents.load(out / "components.npz")
    scores = probes.accuracy.reshape(layers, -1)
    written = [
        plot_head_scores(scores, selected_heads(out, probes, components), folder / "head_scores.png"),
        plot_component_energy(components.layer_energy(layers), folder / "component_energy.png"),
    ]
    history_path = out / "train_history.json"
    if history_path.exists() and json.loads(history_path.read_text()).get("loss"):
        written.append(save_figure(loss_figure(json.loads(history_path.read_text())), folder / "train_loss.png"))
    rows = perplexity_rows(out)
    if rows:
        written.append(plot_recovery(rows, folder / "perplexity.png", metric="ppl",
                                     title="WikiText-2 perplexity before and after RestoreLCC"))
    log.info("wrote %d plots into %s", len(written), folder)
    return written


def save_figure(fig: Figure, path) -> Path:
    """Save `fig` as a PNG of exactly figsize · dpi pixels, atomically (a temp file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=fig.dpi)
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------------- run folders


def selected_pairs(selected, heads_per_layer: int) -> np.ndarray:
    """(k, 2) int (layer, head) from (layer, head) pairs or flat indices l·H + h."""
    arr = np.asarray(selected, np.int64)
    if arr.size == 0:
        return np.zeros((0, 2), np.int64)
    if arr.ndim == 1:
        return np.stack(np.divmod(arr, heads_per_layer), axis=-1)
    if arr.ndim == 2 and arr.shape[1] == 2:
        return arr
    raise ValueError(f"selected heads must be flat indices or (layer, head) pairs, not shape {arr.shape}.")


def run_num_layers(out: Path) -> int:
    """The layer count of a restore folder's model (restored, exported or pruned config)."""
    for path in (out / "restored" / "config.json", out / "restored_hf" / "config.json"):
        if path.is_file():
            return int(json.loads(path.read_text())["num_hidden_layers"])
    meta = out / "pruned" / "meta.json"
    if meta.is_file():
        return int(json.loads(meta.read_text())["config"]["num_hidden_layers"])
    raise FileNotFoundError(f"{out} has no restored/config.json or pruned/meta.json: is it a restore folder?")


def selected_heads(out: Path, probes, components) -> np.ndarray:
    """Flat indices of the heads the run compensated: summary.json's list where recorded, else chosen again
    from the stored probes and configuration exactly as the pipeline does (`init_compensation`)."""
    summary = out / "summary.json"
    if summary.is_file():
        recorded = json.loads(summary.read_text()).get("selected_heads")
        if recorded is not None:
            return np.asarray(recorded, np.int64)
    r = json.loads((out / "run.json").read_text())["restore"]
    spread = bool(r.get("spread_heads"))  # the layer count is read only where the ranking needs it
    ranking = head_ranking(RestoreConfig(spread_heads=spread), probes, run_num_layers(out) if spread else 1)
    comp = init_compensation(components.basis, ranking, r["top_k"], jax.random.key(r["seed"]),
                             mode=r.get("mode", "full"), random_heads=r.get("random_heads", False))
    return np.asarray(comp.heads, np.int64)


def perplexity_rows(out: Path) -> list[dict]:
    """{"setting", "method", "ppl"} rows from eval_{dense,pruned,restored}.json, as far as they exist."""
    setting = _pruning_label(out)
    rows = []
    for name, method in (("dense", "dense"), ("pruned", "pruned"), ("restored", "RestoreLCC")):
        path = out / f"eval_{name}.json"
        if path.is_file():
            rows.append({"setting": setting, "method": method, "ppl": json.loads(path.read_text())["wikitext2_ppl"]})
    return rows


def _pruning_label(out: Path) -> str:
    summary = out / "summary.json"
    return str(json.loads(summary.read_text()).get("pruning", "pruned")) if summary.is_file() else "pruned"


# ----------------------------------------------------------------------------------- helpers


def _figure(figsize) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install matplotlib") from e
    return Figure(figsize=figsize, dpi=DPI, layout="constrained")


def _integer_ticks(ax, x_count: int, y_count: int | None) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(x_count, 16)))
    if y_count is not None:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(y_count, 16)))


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _clamp(value: float, low: float, high: float) -> float:
    return max(low, min(high, value))
