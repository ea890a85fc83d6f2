"""Run the RestoreLCC authors' own pipeline (github.com/zijian678/restorelcc) on our inputs, dumping every stage.

    python -m benchmarks.official.run_official --dense DENSE_HF --pruned PRUNED_HF \\
        --train train.jsonl --valid valid.jsonl --seed 0 --out OUT [--top-k 68] [--minilm DIR | --pairs FILE]

What it does, in a fresh folder OUT/work each time (a run whose OUT/trained.npz exists is skipped):
  1. copies a clean checkout of their code (--source, default .official/restorelcc) and applies
     benchmarks/official/patches/*.patch in order (exact context, no fuzz: a patch that does not fit fails);
  2. copies shim/rlcc_shim.py beside their RestoreLCC_train.py (the stand-ins and dump hooks the patches call);
  3. writes our prompt/response .jsonl files where their script reads its data,
     processed_data/alpaca_<N>/{train,valid}.pt (lists of {'text': prompt, 'label': response}, their format);
  4. links the dense folder as ./dense and runs, as their train.sh does,
     `python RestoreLCC_train.py --spec_task alpaca --num_train_samples N --lr .. --use_topk_heads K
      --pruned_model_path PRUNED --base_model_name dense --seed S ...` with the RLCC_* variables set;
  5. their script (patched) writes into OUT: pairs_all.json, pairs.json, captures/*.npy, components.npz,
     probes.npz, trained.npz, train_history.json, timings.json; this wrapper adds meta.json and official.log.

`pairs` sub-command: only their pair builder (construct_alpaca: MiniLM negatives among all samples),
run on a machine that has MiniLM, so that a machine without it can pass --pairs later:

    python -m benchmarks.official.run_official pairs --train train.jsonl --minilm DIR --out pairs_all.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DEFAULT_SOURCE = ROOT / ".official" / "restorelcc"
PATCHES = HERE / "patches"
SHIM = HERE / "shim" / "rlcc_shim.py"


class PatchError(RuntimeError):
    pass


# ----------------------------------------------------------------------------------- patches


def parse_patch(text: bytes) -> list[tuple[str, list[tuple[int, list[bytes], list[bytes]]]]]:
    """[(path, [(old_start, old_lines, new_lines), ...]), ...] of a unified diff (git's a/ b/ prefixes)."""
    files: list = []
    lines = text.splitlines(keepends=True)
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith(b"+++ "):
            path = line[4:].rstrip(b"\r\n").decode()
            files.append((path[2:] if path.startswith("b/") else path, []))
        elif line.startswith(b"@@ "):
            head = line.split(b"@@")[1].split()
            old_start = int(head[0][1:].split(b",")[0])
            old_count = int(head[0].split(b",")[1]) if b"," in head[0] else 1
            new_count = int(head[1].split(b",")[1]) if b"," in head[1] else 1
            old, new = [], []
            i += 1
            while (len(old) < old_count or len(new) < new_count) and i < len(lines):
                body = lines[i]
                if body.startswith(b"\\"):  # "\ No newline at end of file"
                    i += 1
                    continue
                tag, rest = body[:1], body[1:]
                if tag in (b" ", b"\n", b"\r"):
                    rest = rest if tag == b" " else body
                    old.append(rest)
                    new.append(rest)
                elif tag == b"-":
                    old.append(rest)
                elif tag == b"+":
                    new.append(rest)
                else:
                    raise PatchError(f"unexpected line in hunk: {body[:60]!r}")
                i += 1
            files[-1][1].append((old_start, old, new))
            continue
        i += 1
    return files


def apply_patch(patch: Path, tree: Path) -> list[str]:
    """Apply one unified diff to `tree` exactly (each hunk's old lines must be where the header says)."""
    touched = []
    for path, hunks in parse_patch(patch.read_bytes()):
        target = tree / path
        lines = target.read_bytes().splitlines(keepends=True)
        offset = 0
        for old_start, old, new in hunks:
            at = old_start - 1 + offset
            if lines[at : at + len(old)] != old:
                raise PatchError(f"{patch.name}: a hunk does not fit {path} at line {old_start}; "
                                 "is --source a clean checkout of zijian678/restorelcc?")
            lines[at : at + len(old)] = new
            offset += len(new) - len(old)
        target.write_bytes(b"".join(lines))
        touched.append(path)
    return touched


def prepare_tree(source: Path, work: Path) -> dict[str, list[str]]:
    """A clean copy of their code in `work`, patched, with the shim beside their script."""
    if not (source / "RestoreLCC_train.py").is_file():
        raise SystemExit(f"{source} holds no RestoreLCC_train.py: fetch github:zijian678/restorelcc into it first "
                         "(see benchmarks/official/README.md)")
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(source, work, ignore=shutil.ignore_patterns(".git"))
    applied = {p.name: apply_patch(p, work) for p in sorted(PATCHES.glob("*.patch"))}
    shutil.copy2(SHIM, work / "rlcc_shim.py")
    return applied


# ----------------------------------------------------------------------------------- data


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = rows[:limit] if limit else rows
    out = []
    for row in rows:
        if "prompt" in row:
            out.append({"text": row["prompt"], "label": row["response"]})
        else:  # their own format
            out.append({"text": row["text"], "label": row["label"]})
    return out


def write_their_data(work: Path, train: list[dict], valid: list[dict]) -> int:
    """processed_data/alpaca_<N>/{train,valid}.pt as their loaders read them; returns N."""
    import torch

    folder = work / "processed_data" / f"alpaca_{len(train)}"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(train, folder / "train.pt")
    torch.save(valid, folder / "valid.pt")
    (work / "processed_data2" / "main_comps").mkdir(parents=True, exist_ok=True)
    return len(train)


# ----------------------------------------------------------------------------------- runs


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "sentence_transformers", "sklearn", "numpy"):
        try:
            out[name] = __import__(name).__version__
        except Exception as e:  # noqa: BLE001 - report, never fail on it
            out[name] = f"unavailable ({type(e).__name__})"
    return out


def run(args) -> int:
    out = args.out.resolve()
    if (out / "trained.npz").exists() and not args.force:
        print(f"[run_official] {out} is done (trained.npz exists); --force to run again")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("pairs_all.json", "pairs.json", "components.npz", "probes.npz", "trained.npz",
                  "train_history.json", "timings.json", "meta.json"):
        (out / stale).unlink(missing_ok=True)
    work = out / "work"
    applied = prepare_tree(args.source.resolve(), work)
    train, valid = read_jsonl(args.train, args.num_train), read_jsonl(args.valid, args.num_valid)
    n = write_their_data(work, train, valid)
    (work / "dense").symlink_to(args.dense.resolve(), target_is_directory=True)
    top_k = args.top_k
    env = dict(os.environ)
    env.update({
        "RLCC_DUMP_DIR": str(out),
        "RLCC_CACHE_DIR": str((args.cache or out.parent / "capture_cache").resolve()),
        "RLCC_CAPTURE_DTYPE": args.capture_dtype,
        "RLCC_TRAIN_DTYPE": args.train_dtype,
        "RLCC_DETECT_ANOMALY": "1" if args.detect_anomaly else "0",
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    })
    if args.minilm:
        env["RLCC_MINILM"] = str(Path(args.minilm).resolve())
    if args.pairs:
        env["RLCC_PAIRS"] = str(Path(args.pairs).resolve())
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    command = [sys.executable, "RestoreLCC_train.py", "--spec_task", "alpaca", "--num_train_samples", str(n),
               "--lr", str(args.lr), "--num_epoch", str(args.epochs), "--use_topk_heads", str(top_k),
               "--pruned_model_path", str(args.pruned.resolve()), "--base_model_name", "dense",
               "--seed", str(args.seed), "--train_batch", str(args.batch_size), "--eval_batch", str(args.batch_size),
               "--output_dir", str(work / "checkpoints"), "--hf_cache_dir", str(work / "hf_cache"),
               "--device", args.device]
    meta = {"command": command, "seed": args.seed, "top_k": top_k, "num_train": n, "num_valid": len(valid),
            "dense": str(args.dense.resolve()), "pruned": str(args.pruned.resolve()), "patches": applied,
            "capture_dtype": args.capture_dtype, "train_dtype": args.train_dtype,
            "detect_anomaly": args.detect_anomaly, "minilm": env.get("RLCC_MINILM"), "pairs": env.get("RLCC_PAIRS"),
            "versions": versions()}
    print("[run_official]", " ".join(command), flush=True)
    started = time.time()
    with open(out / "official.log", "w") as log:
        try:
            returncode = subprocess.run(command, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            returncode = "timeout"
    meta.update(returncode=returncode, seconds=round(time.time() - started, 1))
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if returncode != 0 or not (out / "trained.npz").exists():
        (out / "trained.npz").unlink(missing_ok=True)
        tail = (out / "official.log").read_text(errors="replace")[-3000:]
        print(tail)
        print(f"[run_official] their pipeline did not finish (exit {returncode}); log: {out / 'official.log'}")
        return returncode if isinstance(returncode, int) and returncode else 1
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    print(f"[run_official] seed {args.seed} done in {meta['seconds']} s -> {out}")
    return 0


def pairs_only(args) -> int:
    """Their construct_alpaca on all training samples (MiniLM negatives), written as pairs_all.json."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "work"
        prepare_tree(args.source.resolve(), work)
        os.environ["RLCC_DUMP_DIR"] = str(Path(tmp) / "dump")
        os.environ["RLCC_MINILM"] = str(Path(args.minilm).resolve())
        sys.path.insert(0, str(work))
        import rlcc_shim
        from utils.components import construct_alpaca  # their code, patched

        rlcc_shim.pairs(construct_alpaca, read_jsonl(args.train, args.num_train))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(tmp) / "dump" / "pairs_all.json", args.out)
    print(f"[run_official] their pairs -> {args.out}")
    return 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", choices=("run", "pairs"), default="run")
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="clean checkout of their code")
    parser.add_argument("--dense", type=Path, help="dense model, Hugging Face folder")
    parser.add_argument("--pruned", type=Path, help="pruned model, Hugging Face folder (lcc_jax.save_hf)")
    parser.add_argument("--train", type=Path, required=True, help="prompt/response .jsonl (first --num-train)")
    parser.add_argument("--valid", type=Path, help="prompt/response .jsonl for their per-epoch validation")
    parser.add_argument("--num-train", type=int, default=None, help="default: the whole file")
    parser.add_argument("--num-valid", type=int, default=None, help="default: the whole file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top-k", type=int, default=68, help="heads to train (lcc_jax: round(0.25 * L * H))")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--minilm", default=None, help="sentence-transformers folder of all-MiniLM-L6-v2")
    parser.add_argument("--pairs", type=Path, default=None, help="pairs_all.json from the `pairs` sub-command")
    parser.add_argument("--capture-dtype", default="float16", choices=("float16", "bfloat16", "float32"),
                        help="their capture models' dtype (theirs: float16)")
    parser.add_argument("--train-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="their trained model's dtype and Trainer precision (theirs: bfloat16)")
    parser.add_argument("--no-detect-anomaly", dest="detect_anomaly", action="store_false",
                        help="turn off their torch.autograd anomaly detection (faster; same numbers)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--cache", type=Path, default=None,
                        help="seed-independent capture cache (default: OUT/../capture_cache)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds before their run is killed")
    parser.add_argument("--keep-work", action="store_true", help="keep OUT/work (their patched tree)")
    parser.add_argument("--force", action="store_true", help="run again even if OUT is done")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.mode == "run":
        missing = [f"--{n}" for n in ("dense", "pruned", "valid") if getattr(args, n) is None]
        if missing:
            parser.error(f"run needs {', '.join(missing)}")
        if not args.minilm and not args.pairs:
            parser.error("run needs --minilm (a sentence-transformers folder) or --pairs (from the pairs sub-command)")
    elif not args.minilm:
        parser.error("pairs needs --minilm")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    return pairs_only(args) if args.mode == "pairs" else run(args)


if __name__ == "__main__":
    raise SystemExit(main())
