"""Evaluation text for perplexity: local files first, `datasets` only when a user names a hub set.

A source is one of
  * a path to a file: raw text (`.raw`, `.txt`, anything else) or JSON lines with a "text" field
    (`.jsonl`, `.jsonl.gz`, `.json.gz`);
  * a name from `SOURCES` ("wikitext2", "c4"), looked up under the data folder (laid out like the
    project's `shared/data`, see `data_dir`) and, when no local copy exists, on the hub;
  * "hf:<dataset>[:<config>]", any hub data set with a "text" column.

Every source is a list of rows, joined into one string by the pruning papers' protocol
(Wanda / SparseGPT `get_loaders`):
  * WikiText-2 test: `"\\n\\n".join(rows)`. The hub rows are the lines of the release file, each with
    its trailing newline, plus an empty row for each blank line. The shared local copy
    (`wikitext-2-raw/wiki.test.raw`) holds only the 2,891 non-empty rows, so joining its lines with
    "\\n\\n" gives text that is close to, not byte-identical with, the papers' text (the 1,467 empty
    rows, each of which would add another "\\n\\n", are missing). A JSON-lines export of the hub rows,
    passed as a file, reproduces it exactly.
  * C4 validation: `" ".join` of the first 1,100 documents of shard 00000-of-00008; the papers then
    keep the first 256·seqlen tokens, which is `perplexity(..., limit_chunks=256)`.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import os
from pathlib import Path

from lcc_jax.data.hub import load_hub_split
from lcc_jax.errors import UserError

log = logging.getLogger(__name__)

DATA_DIR_ENV = "LCC_DATA_DIR"
SPLITS = ("train", "validation", "test")


class TextSourceError(UserError):
    """A text source that cannot be read: unknown name, missing or empty file, hub unreachable."""


@dataclasses.dataclass(frozen=True)
class NamedSource:
    """A known evaluation text: where it lives locally and on the hub, and how its rows are joined."""

    local: dict[str, tuple[str, ...]]  # split -> candidate paths under the data folder
    hub: tuple[str, str | None]  # (dataset, config) for datasets.load_dataset
    hub_files: dict[str, str] | None = None  # split -> data_files entry, where the papers pin a shard
    join: dict[str, str] = dataclasses.field(default_factory=dict)  # split -> separator (default "\n\n")
    max_rows: int | None = None  # the papers use only the first rows (C4: 1,100)
    test_split: str = "test"  # the split the papers evaluate on when asked for "test"

    def separator(self, split: str) -> str:
        return self.join.get(split, "\n\n")


SOURCES: dict[str, NamedSource] = {
    "wikitext2": NamedSource(
        local={s: (f"wikitext-2-raw/wiki.{f}.raw",) for s, f in zip(SPLITS, ("train", "valid", "test"))},
        hub=("wikitext", "wikitext-2-raw-v1"),
        join={"train": " "},  # Wanda joins the training rows with a space (calibration only)
    ),
    "c4": NamedSource(
        local={
            "validation": ("c4/validation.jsonl", "c4/c4-validation.00000-of-00008.json.gz"),
            "train": ("c4/train.jsonl", "c4/c4-train.00000-of-01024.json.gz"),
        },
        hub=("allenai/c4", None),
        hub_files={
            "validation": "en/c4-validation.00000-of-00008.json.gz",
            "train": "en/c4-train.00000-of-01024.json.gz",
        },
        join={"validation": " ", "train": " "},
        max_rows=1100,
        test_split="validation",  # C4 has no public test split; the papers evaluate on validation
    ),
}
ALIASES = {"wikitext": "wikitext2", "wikitext-2": "wikitext2", "wiki": "wikitext2", "c4-en": "c4"}


def data_dir() -> Path | None:
    """The local data folder: $LCC_DATA_DIR, else `../shared/data` beside a source checkout, else None."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    beside_checkout = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    return beside_checkout if beside_checkout.is_dir() else None


def data_dir_hint(expected: str) -> str:
    """For an error about a missing data file: what the data folder is now, and how to point it at `expected`
    (a path relative to the folder, e.g. 'wikitext-2-raw/wiki.test.raw')."""
    env = os.environ.get(DATA_DIR_ENV)
    root = data_dir()
    if env:
        now = (f"${DATA_DIR_ENV}={env} does not exist" if not root.exists() else
               f"${DATA_DIR_ENV}={env} is not a folder" if not root.is_dir() else
               f"${DATA_DIR_ENV}={env} is an empty folder" if not any(root.iterdir()) else
               f"${DATA_DIR_ENV}={env} has no {expected}")
    elif root is not None:
        now = f"${DATA_DIR_ENV} is not set and {root} (beside the source checkout) has no {expected}"
    else:
        now = f"${DATA_DIR_ENV} is not set"
    return (f"{now}; point ${DATA_DIR_ENV} at a folder laid out like the project's shared/data, holding {expected} "
            "(the layout: README 'Offline use' and shared/data/README.md)")


def load_text(source: str | os.PathLike, split: str = "test", *, join: str | None = None) -> str:
    """The evaluation text of `source` as one string, joined by the papers' protocol (module docstring).

    `split` picks the split of a named or hub source ("train", "validation", "test"; ignored for a
    file); "test" means the split the papers evaluate on (C4: validation). `join` overrides the row
    separator ("\\n\\n" for WikiText-2 and files, " " for C4); `join=""` concatenates the rows (a raw
    file then reads back without its blank lines).
    """
    rows, default_join = load_rows(source, split)
    return (default_join if join is None else join).join(rows)


def load_rows(source: str | os.PathLike, split: str = "test") -> tuple[list[str], str]:
    """(rows, the protocol's separator) for `source`; see `load_text`."""
    if split not in SPLITS:
        raise TextSourceError(f"split must be one of {SPLITS}, not {split!r}.")
    text = str(source)
    if text.startswith("hf:"):
        dataset, _, config = text[3:].partition(":")
        return _hub_rows(dataset, config or None, split, None, None), "\n\n"
    name = ALIASES.get(text.lower(), text.lower())
    if name in SOURCES:
        return _named_rows(name, SOURCES[name], split)
    path = Path(text).expanduser()
    if path.is_file():
        return read_rows(path), "\n\n"
    if path.exists():
        raise TextSourceError(f"{path} is not a file.")
    if os.sep in text or path.suffix:
        raise TextSourceError(f"text file {path} does not exist.")
    raise TextSourceError(
        f"unknown text source {text!r}: give a file path (raw text or .jsonl with a 'text' field), "
        f"one of {sorted(SOURCES)}, or 'hf:<dataset>[:<config>]'."
    )


def read_rows(path: Path, max_rows: int | None = None) -> list[str]:
    """Rows of a local file: JSON lines give their "text" fields; raw text gives its lines.

    Raw lines keep their newline (CRLF read as LF) and a blank line becomes an empty row, like the
    hub's WikiText rows.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    is_jsonl = path.name.removesuffix(".gz").endswith((".jsonl", ".json"))
    rows: list[str] = []
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if max_rows is not None and len(rows) >= max_rows:
                break
            if is_jsonl:
                if not line.strip():
                    continue
                rows.append(_json_text(line, path, number))
            else:
                rows.append(line if line.strip() else "")
    if not any(row.strip() for row in rows):
        raise TextSourceError(f"{path} holds no text.")
    return rows


def _json_text(line: str, path: Path, number: int) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise TextSourceError(f"{path}:{number} is not valid JSON ({e}).") from e
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise TextSourceError(f"{path}:{number} has no string 'text' field.")
    return record["text"]


def _named_rows(name: str, spec: NamedSource, split: str) -> tuple[list[str], str]:
    split = spec.test_split if split == "test" else split
    if split not in spec.local and split not in (spec.hub_files or {}):
        raise TextSourceError(f"{name} has no {split!r} split here; choose from {sorted(spec.local)}.")
    root = data_dir()
    candidates = [root / p for p in spec.local.get(split, ())] if root else []
    for path in candidates:
        if path.is_file():
            log.info("reading %s %s from %s", name, split, path)
            return read_rows(path, spec.max_rows), spec.separator(split)
    where = ", ".join(str(p) for p in candidates) or f"nowhere (${DATA_DIR_ENV} is not set)"
    log.info("%s %s not found locally (looked at %s); trying the hub", name, split, where)
    data_files = {split: spec.hub_files[split]} if spec.hub_files and split in spec.hub_files else None
    rows = _hub_rows(*spec.hub, split, data_files, where, spec.local.get(split, ("",))[0])
    return rows[: spec.max_rows] if spec.max_rows else rows, spec.separator(split)


def _hub_rows(dataset: str, config: str | None, split: str, data_files, looked_at: str | None,
              expected: str = "") -> list[str]:
    hint = (
        f"Set ${DATA_DIR_ENV} to a folder laid out like shared/data (e.g. wikitext-2-raw/wiki.test.raw), "
        "or pass the path of a text file."
    )
    if looked_at:
        hint = f"No local copy (looked at {looked_at}): {data_dir_hint(expected)}; or pass the path of a text file."

    ds = load_hub_split(dataset, config, split, data_files=data_files, hint=hint, error=TextSourceError)
    if "text" not in ds.column_names:
        raise TextSourceError(f"hub set {dataset!r} has no 'text' column (columns: {ds.column_names}).")
    return list(ds["text"])
