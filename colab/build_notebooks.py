#!/usr/bin/env python
"""Write colab/restore_tpu.ipynb and colab/restore_gpu.ipynb from one list of cells, so they cannot drift apart.

The two notebooks differ only in their title, runtime note and device cell; both detect the runtime they got
(the jax extra to install, the preset: `quick` on a CPU). Edit the cells here and run
`python colab/build_notebooks.py`; tests/test_notebooks.py fails when a notebook differs from this source,
and executes both on a CPU with a tiny configuration added after the `parameters` cell.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

PRESET_MD = (
    "Then the preset: with `PRESET = \"auto\"` a CPU runtime gets `quick` (a faithful small run of the whole "
    "job, minutes on 2 cores: fewer samples and shorter texts, same method), a GPU or TPU the paper's settings; "
    "`RESTORE`, `CALIBRATION` and `ZEROSHOT_LIMIT` given above still win over the preset."
)

CHOOSE_PRESET = '''
from lcc_jax.data.calibration import CalibrationConfig
from lcc_jax.restore.config import PRESET_EXTRAS, PRESETS

if PRESET == "auto":  # the paper's settings take hours on a CPU: a small faithful run there
    PRESET = "quick" if jax.default_backend() == "cpu" else "paper"
extras = PRESET_EXTRAS.get(PRESET, {})
calibration_fields = {f for f in CalibrationConfig.__dataclass_fields__}
RESTORE = {**PRESETS[PRESET], **RESTORE}  # what the cells above set wins
CALIBRATION = {**{k: v for k, v in extras.items() if k in calibration_fields}, **CALIBRATION}
if ZEROSHOT_LIMIT == "auto":
    ZEROSHOT_LIMIT = extras.get("limit", 200)
print(f"preset {PRESET} on a {jax.default_backend().upper()} runtime: restore {RESTORE}, calibration {CALIBRATION}, "
      f"zero-shot limit {ZEROSHOT_LIMIT}")'''

VARIANTS = {
    "tpu": dict(
        title="RestoreLCC on a TPU",
        runtime="**Runtime:** *Runtime → Change runtime type → TPU*. All TPU cores share the model through one "
        "`fsdp` mesh axis (weights and batches are split across them).",
        colab={"accelerator": "TPU", "colab": {"gpuType": "V28", "provenance": []}},
        devices='''import jax

import lcc_jax

print(jax.devices())  # a TPU runtime lists one TpuDevice per core
if jax.default_backend() != "tpu":
    print(f"no TPU in this runtime ({jax.default_backend()}): the same code runs on {jax.device_count()} device(s)")
mesh = lcc_jax.make_mesh(MESH) if MESH else None  # "fsdp=-1": every device on the fsdp axis
print("mesh:", dict(mesh.shape) if mesh else "one device")
''' + CHOOSE_PRESET,
        devices_md="## 3. Devices, mesh and preset\n\n`jax.devices()` should list the TPU cores. lcc_jax places the model "
        "on a `(data, fsdp, tensor)` mesh; with `MESH = \"fsdp=-1\"` every core holds a slice of every weight and of "
        "every batch (on a TPU pod slice, `lcc_jax.distributed.initialize()` first). " + PRESET_MD,
    ),
    "gpu": dict(
        title="RestoreLCC on a GPU",
        runtime="**Runtime:** *Runtime → Change runtime type → GPU*. jax needs its CUDA wheels "
        '(`pip install -e ".[cuda]"` in a checkout; the install cell below adds them). One GPU is enough for '
        "SmolLM2; with several, `MESH = \"fsdp=-1\"` splits the model and the batches across all of them.",
        colab={"accelerator": "GPU", "colab": {"gpuType": "T4", "provenance": []}},
        devices='''import jax

import lcc_jax

print(jax.devices())  # CudaDevice(id=0), ...; only CpuDevice means the CUDA wheels are missing
if jax.default_backend() != "gpu":
    print(f"no GPU in this runtime ({jax.default_backend()}): the same code runs on {jax.device_count()} device(s)")
mesh = lcc_jax.make_mesh(MESH) if MESH else None  # "fsdp=-1": all GPUs on the fsdp axis; None: one device
print("mesh:", dict(mesh.shape) if mesh else "one device")
''' + CHOOSE_PRESET,
        devices_md="## 3. Devices, mesh and preset\n\n`jax.devices()` should list the GPUs. lcc_jax places the model on "
        "a `(data, fsdp, tensor)` mesh; `MESH = \"fsdp=-1\"` shards weights and batches over every GPU "
        "(one GPU gives a mesh of one), `MESH = None` keeps everything on the first device. " + PRESET_MD,
    ),
}

INTRO = """# {title} with lcc_jax

Pruning (Wanda, SparseGPT, structured) makes a language model cheaper but loses accuracy. **RestoreLCC**
(Lost Component Compensation, NeurIPS 2025, [arXiv 2510.21834](https://arxiv.org/abs/2510.21834)) finds the
attention heads whose information the pruning lost (contrastive probes on head outputs), extracts the lost
directions from dense-minus-pruned head outputs (SVD), and trains tiny per-head vectors on those heads that
fold into the `o_proj` bias: sparsity and inference cost stay the same.

This notebook runs the whole job with lcc_jax (JAX, Flax NNX):
install → load → prune → restore → evaluate → plot → export to a Hugging Face folder.

{runtime} The notebook finds out which runtime it got (TPU, GPU or CPU) and sets up for it: the jax extra to
install, and on a CPU the `quick` preset, a small run of the whole job that finishes in minutes."""

INSTALL_MD = """## 1. Install

lcc_jax installs from its own source, found without editing anything:

* **in a checkout** (Jupyter started in a clone of the repository, this notebook in its `colab/` folder): that
  checkout, editable;
* **on Colab**: a clone or an archive of the repository next to the notebook (`/content`, or
  `MyDrive` when Drive is mounted), e.g. made with `git archive -o lcc_jax.zip HEAD` and dragged into the Files
  pane; with none there, the cell asks you to upload that archive (or a wheel);
* or whatever `SOURCE` names (a form field on Colab): a folder, a `.zip`, a wheel, or `git+https://...`.

It adds the jax extra of the runtime it detects (`tpu`, `cuda`, none on a CPU) and does nothing when lcc_jax is
already importable. If pip upgraded jax, restart the session once (*Runtime → Restart session*) and continue
from the next cell."""

INSTALL = '''import glob
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

SOURCE = "auto"  # @param {type:"string"}


def runtime() -> str:
    """tpu | gpu | cpu, before jax is installed."""
    if os.environ.get("COLAB_TPU_ADDR") or os.environ.get("TPU_ACCELERATOR_TYPE") or glob.glob("/dev/accel*"):
        return "tpu"
    if shutil.which("nvidia-smi") and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0:
        return "gpu"
    return "cpu"


def is_checkout(folder: Path) -> bool:
    project = folder / "pyproject.toml"
    return project.is_file() and 'name = "lcc-jax"' in project.read_text()


def lcc_jax_source(source: str = SOURCE) -> tuple[str, bool]:
    """(what pip installs, editable?): SOURCE, else a checkout around the working folder, else a clone or an
    archive of lcc_jax next to the notebook, else (Colab) one you upload."""
    if source != "auto":
        return source, Path(source).is_dir()
    here = Path.cwd()
    for folder in (here, *here.parents):  # Jupyter started in a clone: the notebook sits in its colab/
        if is_checkout(folder):
            return str(folder), True
    for root in dict.fromkeys((here, Path("/content"), Path("/content/drive/MyDrive"))):
        for path in sorted(root.glob("lcc[-_]jax*")):
            if (path.is_dir() and is_checkout(path)) or path.name.endswith((".zip", ".tar.gz", ".whl")):
                return str(path), path.is_dir()
    if "google.colab" in sys.modules:
        from google.colab import files

        print("lcc_jax is not installed and no copy of it is here: upload the repository as a .zip "
              "(`git archive -o lcc_jax.zip HEAD` in a clone) or a wheel")
        return str(Path(next(iter(files.upload()))).resolve()), False
    raise RuntimeError("lcc_jax not found: start Jupyter inside a clone of the repository, put a clone or an "
                       "archive of it next to this notebook, or set SOURCE")


RUNTIME = runtime()
if importlib.util.find_spec("lcc_jax") is not None:
    print(f"lcc_jax is installed ({Path(importlib.util.find_spec('lcc_jax').origin).parent}); runtime: {RUNTIME}")
else:
    source, editable = lcc_jax_source()
    extras = ",".join(e for e in ({"tpu": "tpu", "gpu": "cuda"}.get(RUNTIME), "hub") if e)
    local = Path(source).exists()
    target = f"lcc-jax[{extras}] @ {Path(source).resolve().as_uri()}" if local else f"lcc-jax[{extras}] @ {source}"
    command = [sys.executable, "-m", "pip", "install", "-q", *(["-e", f"{source}[{extras}]"] if editable else [target])]
    print(f"installing lcc_jax from {source} for a {RUNTIME} runtime:", " ".join(command[3:]))
    subprocess.check_call(command)'''

PARAMETERS_MD = """## 2. Parameters

On a GPU or TPU the defaults are the paper's general-recovery setting on SmolLM2-135M-Instruct (`PRESET =
"paper"`): Wanda 50 % unstructured, 128 × 2,048 calibration tokens, 2,000 Alpaca samples for training (the first
1,000 for probing), the top 25 % of heads, AdamW lr 1e-3 for 3 epochs at batch 8 (see `RestoreConfig` for every
knob). On a CPU `PRESET = "auto"` picks `quick` instead (section 3). This cell is tagged `parameters`: CI runs
the notebook on a CPU with a tiny random model by adding a cell after it (papermill-style)."""

PARAMETERS = '''MODEL = "smollm2-135m"  # built-in SmolLM2-135M-Instruct (from PyPI, cached); or a HF folder, .gguf, hub id
OUT = "out/restore_{variant}"  # every stage is saved here and skipped when rerun (on Colab: a Google Drive folder)
DATA_DIR = None  # a folder laid out like the project's shared/data; None: $LCC_DATA_DIR, else the hub
MESH = "fsdp=-1"  # all devices on the fsdp axis
DTYPE = "fp32"  # weights: fp32 | bf16 (training computes in RestoreConfig.compute_dtype, bf16 by default)
PRUNE = dict(method="wanda", sparsity="0.5")  # or sparsegpt + "2:4"; or method="flap", sparsity=None, structured=0.2
PRESET = "auto"  # auto: quick on a CPU runtime, paper on a GPU or TPU; or paper | recipe | quick
CALIBRATION = dict()  # CalibrationConfig overrides; empty: the preset's (paper: 128 x 2,048 tokens)
RESTORE = dict()  # RestoreConfig overrides; empty: the preset's (paper: the defaults)
ZEROSHOT_TASKS = "boolq,rte,arc_easy"  # "" skips zero-shot; "suite": the papers' 7 tasks
ZEROSHOT_LIMIT = "auto"  # documents per task: auto (quick: 50, else 200), a number, or None: all of them
COMPARE_MASKED_LORA = True  # also train masked LoRA on the same pruned model and budget (section 6), for comparison
EXPORT_DIR = "out/restore_{variant}_hf"
CHECK_IN_TRANSFORMERS = True  # reload the export with transformers (PyTorch) and compare logits'''

HUB_MD = """### Any Hugging Face model

Any Llama-family checkpoint (Llama 1/2/3, Mistral, Qwen2, Qwen3, SmolLM2) works by hub id or local folder.
Hub ids need `huggingface_hub` (installed above with the `hub` extra) and, for gated models, `huggingface-cli login`.
Uncomment one line, or set your own; larger models need `DTYPE = "bf16"` and an accelerator with room."""

HUB = '''# MODEL = "HuggingFaceTB/SmolLM2-360M-Instruct"
# MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
# MODEL = "meta-llama/Llama-3.2-1B"'''

DATA_MD = """### Data

Training and probing use Alpaca instructions, calibration uses Alpaca text, evaluation WikiText-2. A local folder
laid out like the project's `shared/data` (`alpaca_2000/`, `wikitext-2-raw/`, `eval/`) is used first; without one
(a fresh Colab), Alpaca and WikiText-2 come from the hub and the zero-shot tasks too."""

DATA = '''import os

from lcc_jax.data.text import data_dir

if DATA_DIR:
    os.environ["LCC_DATA_DIR"] = str(DATA_DIR)
local = data_dir()
if local is not None and (local / "alpaca_2000" / "train.jsonl").is_file():
    print(f"local data: {local}")
else:
    RESTORE = {"train_data": "hf:tatsu-lab/alpaca", "valid_data": "none", **RESTORE}
    CALIBRATION = {"calibration": "wikitext2", **CALIBRATION}
    print("no local data folder: training on hub Alpaca (tatsu-lab/alpaca), calibrating on WikiText-2 train")'''

LOAD_MD = """## 4. Load the model

`lcc_jax.load` reads a Hugging Face folder, a GGUF file, an Orbax folder, a hub id or a built-in name straight
into its sharding on the mesh, one tensor at a time. Head *(l, h)* is the same head as in PyTorch."""

LOAD = '''import jax.numpy as jnp
import numpy as np
from flax import nnx

dtype = jnp.bfloat16 if DTYPE == "bf16" else jnp.float32
model, tokenizer, config = lcc_jax.load(MODEL, dtype=dtype, mesh=mesh)
params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
print(f"{config.model_type}: {params / 1e6:.1f} M parameters, {config.num_layers} layers × {config.num_heads} heads "
      f"= {config.num_layers * config.num_heads} attention heads of dimension {config.head_dim}")
del model  # the job below loads it again and prunes it in place: dense and pruned weights never share the device'''

RESTORE_MD = """## 5. Prune and restore

One call runs every stage into `OUT`: dense evaluation, probing pairs (a positive and a negative response per
prompt), dense head outputs, pruning, pruned head outputs, lost components (SVD of dense − pruned, per head),
contrastive probes on all heads at once, training β and b on the top heads, folding them into the `o_proj` bias,
and the restored evaluation. Each stage is saved when it finishes, so rerunning the cell after a disconnect
resumes where it stopped; a changed configuration against the same `OUT` is refused. Before it starts, the log
shows the job's estimated time per stage on this runtime; each stage's line and progress bar then show the
time left for the whole job."""

RESTORE = '''from pathlib import Path

from lcc_jax import estimate
from lcc_jax.data.calibration import CalibrationConfig
from lcc_jax.progress import setup_logging
from lcc_jax.pruning.api import PruneConfig
from lcc_jax.restore.config import RestoreConfig
from lcc_jax.restore.pipeline import Job, run

setup_logging()
job = Job(model=MODEL, out=Path(OUT), restore=RestoreConfig(**RESTORE), prune=PruneConfig(**PRUNE),
          calibration=CalibrationConfig(**CALIBRATION), dtype=DTYPE, mesh=mesh)
plan = estimate.follow_restore_job(job, plots=False)  # logs the estimate; the bars show the job's time left
summary = run(job)
estimate.report(plan, OUT)  # estimated against measured seconds, also in OUT/eta.json'''

EVAL_MD = """## 6. Evaluate

WikiText-2 perplexity (the pruning papers' protocol) of the dense, pruned and restored models, then zero-shot
accuracy with lm-evaluation-harness prompts on the first `ZEROSHOT_LIMIT` documents of each task."""

EVAL_PPL = '''from IPython.display import Markdown, display

gap = summary["ppl_pruned"] - summary["ppl_dense"]
closed = f"{100 * (summary['ppl_pruned'] - summary['ppl_restored']) / gap:.0f} % of the gap" if gap > 0 else "–"
display(Markdown(
    "| model | WikiText-2 ppl |\\n|---|---|\\n"
    f"| dense | {summary['ppl_dense']:.2f} |\\n"
    f"| pruned ({summary['pruning']}) | {summary['ppl_pruned']:.2f} |\\n"
    f"| RestoreLCC ({summary['heads']} heads, {summary['trainable_params']:,} parameters) | "
    f"**{summary['ppl_restored']:.2f}** ({closed} recovered) |"
))'''

EVAL_ZS = '''import json

from lcc_jax.checkpoint import load_pruned
from lcc_jax.eval import zeroshot

loaders = {  # one model on the device at a time
    "dense": lambda: lcc_jax.load(MODEL, dtype=dtype, mesh=mesh, tokenizer=False)[0],
    "pruned": lambda: load_pruned(Path(OUT) / "pruned", dtype=dtype, mesh=mesh).model,
    "RestoreLCC": lambda: lcc_jax.load(Path(OUT) / "restored", dtype=dtype, mesh=mesh, tokenizer=False)[0],
}
zs = {}
if ZEROSHOT_TASKS:
    for name, load_model in loaders.items():
        model = load_model()
        zs[name] = zeroshot(model, tokenizer, ZEROSHOT_TASKS, limit=ZEROSHOT_LIMIT, mesh=mesh)
        del model
        display(Markdown(f"**{name}**\\n\\n" + zs[name].to_markdown()))
    (Path(OUT) / "zeroshot.json").write_text(json.dumps({k: v.to_dict() for k, v in zs.items()}, indent=2))'''

MASKED_MD = """### Against the strongest recovery that keeps the sparsity

In every run of this project's recovery benchmark (README, Results), masked LoRA recovered more perplexity than
RestoreLCC: LoRA on every projection, its merged update masked by the pruning mask, so every pruned weight stays
zero and the sparsity and inference cost are the pruned model's. It changes the kept weights (about 2.4 M
parameters on SmolLM2) where RestoreLCC adds an `o_proj` bias. With `COMPARE_MASKED_LORA`, this cell trains it
with `lcc_jax.recover_lora` on the same pruned checkpoint, samples and budget, and puts its perplexity and sparsity
audit beside RestoreLCC's."""

MASKED = '''from lcc_jax.eval.perplexity import perplexity

if COMPARE_MASKED_LORA:
    checkpoint = load_pruned(Path(OUT) / "pruned", dtype=dtype, mesh=mesh)
    recovery = lcc_jax.recover_lora(checkpoint, tokenizer, job.restore, mesh=mesh)
    r = job.restore
    lora_ppl = perplexity(recovery.model, tokenizer, "wikitext2", seqlen=r.eval_seqlen,
                          limit_chunks=r.eval_limit_chunks, mesh=mesh).ppl
    audit = recovery.sparsity
    display(Markdown(
        "| recovery | WikiText-2 ppl | trainable parameters | pruned weights revived |\\n|---|---|---|---|\\n"
        f"| RestoreLCC | {summary['ppl_restored']:.2f} | {summary['trainable_params']:,} | 0 |\\n"
        f"| masked LoRA | {lora_ppl:.2f} | {recovery.trainable_params:,} | {audit.revived:,} "
        f"({100 * audit.surviving:.1f} % of {100 * audit.target:.1f} % sparsity kept) |"
    ))
    del checkpoint, recovery'''

PLOTS_MD = """## 7. Pictures

* **Head probe scores**: validation accuracy of each head's contrastive probe (layers × heads); the heads that
  got compensation are boxed.
* **Lost-component energy per layer**: Σ over the layer's heads of ‖Z_dense − Z_pruned‖² (the sum of squared
  singular values), i.e. where pruning changed the head outputs most.
* **Training loss** of β and b, and **perplexity** (and mean zero-shot accuracy) of dense, pruned and restored.

`scripts/restore.py` writes the same files into `OUT/plots/`."""

PLOTS = '''from IPython.display import Image

from lcc_jax.benchmark.plots import plot_recovery, plot_restore_run

paths = plot_restore_run(OUT)
if zs:
    rows = [{"setting": summary["pruning"], "method": name, "mean_acc": 100 * r.mean} for name, r in zs.items()]
    paths.append(plot_recovery(rows, Path(OUT) / "plots" / "zeroshot.png", metric="mean_acc"))
for path in paths:
    display(Image(filename=str(path)))'''

EXPORT_MD = """## 8. Export to a Hugging Face folder

The restored model is the pruned model plus an `o_proj` bias, so it exports as an ordinary Hugging Face
checkpoint (safetensors, config, tokenizer) that `transformers` loads directly. The job already wrote one into
`OUT/restored_hf`; this cell writes it where you choose (`dtype=jnp.bfloat16` halves its size) and checks it
against the JAX model in PyTorch."""

EXPORT = '''restored, tokenizer, _ = lcc_jax.load(Path(OUT) / "restored", dtype=dtype, mesh=mesh)
lcc_jax.save_hf(restored, tokenizer, EXPORT_DIR, overwrite=True)
print(sorted(p.name for p in Path(EXPORT_DIR).iterdir()))

if CHECK_IN_TRANSFORMERS:
    import torch
    import transformers

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(EXPORT_DIR).float().eval()
    ids = np.asarray([tokenizer("Pruning removes weights; restoration brings back")["input_ids"]])
    with torch.no_grad():
        theirs = hf_model(torch.as_tensor(ids)).logits.numpy()
    ours = np.asarray(restored(jnp.asarray(ids)).logits, np.float32)
    print(f"largest |logit difference|, transformers vs lcc_jax: {np.abs(theirs - ours).max():.2e}")'''

PUSH = '''# Share it on the hub (needs `huggingface-cli login`):
# from huggingface_hub import HfApi
# HfApi().upload_folder(folder_path=EXPORT_DIR, repo_id="<you>/smollm2-135m-wanda50-restorelcc", repo_type="model")'''


def build(variant: str) -> nbformat.NotebookNode:
    """The notebook of one variant ("tpu" or "gpu")."""
    v = VARIANTS[variant]
    fill = dict(variant=variant, title=v["title"], runtime=v["runtime"])
    cells = [
        new_markdown_cell(INTRO.format(**fill)),
        new_markdown_cell(INSTALL_MD),
        new_code_cell(INSTALL),
        new_markdown_cell(PARAMETERS_MD),
        new_code_cell(PARAMETERS.format(**fill), metadata={"tags": ["parameters"]}),
        new_markdown_cell(HUB_MD),
        new_code_cell(HUB),
        new_markdown_cell(DATA_MD),
        new_code_cell(DATA),
        new_markdown_cell(v["devices_md"]),
        new_code_cell(v["devices"]),
        new_markdown_cell(LOAD_MD),
        new_code_cell(LOAD),
        new_markdown_cell(RESTORE_MD),
        new_code_cell(RESTORE),
        new_markdown_cell(EVAL_MD),
        new_code_cell(EVAL_PPL),
        new_code_cell(EVAL_ZS),
        new_markdown_cell(MASKED_MD),
        new_code_cell(MASKED),
        new_markdown_cell(PLOTS_MD),
        new_code_cell(PLOTS),
        new_markdown_cell(EXPORT_MD),
        new_code_cell(EXPORT),
        new_code_cell(PUSH),
    ]
    for i, cell in enumerate(cells):
        cell.id = f"{variant}-{i:02d}"  # stable ids: rebuilding gives the same file
    metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
        **v["colab"],
    }
    return new_notebook(cells=cells, metadata=metadata)


def path(variant: str) -> Path:
    return HERE / f"restore_{variant}.ipynb"


def render(variant: str) -> str:
    """The file text of one notebook, exactly as written to disk."""
    return nbformat.writes(build(variant)) + "\n"


def main() -> int:
    for variant in VARIANTS:
        path(variant).write_text(render(variant))
        print(f"wrote {path(variant)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
