"""The Colab notebooks: well formed, built from colab/build_notebooks.py, and executed end to end on a CPU.

Execution replaces nothing in the notebook's own cells: a cell with a tiny configuration (the session's tiny
random model, local data, a few samples, two CPU devices) is inserted after the `parameters` cell, as papermill
would, and every cell runs in a fresh kernel of this very Python (a private kernel spec: no global install).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

COLAB = Path(__file__).resolve().parents[1] / "colab"
VARIANTS = ("tpu", "gpu")

TINY_RESTORE = dict(num_train=16, num_probe=12, valid_data="none", max_length=64, capture_length=64, epochs=1,
                    batch_size=4, capture_batch_size=8, eval_seqlen=64, eval_limit_chunks=1, top_k=0.25)
KERNEL_ENV = {
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": "--xla_force_host_platform_device_count=2",  # a real 2-device fsdp mesh; batches of 4 divide it
    "LCC_PROGRESS": "0",
    "MPLBACKEND": "Agg",
}


def _read(variant: str):
    import nbformat

    return nbformat.read(COLAB / f"restore_{variant}.ipynb", as_version=4)


def _parameters_index(nb) -> int:
    tagged = [i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"expected one cell tagged 'parameters', found {len(tagged)}"
    return tagged[0]


@pytest.mark.parametrize("variant", VARIANTS)
def test_notebook_is_valid_clean_and_built_from_its_source(variant):
    import nbformat

    sys.path.insert(0, str(COLAB))
    try:
        import build_notebooks
    finally:
        sys.path.remove(str(COLAB))
    nb = _read(variant)
    nbformat.validate(nb)
    assert (COLAB / f"restore_{variant}.ipynb").read_text() == build_notebooks.render(variant), (
        "the notebook differs from colab/build_notebooks.py: edit the source there and run it"
    )
    assert all(not cell.get("outputs") and cell.get("execution_count") is None
               for cell in nb.cells if cell.cell_type == "code"), "notebooks are committed without outputs"
    source = "\n".join(cell.source for cell in nb.cells)
    params = nb.cells[_parameters_index(nb)].source
    assert 'MODEL = "smollm2-135m"' in params and 'sparsity="0.5"' in params and "RESTORE = dict()" in params
    for step in ("lcc_jax.load(", "Job(", "run(job)", "zeroshot(", "plot_restore_run(", "save_hf("):
        assert step in source, step
    assert "jax.devices()" in source
    assert ("TPU" in source) if variant == "tpu" else ('".[cuda]"' in source and "GPU" in source)
    assert "OWNER" not in source and 'SOURCE = "auto"  # @param' in source  # nothing for a user to edit
    assert 'PRESET = "auto"' in params and 'PRESET = "quick" if jax.default_backend() == "cpu"' in source


def _install_cell(variant: str = "gpu") -> str:
    (cell,) = [c.source for c in _read(variant).cells if c.cell_type == "code" and 'SOURCE = "auto"' in c.source]
    return cell


def _run_install_cell(monkeypatch, source: str = "auto", gpu: bool = False) -> tuple[list[list[str]], str]:
    """Execute the install cell as if lcc_jax were missing; returns the pip commands it ran and what it printed."""
    import contextlib
    import glob
    import importlib.util
    import io
    import shutil
    import subprocess

    calls: list[list[str]] = []
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lcc_jax" else real_find_spec(name, *a))
    monkeypatch.setattr(subprocess, "check_call", lambda command: calls.append(command))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0 if gpu else 1))
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/nvidia-smi" if gpu else None)
    monkeypatch.setattr(glob, "glob", lambda pattern: [])
    for name in ("COLAB_TPU_ADDR", "TPU_ACCELERATOR_TYPE"):
        monkeypatch.delenv(name, raising=False)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(_install_cell().replace('SOURCE = "auto"', f"SOURCE = {source!r}"), {})
    return calls, printed.getvalue()


def test_install_cell_installs_the_checkout_it_runs_in_with_the_runtimes_extra(monkeypatch):
    monkeypatch.chdir(COLAB)  # Jupyter started in the checkout: the notebook's folder is colab/
    calls, printed = _run_install_cell(monkeypatch)
    root = str(COLAB.parent)
    assert calls == [[sys.executable, "-m", "pip", "install", "-q", "-e", f"{root}[hub]"]]
    assert f"installing lcc_jax from {root} for a cpu runtime" in printed
    calls, _ = _run_install_cell(monkeypatch, gpu=True)
    assert calls[0][-1] == f"{root}[cuda,hub]"


def test_install_cell_takes_an_uploaded_archive_or_the_source_given(monkeypatch, tmp_path):
    archive = tmp_path / "lcc_jax.zip"  # e.g. `git archive -o lcc_jax.zip HEAD`, dragged next to the notebook
    archive.write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    calls, _ = _run_install_cell(monkeypatch)
    assert calls == [[sys.executable, "-m", "pip", "install", "-q", f"lcc-jax[hub] @ {archive.as_uri()}"]]
    calls, _ = _run_install_cell(monkeypatch, source="git+https://example.org/lcc_jax.git", gpu=True)
    assert calls[0][-1] == "lcc-jax[cuda,hub] @ git+https://example.org/lcc_jax.git"


@pytest.fixture(scope="module")
def kernel_spec_dir(tmp_path_factory) -> Path:
    """A kernel spec that starts this interpreter, so the notebook sees exactly this environment."""
    root = tmp_path_factory.mktemp("kernels")
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "lcc_jax test", "language": "python",
            "env": {**KERNEL_ENV, "JAX_COMPILATION_CACHE_DIR": str(root / "jax_cache")}}
    (root / "lcc_jax_test").mkdir()
    (root / "lcc_jax_test" / "kernel.json").write_text(json.dumps(spec))
    return root


def _tiny_parameters(model_dir: Path, out: Path, data: Path) -> str:
    values = dict(MODEL=str(model_dir), OUT=str(out / "run"), DATA_DIR=str(data), MESH="fsdp=-1", DTYPE="fp32",
                  PRUNE=dict(method="wanda", sparsity="0.5", batch_size=4), CALIBRATION=dict(nsamples=4, seqlen=64),
                  RESTORE=TINY_RESTORE, ZEROSHOT_TASKS="arc_easy", ZEROSHOT_LIMIT=4, EXPORT_DIR=str(out / "hf"),
                  CHECK_IN_TRANSFORMERS=True)
    return "# tiny CPU configuration injected by tests/test_notebooks.py\n" + "\n".join(
        f"{name} = {value!r}" for name, value in values.items())


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_notebook_runs_end_to_end_on_a_tiny_model(variant, tiny_model_dir, kernel_spec_dir, tmp_path):
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    from lcc_jax.data.text import data_dir

    nb = _read(variant)
    at = _parameters_index(nb) + 1
    nb.cells.insert(at, nbformat.v4.new_code_cell(_tiny_parameters(tiny_model_dir, tmp_path, data_dir().resolve())))
    km = KernelManager(kernel_name="lcc_jax_test",
                       kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_spec_dir)]))
    NotebookClient(nb, km=km, timeout=300, resources={"metadata": {"path": str(tmp_path)}}).execute()

    out = tmp_path / "run"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["heads"] == 2
    for name in ("head_scores", "component_energy", "perplexity", "zeroshot"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 0, name
    assert set(json.loads((out / "zeroshot.json").read_text())) == {"dense", "pruned", "RestoreLCC"}
    assert "train" in json.loads((out / "eta.json").read_text())["per_stage"]  # estimated, then measured
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "hf" / "model.safetensors").is_file()
    shown = [o for cell in nb.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(shown) >= 4  # the pictures are displayed in the notebook, not only written
    printed = "".join(o.get("text", "") for cell in nb.cells for o in cell.get("outputs", []))
    assert "lcc_jax is installed" in printed and "runtime: cpu" in printed
    assert "preset quick on a CPU runtime" in printed  # the CPU runtime chose the quick preset (the tiny cell wins)
    difference = float(printed.split("transformers vs lcc_jax: ")[1].split()[0])
    assert difference < 1e-3
    tables = "".join(o.get("data", {}).get("text/markdown", "") for cell in nb.cells for o in cell.get("outputs", []))
    masked = [line for line in tables.splitlines() if line.startswith("| masked LoRA |")]
    assert len(masked) == 1 and "| 0 (" in masked[0], tables  # trained beside RestoreLCC; no pruned weight revived
