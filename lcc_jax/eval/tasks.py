"""Zero-shot multiple-choice tasks as lm-evaluation-harness defines them: prompts, answers, gold labels.

Each document becomes one (context, continuation) request per choice; the model's summed
log-likelihood of the continuation picks the answer. Prompts follow the lm-eval task YAMLs
(EleutherAI/lm-evaluation-harness, lm_eval/tasks/...), field by field, with record fields used
as they are (lm-eval's Jinja templates do not strip them) and the default target delimiter " "
in front of every continuation:

  * boolq (super_glue/boolq/default.yaml): "{passage}\\nQuestion: {question}?\\nAnswer:";
    choices " no", " yes"; gold = label.
  * rte (glue/rte/default.yaml): "{sentence1}\\nQuestion: {sentence2} True or False?\\nAnswer:";
    choices " True", " False"; gold = label (0 = entailment = True).
  * hellaswag (hellaswag/hellaswag.yaml, utils.py): preprocess(activity_label + ": " + ctx_a + " " +
    ctx_b.capitalize()); choices " " + preprocess(ending); gold = int(label) (a string in the data).
  * winogrande (winogrande/default.yaml, preprocess_winogrande.py), partial scoring: one context per
    option, the sentence up to "_" with the option filled in; one shared continuation, " " + the
    sentence after "_" stripped; gold = answer "1"/"2" -> 0/1.
  * arc_easy, arc_challenge (arc/arc_easy.yaml; arc_challenge.yaml includes it):
    "Question: {question}\\nAnswer:"; choices " " + choices.text; gold = choices.label.index(answerKey).
  * openbookqa (openbookqa/openbookqa.yaml): question_stem as it is; choices " " + choices.text;
    gold = choices.label.index(answerKey.lstrip()).
  * piqa (piqa/piqa.yaml): "Question: {goal}\\nAnswer:"; choices " " + sol1, " " + sol2; gold = label.

Metrics as lm-eval reports them: `acc` for all, `acc_norm` (log-likelihood over the choice's length
in characters, without the delimiter) for hellaswag, ARC, OpenBookQA and PIQA.

Documents come from `$LCC_DATA_DIR/eval/<task>/<split>.jsonl` (the layouts of the project's
shared/data/eval: AI2 release layout for ARC and OpenBookQA, Hugging Face layouts otherwise), else
from the hub with `datasets` (lm-eval's data sets and splits).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence

from lcc_jax.data.instructions import InstructionError, _hellaswag_clean, _hub_records, read_jsonl
from lcc_jax.data.text import DATA_DIR_ENV, data_dir
from lcc_jax.errors import UserError

log = logging.getLogger(__name__)

TARGET_DELIMITER = " "  # lm-eval's default target_delimiter, put in front of every continuation


class ZeroShotError(UserError):
    """An unknown task, a missing or malformed data file, or settings that cannot run."""


@dataclasses.dataclass(frozen=True)
class Doc:
    """One multiple-choice question: a (context, continuation) request per choice and the gold index."""

    contexts: tuple[str, ...]  # one per choice (winogrande), or the same context repeated
    continuations: tuple[str, ...]  # one per choice, each starting with the target delimiter
    gold: int
    choices: tuple[str, ...]  # lm-eval's doc_to_choice strings: their lengths normalise acc_norm

    @property
    def requests(self) -> list[tuple[str, str]]:
        return list(zip(self.contexts, self.continuations))


DocBuilder = Callable[[Mapping], Doc]


@dataclasses.dataclass(frozen=True)
class TaskDef:
    """A task: its data (hub set and split, as in lm-eval), how a record becomes a Doc, its metrics."""

    name: str
    hub: tuple[str, str | None]  # (dataset, config) for datasets.load_dataset
    split: str  # lm-eval's evaluation split (test_split if it has one, else validation_split)
    build: DocBuilder
    acc_norm: bool  # whether lm-eval reports acc_norm for it


def _same_context(context: str, choices: Sequence[str], gold: int) -> Doc:
    choices = tuple(str(c) for c in choices)
    if not 0 <= gold < len(choices):
        raise ValueError(f"gold index {gold} is outside the {len(choices)} choices")
    return Doc(
        contexts=(context,) * len(choices),
        continuations=tuple(TARGET_DELIMITER + c for c in choices),
        gold=gold,
        choices=choices,
    )


def _boolq(r: Mapping) -> Doc:  # lm-eval super_glue/boolq/default.yaml
    label = r["label"] if "label" in r else r["answer"]  # SuperGLUE int, google/boolq bool
    return _same_context(f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", ["no", "yes"], int(bool(label)))


def _rte(r: Mapping) -> Doc:  # lm-eval glue/rte/default.yaml
    context = f"{r['sentence1']}\nQuestion: {r['sentence2']} True or False?\nAnswer:"
    return _same_context(context, ["True", "False"], int(r["label"]))


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag `preprocess`: strip, " [title]" -> ". ", drop [brackets], collapse double spaces."""
    return _hellaswag_clean(text)


def _hellaswag(r: Mapping) -> Doc:  # lm-eval hellaswag/utils.py process_docs (query, choices, gold)
    query = hellaswag_preprocess(r["activity_label"] + ": " + r["ctx_a"] + " " + r["ctx_b"].capitalize())
    return _same_context(query, [hellaswag_preprocess(e) for e in r["endings"]], int(r["label"]))


def _winogrande(r: Mapping) -> Doc:  # lm-eval winogrande/preprocess_winogrande.py
    """Partial scoring: each option fills the blank in the context; the shared tail is the continuation."""
    sentence = r["sentence"]
    blank = sentence.index("_")
    options = (r["option1"], r["option2"])
    tail = TARGET_DELIMITER + sentence[blank + 1 :].strip()
    contexts = tuple(sentence[:blank] + o for o in options)
    gold = {"1": 0, "2": 1}[str(r["answer"])]
    return Doc(contexts=contexts, continuations=(tail, tail), gold=gold, choices=contexts)


def _ai2_fields(r: Mapping) -> tuple[str, list[str], list[str]]:
    """(question, choice texts, choice labels) of ARC / OpenBookQA, AI2 release layout or the hub's."""
    question = r["question_stem"] if "question_stem" in r else r["question"]
    if isinstance(question, Mapping):  # AI2 release: {"stem", "choices": [{"text", "label"}]}
        return question["stem"], [c["text"] for c in question["choices"]], [c["label"] for c in question["choices"]]
    return question, list(r["choices"]["text"]), list(r["choices"]["label"])


def _arc(r: Mapping) -> Doc:  # lm-eval arc/arc_easy.yaml
    question, texts, labels = _ai2_fields(r)
    return _same_context(f"Question: {question}\nAnswer:", texts, labels.index(r["answerKey"]))


def _openbookqa(r: Mapping) -> Doc:  # lm-eval openbookqa/openbookqa.yaml
    question, texts, labels = _ai2_fields(r)
    return _same_context(question, texts, labels.index(r["answerKey"].lstrip()))


def _piqa(r: Mapping) -> Doc:  # lm-eval piqa/piqa.yaml
    return _same_context(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], int(r["label"]))


TASKS: dict[str, TaskDef] = {
    t.name: t
    for t in (
        TaskDef("boolq", ("aps/super_glue", "boolq"), "validation", _boolq, acc_norm=False),
        TaskDef("rte", ("nyu-mll/glue", "rte"), "validation", _rte, acc_norm=False),
        TaskDef("hellaswag", ("Rowan/hellaswag", None), "validation", _hellaswag, acc_norm=True),
        TaskDef("winogrande", ("allenai/winogrande", "winogrande_xl"), "validation", _winogrande, acc_norm=False),
        TaskDef("arc_easy", ("allenai/ai2_arc", "ARC-Easy"), "test", _arc, acc_norm=True),
        TaskDef("arc_challenge", ("allenai/ai2_arc", "ARC-Challenge"), "test", _arc, acc_norm=True),
        TaskDef("openbookqa", ("allenai/openbookqa", "main"), "test", _openbookqa, acc_norm=True),
        TaskDef("piqa", ("baber/piqa", None), "validation", _piqa, acc_norm=True),
    )
}
# The seven-task mean of the pruning literature (Wanda, SparseGPT, RestoreLCC), in their table order.
SUITE: tuple[str, ...] = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
ALIASES = {"arc-e": "arc_easy", "arc_e": "arc_easy", "arc-c": "arc_challenge", "arc_c": "arc_challenge",
           "obqa": "openbookqa", "wino": "winogrande"}


def resolve_tasks(tasks: str | Iterable[str]) -> tuple[str, ...]:
    """Task names from "suite", "all", "boolq,rte", or a sequence of names (aliases: arc-e, arc-c, obqa)."""
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    out: list[str] = []
    for item in items:
        key = item.strip().lower()
        if not key:
            continue
        if key in ("suite", "all"):
            names = SUITE if key == "suite" else tuple(TASKS)
        else:
            names = (ALIASES.get(key, key.replace("-", "_")),)
        for name in names:
            if name not in TASKS:
                raise ZeroShotError(f"unknown task {item!r}; known: {', '.join(TASKS)}, 'suite' ({', '.join(SUITE)}) "
                                    f"and 'all'.")
            if name not in out:
                out.append(name)
    if not out:
        raise ZeroShotError(f"no tasks given (got {tasks!r}).")
    return tuple(out)


def load_docs(task: str, *, limit: int | None = None) -> list[Doc]:
    """The first `limit` (default: all) documents of `task`'s evaluation split, local file first."""
    (name,) = resolve_tasks([task])
    spec = TASKS[name]
    if limit is not None and limit < 1:
        raise ZeroShotError(f"limit must be positive, not {limit}.")
    root = data_dir()
    path = root / "eval" / name / f"{spec.split}.jsonl" if root is not None else None
    if path is not None and path.is_file():
        log.info("reading %s from %s", name, path)
        try:
            records = read_jsonl(path)
        except InstructionError as e:
            raise ZeroShotError(str(e)) from e
    else:
        looked = str(path) if path is not None else f"nowhere (${DATA_DIR_ENV} is not set)"
        log.info("%s %s not found locally (looked at %s); trying the hub", name, spec.split, looked)
        try:
            rows = _hub_records(*spec.hub, spec.split, looked_at=looked, expected=f"eval/{name}/{spec.split}.jsonl")
        except InstructionError as e:
            raise ZeroShotError(
                f"no data for task {name!r}: expected ${DATA_DIR_ENV}/eval/{name}/{spec.split}.jsonl. {e}"
            ) from e
        records = [(row, f"{spec.hub[0]}[{i}]") for i, row in enumerate(rows)]
    if limit is not None:
        records = records[:limit]
    docs = []
    for record, where in records:
        try:
            docs.append(spec.build(record))
        except KeyError as e:
            raise ZeroShotError(f"{where}: missing field {e.args[0]!r} for task {name}.") from e
        except (TypeError, ValueError, IndexError, AttributeError) as e:
            raise ZeroShotError(f"{where}: malformed {name} record ({e}).") from e
    return docs
