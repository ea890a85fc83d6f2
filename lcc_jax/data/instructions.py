"""Instruction samples (prompt q, response r) for probing and training: Alpaca and the zero-shot tasks.

A source is one of
  * a path to a JSON-lines file, each line {"prompt", "response"} (the `shared/data/alpaca_2000`
    layout) or {"instruction", "input"?, "output"} (Stanford Alpaca's, formatted like the former);
  * "alpaca": `alpaca_2000/{train,valid}.jsonl` under the data folder ($LCC_DATA_DIR, see `data_dir`);
  * a zero-shot task name (`TASKS`): `eval/<task>/<split>.jsonl` under the data folder, else the hub;
  * "hf:<dataset>[:<config>]": a hub set with prompt/response or instruction/input/output columns.

Task samples carry their candidate answers (`choices`), so negatives can be drawn from the wrong ones.
Their prompts follow the lm-eval prompts the reference evaluates with (Wanda's harness) and end in
"\\nAnswer:", the reference's response template for task-specific data; the answer is the choice
with a leading space (the reference's `' ' + choice.strip()`, `' yes'`, `' True'`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lcc_jax.data.hub import load_hub_split
from lcc_jax.data.text import DATA_DIR_ENV, data_dir, data_dir_hint
from lcc_jax.errors import UserError

log = logging.getLogger(__name__)

ALPACA_FILES = {"train": "alpaca_2000/train.jsonl", "validation": "alpaca_2000/valid.jsonl"}
SPLIT_ALIASES = {"valid": "validation", "val": "validation", "dev": "validation"}


class InstructionError(UserError):
    """Instruction data that cannot be read: unknown source, missing field, empty file, hub unreachable."""


@dataclasses.dataclass(frozen=True)
class InstructionSample:
    """One prompt and its reference response; task samples also list every candidate answer."""

    prompt: str
    response: str
    choices: tuple[str, ...] | None = None  # tasks: all answers, `response` among them

    @property
    def text(self) -> str:
        """prompt + response, as the model reads it."""
        return self.prompt + self.response

    @property
    def answer_index(self) -> int | None:
        return None if self.choices is None else self.choices.index(self.response)


# ---------------------------------------------------------------------------------- loading


def load_instructions(
    source: str | os.PathLike,
    split: str = "train",
    *,
    limit: int | None = None,
    seed: int | None = None,
) -> list[InstructionSample]:
    """Samples of `source` (module docstring). `seed=None` keeps file order (the reference probes on the
    first samples); an int shuffles with `np.random.default_rng(seed)` first. `limit` keeps the first N."""
    split = SPLIT_ALIASES.get(split, split)
    text = str(source)
    if text.startswith("hf:"):
        dataset, _, config = text[3:].partition(":")
        samples = [_free_form(r, f"{dataset}[{i}]") for i, r in enumerate(_hub_records(dataset, config or None, split))]
    elif text.lower() == "alpaca":
        samples = _load_alpaca(split)
    elif _task_name(text) is not None:
        return load_task(text, split, limit=limit, seed=seed)
    else:
        path = Path(text).expanduser()
        if not path.is_file():
            raise InstructionError(
                f"unknown instruction source {text!r}: give a .jsonl file, 'alpaca', a task "
                f"({', '.join(sorted(TASKS))}) or 'hf:<dataset>[:<config>]'."
            )
        samples = [_free_form(record, where) for record, where in read_jsonl(path)]
    return _subset(samples, limit, seed, text)


def load_task(
    task: str, split: str = "train", *, limit: int | None = None, seed: int | None = None
) -> list[InstructionSample]:
    """Samples of a zero-shot task in the reference's task-specific format (module docstring)."""
    name = _task_name(task)
    if name is None:
        raise InstructionError(f"unknown task {task!r}; known: {', '.join(sorted(TASKS))}.")
    spec = TASKS[name]
    split = SPLIT_ALIASES.get(split, split)
    root = data_dir()
    path = root / "eval" / name / f"{split}.jsonl" if root else None
    if path is not None and path.is_file():
        log.info("reading %s %s from %s", name, split, path)
        records: Iterable[tuple[Mapping, str]] = read_jsonl(path)
    else:
        local = sorted(p.stem for p in (root / "eval" / name).glob("*.jsonl")) if root else []
        looked = f"{path} (local splits: {local or 'none'})" if path else f"nowhere (${DATA_DIR_ENV} is not set)"
        log.info("%s %s not found locally (looked at %s); trying the hub", name, split, looked)
        rows = _hub_records(*spec.hub, split, looked_at=looked, expected=f"eval/{name}/{split}.jsonl")
        records = ((row, f"{spec.hub[0]}[{i}]") for i, row in enumerate(rows))
    samples = [_format(spec.format, record, where) for record, where in records]
    return _subset(samples, limit, seed, f"{name} {split}")


def read_jsonl(path: Path) -> list[tuple[dict[str, Any], str]]:
    """(record, "file:line") for each non-blank line; clear errors for bad JSON and empty files."""
    out = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InstructionError(f"{where} is not valid JSON ({e}).") from e
            if not isinstance(record, dict):
                raise InstructionError(f"{where} holds a JSON {type(record).__name__}, not an object.")
            out.append((record, where))
    if not out:
        raise InstructionError(f"{path} holds no samples.")
    return out


def _load_alpaca(split: str) -> list[InstructionSample]:
    if split not in ALPACA_FILES:
        raise InstructionError(f"alpaca has splits {sorted(ALPACA_FILES)}, not {split!r}.")
    root = data_dir()
    if root is None or not (root / ALPACA_FILES[split]).is_file():
        where = root / ALPACA_FILES[split] if root else f"nowhere (${DATA_DIR_ENV} is not set)"
        raise InstructionError(
            f"alpaca {split} not found (looked at {where}): {data_dir_hint(ALPACA_FILES[split])}; or pass a .jsonl "
            "path, or use 'hf:tatsu-lab/alpaca'."
        )
    path = root / ALPACA_FILES[split]
    log.info("reading alpaca %s from %s", split, path)
    return [_free_form(record, where) for record, where in read_jsonl(path)]


def _subset(
    samples: list[InstructionSample], limit: int | None, seed: int | None, label: str
) -> list[InstructionSample]:
    if not samples:
        raise InstructionError(f"{label} holds no samples.")
    if seed is not None:
        samples = [samples[i] for i in np.random.default_rng(seed).permutation(len(samples))]
    if limit is not None:
        if limit < 1:
            raise InstructionError(f"limit must be positive, not {limit}.")
        if limit > len(samples):
            log.warning("%s has %d samples, fewer than limit=%d; using all", label, len(samples), limit)
        samples = samples[:limit]
    return samples


def _hub_records(dataset: str, config: str | None, split: str, looked_at: str | None = None,
                 expected: str | None = None) -> list[Mapping]:
    hint = f"Set ${DATA_DIR_ENV} to a folder laid out like shared/data, or pass a local .jsonl file."
    if looked_at:
        hint = f"No local copy (looked at {looked_at}). " + hint
    if looked_at and expected:
        hint = f"No local copy (looked at {looked_at}): {data_dir_hint(expected)}."

    return list(load_hub_split(dataset, config, split, hint=hint, error=InstructionError))


# ---------------------------------------------------------------------------------- formats


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The Alpaca prompt of `shared/data/alpaca_2000` (no preamble)."""
    if input_text.strip():
        return f"### Instruction:\n{instruction}\n\n### Input:\n{input_text}\n\n### Response:"
    return f"### Instruction:\n{instruction}\n\n### Response:"


def _free_form(record: Mapping, where: str) -> InstructionSample:
    if "prompt" in record or "response" in record:
        return InstructionSample(_field(record, "prompt", where), _field(record, "response", where))
    if "instruction" in record:
        prompt = alpaca_prompt(_field(record, "instruction", where), str(record.get("input") or ""))
        return InstructionSample(prompt, " " + _field(record, "output", where).strip())
    raise InstructionError(f"{where}: missing field 'prompt' (expected prompt/response or instruction/output).")


def _field(record: Mapping, key: str, where: str) -> str:
    if key not in record:
        raise InstructionError(f"{where}: missing field {key!r}.")
    value = record[key]
    if not isinstance(value, str):
        raise InstructionError(f"{where}: field {key!r} is a {type(value).__name__}, not a string.")
    return value


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A zero-shot task: its hub copy and how a record becomes (prompt, choices, answer index)."""

    hub: tuple[str, str | None]
    format: Callable[[Mapping], tuple[str, list[str], int]]
    kind: str  # "yes_no" (negative: the flipped label) or "choice" (the most similar wrong choice)


def _format(fmt: Callable, record: Mapping, where: str) -> InstructionSample:
    try:
        prompt, choices, answer = fmt(record)
    except KeyError as e:
        raise InstructionError(f"{where}: missing field {e.args[0]!r}.") from e
    except (TypeError, ValueError, IndexError) as e:
        raise InstructionError(f"{where}: malformed record ({e}).") from e
    choices = tuple(" " + str(c).strip() for c in choices)
    if len(set(choices)) < len(choices):
        log.debug("%s has repeated choices %s", where, choices)
    if not 0 <= answer < len(choices):
        raise InstructionError(f"{where}: answer index {answer} is outside the {len(choices)} choices.")
    return InstructionSample(prompt, choices[answer], choices)


def _boolq(r: Mapping) -> tuple[str, list[str], int]:
    label = r["label"] if "label" in r else r["answer"]  # SuperGLUE int/bool, google/boolq bool
    return f"{r['passage'].strip()}\nQuestion: {r['question'].strip()}?\nAnswer:", ["no", "yes"], int(bool(label))


def _rte(r: Mapping) -> tuple[str, list[str], int]:
    prompt = f"{r['sentence1'].strip()}\nQuestion: {r['sentence2'].strip()} True or False?\nAnswer:"
    return prompt, ["True", "False"], int(r["label"])  # label 0 = entailment = True


def _ai2(r: Mapping) -> tuple[str, list[str], int]:
    """ARC / OpenBookQA, in the AI2 release layout or the hub's."""
    question = r["question"] if "question" in r else r["question_stem"]
    if isinstance(question, Mapping):  # AI2 release: {"stem", "choices": [{"text", "label"}]}
        stem, choices = question["stem"], question["choices"]
        texts, labels = [c["text"] for c in choices], [c["label"] for c in choices]
    else:  # hub: "choices": {"text": [...], "label": [...]}
        stem, texts, labels = question, list(r["choices"]["text"]), list(r["choices"]["label"])
    return f"Question: {stem.strip()}\nAnswer:", texts, labels.index(r["answerKey"])


def _piqa(r: Mapping) -> tuple[str, list[str], int]:
    return f"Question: {r['goal'].strip()}\nAnswer:", [r["sol1"], r["sol2"]], int(r["label"])


def _winogrande(r: Mapping) -> tuple[str, list[str], int]:
    # Not in the reference's task data; lm-eval scores the sentence's tail after each filled blank, which
    # has no single prompt. Ours asks for the blank's filler after "\nAnswer:" like the other tasks.
    prompt = f"{r['sentence'].strip()}\nQuestion: What does the _ stand for?\nAnswer:"
    return prompt, [r["option1"], r["option2"]], int(r["answer"]) - 1


def _hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag preprocessing."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(r: Mapping) -> tuple[str, list[str], int]:
    ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
    prompt = _hellaswag_clean(r["activity_label"] + ": " + ctx) + "\nAnswer:"
    return prompt, [_hellaswag_clean(e) for e in r["endings"]], int(r["label"])


TASKS: dict[str, TaskSpec] = {
    "boolq": TaskSpec(("aps/super_glue", "boolq"), _boolq, "yes_no"),
    "rte": TaskSpec(("nyu-mll/glue", "rte"), _rte, "yes_no"),
    "arc_easy": TaskSpec(("allenai/ai2_arc", "ARC-Easy"), _ai2, "choice"),
    "arc_challenge": TaskSpec(("allenai/ai2_arc", "ARC-Challenge"), _ai2, "choice"),
    "openbookqa": TaskSpec(("allenai/openbookqa", "main"), _ai2, "choice"),
    "piqa": TaskSpec(("baber/piqa", None), _piqa, "choice"),
    "winogrande": TaskSpec(("allenai/winogrande", "winogrande_xl"), _winogrande, "choice"),
    "hellaswag": TaskSpec(("Rowan/hellaswag", None), _hellaswag, "choice"),
}
TASK_ALIASES = {"arc-e": "arc_easy", "arc_e": "arc_easy", "arc-c": "arc_challenge", "arc_c": "arc_challenge",
                "obqa": "openbookqa", "wino": "winogrande"}


def _task_name(text: str) -> str | None:
    name = text.lower()
    name = TASK_ALIASES.get(name, name.replace("-", "_"))
    return name if name in TASKS else None
