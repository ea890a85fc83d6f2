"""The package's import graph: every import points down the layer order below, nothing imports a sibling room of
its own layer, there is no cycle, and every module imports on its own.

A room is a subpackage (`lcc_jax/restore/`) or a top-level module (`lcc_jax/sharding.py`); modules of one room may
import each other (without cycles). Imports are read from the source with `ast`, wherever they stand: at module
level, inside functions, under `if TYPE_CHECKING`. README's "Layout" section shows the same order.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lcc_jax"

# Lowest first. A room may import rooms of lower layers only; rooms of one layer do not import each other.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "fields", "signals", "progress", "tokenizer"),  # no lcc_jax imports
    ("config", "distributed"),  # ModelConfig; processes, barriers, host <-> global arrays
    ("sharding",),  # mesh, logical axes, shard_like
    ("models",),  # the NNX decoder with its capture and compensation doors
    ("convert", "data"),  # checkpoints in and out; text, instructions, negatives, batching
    ("compile_cache",),  # JAX's persistent cache, its counts and the notes of what it holds
    ("eval", "pruning", "train"),  # metrics; pruning methods; the shared optax trainer
    ("checkpoint",),  # pruned model + masks + metadata
    ("restore",),  # RestoreLCC: capture, components, probes, compensation, fold, steps, the job folder
    ("api", "baselines", "estimate"),  # the five verbs; LoRA, DoRA, LoFiT, bias-only; a job's cost up front
    ("benchmark",),  # the recovery benchmark (every method on the same pruned models), its table, plots
    ("study",),  # the ablation over RestoreLCC's choices
    ("cli",),  # flags and error reporting of scripts/: nothing in the package imports it
    ("lcc_jax",),  # the package itself: `import lcc_jax` re-exports the verbs
)
LAYER_OF = {room: depth for depth, rooms in enumerate(LAYERS) for room in rooms}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _resolve(name: str) -> str:
    """The module a dotted import name lands in (`lcc_jax.restore.steps.restore` -> `lcc_jax.restore.steps`)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _imports(module: str) -> dict[str, int]:
    """{imported lcc_jax module: line} of every import statement in `module`'s source."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names = [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            if name == "lcc_jax" or name.startswith("lcc_jax."):
                target = _resolve(name)
                if target and target != module:
                    found.setdefault(target, node.lineno)
    return found


GRAPH = {module: _imports(module) for module in MODULES}


def test_every_room_has_a_layer():
    rooms = {_room(m) for m in MODULES}
    assert sorted(rooms - LAYER_OF.keys()) == [], "place the new room in LAYERS (and README's layout)"


def test_every_import_points_down_the_layers():
    wrong = []
    for module, targets in GRAPH.items():
        here = _room(module)
        for target, line in targets.items():
            there = _room(target)
            if here not in LAYER_OF or there not in LAYER_OF:
                continue  # test_every_room_has_a_layer names it
            if there != here and LAYER_OF[there] >= LAYER_OF[here]:
                how = "up" if LAYER_OF[there] > LAYER_OF[here] else "sideways, within its layer"
                wrong.append(f"{MODULES[module].relative_to(ROOT)}:{line} imports {target} ({how}: {here} -> {there})")
    assert wrong == [], "\n".join(wrong)


def test_no_module_imports_itself_back_through_others():
    cycles = []
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in GRAPH[module]:
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in MODULES:
        if module not in state:
            visit(module)
    assert cycles == [], "\n".join(cycles)


_IMPORT_ALONE = """
import importlib, sys, traceback
import jax, flax.nnx, numpy, optax  # third-party packages stay loaded; lcc_jax is imported afresh each time
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "lcc_jax" or m.startswith("lcc_jax.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except BaseException:
        failed.append(name + ":\\n" + traceback.format_exc(limit=4))
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


@pytest.mark.slow
def test_every_module_imports_on_its_own():
    """What `python -c "import lcc_jax.<module>"` does, for every module, without 90 interpreter start-ups."""
    done = subprocess.run([sys.executable, "-c", _IMPORT_ALONE, *MODULES], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("old", ["lcc_jax.restore.train", "lcc_jax.restore.train_data", "lcc_jax.restore.losses",
                                 "lcc_jax.eval.recovery", "lcc_jax.eval.plots", "lcc_jax.prune.api"])
def test_a_moved_module_fails_naming_its_new_place(old):
    import importlib

    import lcc_jax

    with pytest.raises(ModuleNotFoundError, match=r"is now (the verb )?lcc_jax\.(train|benchmark|prune)"):
        importlib.import_module(old)
    assert callable(lcc_jax.prune) and callable(lcc_jax.restore)  # the failed imports shadowed nothing
