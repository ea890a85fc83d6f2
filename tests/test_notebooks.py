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
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "hf" / "model.safetensors").is_file()
    shown = [o for cell in nb.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(shown) >= 4  # the pictures are displayed in the notebook, not only written
    printed = "".join(o.get("text", "") for cell in nb.cells for o in cell.get("outputs", []))
    difference = float(printed.split("transformers vs lcc_jax: ")[1].split()[0])
    assert difference < 1e-3
