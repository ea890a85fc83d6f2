"""Stand-ins and dump hooks that let the RestoreLCC authors' own code run on transformers 5 (our code, not theirs).

run_official.py copies this file next to their RestoreLCC_train.py; the patches in ../patches/ make their
files import it instead of `pyvene`, `trl` and `wandb` (none of which is on the GPU image, and trl 0.8's
API is gone from current releases), and call its `dump_*` functions, which write every stage's output into
$RLCC_DUMP_DIR. Settings come from environment variables that run_official.py sets:

  RLCC_DUMP_DIR        folder for the stage outputs (required)
  RLCC_CACHE_DIR       folder for the seed-independent last-token captures (reused by later seeds)
  RLCC_CAPTURE_DTYPE   float16 (theirs) | float32 | bfloat16: dtype of the capture models
  RLCC_TRAIN_DTYPE     bfloat16 (theirs) | float32: dtype of the trained model and its Trainer precision
  RLCC_MINILM          sentence-transformers folder or name for the negatives (theirs: 'all-MiniLM-L6-v2')
  RLCC_PAIRS           optional: a pairs.json written by an earlier run of their pair builder; used instead
                       of running MiniLM again (for machines without the MiniLM weights)
  RLCC_DETECT_ANOMALY  1 (theirs) | 0: torch.autograd anomaly detection while training (slow; no effect on
                       the numbers)

Every stand-in reproduces what the replaced library did for their call sites, nothing more:
  * `IntervenableModel`: pyvene's "<module>.input" collection = a forward pre-hook on that module, present
    only during the call (pyvene also removes its hooks after each call);
  * `DataCollatorForCompletionOnlyLM`: trl 0.8's collator: pad, labels = inputs with pad ids as -100, then
    every label up to and including the LAST occurrence of the response template set to -100 (a row
    without the template is ignored entirely);
  * `SFTTrainer`: trl 0.8's non-packed path: each text tokenized once with its special tokens,
    truncation=True, max_length=max_seq_length, no padding; then a plain transformers Trainer.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import transformers

_STARTED = time.time()


# ----------------------------------------------------------------------------------- settings


def _dump_dir() -> Path:
    path = Path(os.environ["RLCC_DUMP_DIR"])
    path.mkdir(parents=True, exist_ok=True)
    return path


def _dtype(name: str, default: str) -> torch.dtype:
    value = os.environ.get(name, default)
    return {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
            "float32": torch.float32, "fp32": torch.float32}[value]


def capture_dtype() -> torch.dtype:
    return _dtype("RLCC_CAPTURE_DTYPE", "float16")


def train_dtype() -> torch.dtype:
    return _dtype("RLCC_TRAIN_DTYPE", "bfloat16")


def train_bf16() -> bool:
    return train_dtype() == torch.bfloat16


def minilm() -> str:
    return os.environ.get("RLCC_MINILM", "all-MiniLM-L6-v2")


def detect_anomaly() -> bool:
    return os.environ.get("RLCC_DETECT_ANOMALY", "1") == "1"


def log_time(stage: str) -> None:
    """Record when a stage finished (seconds since the process started) in timings.json."""
    path = _dump_dir() / "timings.json"
    timings = json.loads(path.read_text()) if path.exists() else {}
    timings[stage] = round(time.time() - _STARTED, 2)
    path.write_text(json.dumps(timings, indent=2) + "\n")


# ----------------------------------------------------------------------------------- wandb


def init(*args, **kwargs):
    """wandb.init stand-in: their script only calls it with mode='disabled' in train mode."""
    return None


# ----------------------------------------------------------------------------------- pyvene


class IntervenableModel:
    """pyvene.IntervenableModel for [{"component": "<path>.input", "intervention": f}]: f(x, None) sees, and
    may replace, the input of <path> (a path like 'model.layers[3].self_attn.o_proj') during each call."""

    def __init__(self, config, model):
        self.model = model
        self.targets = []
        for entry in config:
            component = entry["component"]
            if not component.endswith(".input"):
                raise ValueError(f"only '<module>.input' components are supported, not {component!r}")
            self.targets.append((_resolve(model, component[: -len(".input")]), entry["intervention"]))

    def __call__(self, inputs: dict):
        handles = [module.register_forward_pre_hook(_pre_hook(fn)) for module, fn in self.targets]
        try:
            return None, self.model(**inputs)
        finally:
            for handle in handles:
                handle.remove()


def _resolve(root, path: str):
    module = root
    for name, index in re.findall(r"([A-Za-z_]\w*)(?:\[(\d+)\])?", path):
        module = getattr(module, name)
        if index:
            module = module[int(index)]
    return module


def _pre_hook(fn):
    def hook(module, args):
        out = fn(args[0], None)
        return None if out is args[0] else (out, *args[1:])

    return hook


# ----------------------------------------------------------------------------------- capture cache


def _acts_key(model, samples) -> str:
    h = hashlib.sha256()
    h.update(str(getattr(model.config, "_name_or_path", "")).encode())
    h.update(str(next(model.parameters()).dtype).encode())
    for s in samples:
        h.update(s["text"].encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def cached_acts(model, samples):
    """Last-token activations computed earlier for the same model, dtype and texts (by an earlier seed)."""
    folder = os.environ.get("RLCC_CACHE_DIR")
    path = Path(folder) / f"acts_{_acts_key(model, samples)}.pt" if folder else None
    if path is not None and path.exists():
        print(f"[rlcc] reusing last-token activations from {path}")
        return torch.load(path)
    return None


def store_acts(model, samples, acts) -> None:
    folder = os.environ.get("RLCC_CACHE_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        path = Path(folder) / f"acts_{_acts_key(model, samples)}.pt"
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # seeds running side by side may write it at once
        torch.save(acts, tmp)
        tmp.replace(path)


# ----------------------------------------------------------------------------------- pairs


def pairs(construct, samples):
    """construct(samples) (their pair builder), or the pairs it wrote earlier when RLCC_PAIRS names them."""
    stored = os.environ.get("RLCC_PAIRS")
    if stored:
        data = json.loads(Path(stored).read_text())
        texts = [s["text"] for s in samples]
        if data["prompts_all"] != texts:
            raise ValueError(f"{stored} was built from other samples than these {len(texts)}")
        print(f"[rlcc] pairs from {stored} (built earlier by their construct function)")
        return ([{"text": t, "label": 1} for t in data["positive_all"]],
                [{"text": t, "label": 0} for t in data["negative_all"]])
    pos, neg = construct(samples)
    texts = {"prompts_all": [s["text"] for s in samples], "positive_all": [p["text"] for p in pos],
             "negative_all": [n["text"] for n in neg]}
    (_dump_dir() / "pairs_all.json").write_text(json.dumps(texts) + "\n")
    log_time("pairs")
    return pos, neg


# ----------------------------------------------------------------------------------- trl


class DataCollatorForCompletionOnlyLM(transformers.DataCollatorForLanguageModeling):
    """trl 0.8's completion-only collator (without an instruction template)."""

    def __init__(self, response_template, tokenizer, ignore_index: int = -100, **kwargs):
        super().__init__(tokenizer=tokenizer, mlm=False, **kwargs)
        if isinstance(response_template, str):
            response_template = tokenizer.encode(response_template, add_special_tokens=False)
        self.response_token_ids = list(response_template)
        self.ignore_index = ignore_index

    def torch_call(self, examples):
        batch = super().torch_call(examples)
        template = self.response_token_ids
        for i in range(len(examples)):
            labels = batch["labels"][i]
            start = None
            for idx in np.where(labels.numpy() == template[0])[0]:
                if labels[idx : idx + len(template)].tolist() == template:
                    start = int(idx)  # the last occurrence wins, as in trl
            if start is None:
                warnings.warn("response template not found in a training row; the row is ignored", stacklevel=2)
                batch["labels"][i, :] = self.ignore_index
            else:
                batch["labels"][i, : start + len(template)] = self.ignore_index
        return batch


class SFTTrainer(transformers.Trainer):
    """trl 0.8's SFTTrainer on a text field, non-packed, without PEFT."""

    def __init__(self, model=None, args=None, train_dataset=None, eval_dataset=None, tokenizer=None,
                 dataset_text_field="text", max_seq_length=None, data_collator=None, peft_config=None, **kwargs):
        if peft_config is not None:
            raise ValueError("the stand-in SFTTrainer does not apply PEFT")
        if max_seq_length is None:
            max_seq_length = min(tokenizer.model_max_length, 1024)  # trl 0.8's default

        def encode(rows):
            if rows is None:
                return None
            out = []
            for row in rows:
                enc = tokenizer(row[dataset_text_field], add_special_tokens=True, truncation=True, padding=False,
                                max_length=max_seq_length)
                out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
            return out

        super().__init__(model=model, args=args, train_dataset=encode(train_dataset),
                         eval_dataset=encode(eval_dataset), processing_class=tokenizer, data_collator=data_collator,
                         **kwargs)


DPOTrainer = None  # imported by their utils/trainers.py, never used


# ----------------------------------------------------------------------------------- dumps


def dump_probing(scope: dict) -> None:
    """Everything obtain_main_vecs computed (call with its locals() just before it returns)."""
    out = _dump_dir()
    samples, pos, neg = scope["samples"], scope["pos_samples"], scope["neg_samples"]
    prompts = [s["text"] for s in samples]
    pairs = {
        "prompts": prompts,
        "positive": [p["text"][len(q):] if p["text"].startswith(q) else None for p, q in zip(pos, prompts)],
        "negative": [n["text"][len(q):] if n["text"].startswith(q) else None for n, q in zip(neg, prompts)],
        "positive_text": [p["text"] for p in pos],
        "negative_text": [n["text"] for n in neg],
    }
    (out / "pairs.json").write_text(json.dumps(pairs) + "\n")
    captures = out / "captures"
    captures.mkdir(exist_ok=True)
    for name, key in (("dense_prompt", "original_acts"), ("dense_positive", "pos_acts"),
                      ("dense_negative", "neg_acts"), ("pruned_prompt", "pruned_acts")):
        np.save(captures / f"{name}.npy", scope[key].float().numpy())
    comps = [c if c is not None else torch.zeros_like(scope["all_comps"][0]) for c in scope["all_comps"]]
    np.savez(out / "components.npz",
             basis=scope["all_directions"].float().cpu().numpy(),  # (L*H, d, d): normalised rows of V^T (fp16)
             component=torch.stack([c.float().cpu() for c in comps]).numpy())  # (L*H, d): probe-time c
    heads = np.asarray(scope["top_heads"])  # (L*H, 2): (layer, head), best first
    num_heads = scope["pos_acts"].shape[1] // max(int(heads[:, 0].max()) + 1, 1)
    np.savez(out / "probes.npz", accuracy=scope["head_scores"].float().numpy(), ranking_lh=heads,
             ranking=heads[:, 0] * num_heads + heads[:, 1])
    log_time("probing")


def dump_training(model, heads, trainer) -> None:
    """attn_v (β), attn_b (b) and main_comp of every head after training, δ = main_compᵀ β + b, the selection."""
    out = _dump_dir()
    layers = model.model.layers
    beta = torch.stack([torch.stack([p.detach().float().cpu() for p in l.self_attn.attn_v]) for l in layers])
    bias = torch.stack([torch.stack([p.detach().float().cpu() for p in l.self_attn.attn_b]) for l in layers])
    comp = torch.stack([torch.stack([p.detach().float().cpu() for p in l.self_attn.main_comp]) for l in layers])
    delta = torch.einsum("lhij,lhi->lhj", comp, beta) + bias  # (L, H, d): what their forward adds per head
    num_heads = beta.shape[1]
    selected = np.asarray([int(l) * num_heads + int(h) for l, h in heads], np.int64)
    np.savez(out / "trained.npz", beta=beta.numpy(), bias=bias.numpy(), delta=delta.numpy(), heads=selected,
             basis_selected=comp.reshape(-1, *comp.shape[2:])[selected].numpy())
    (out / "train_history.json").write_text(json.dumps(trainer.state.log_history, indent=2) + "\n")
    log_time("train")
