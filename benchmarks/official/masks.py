"""Carry one pruning decision to another machine as a small file, so both sides start from the same pruned model.

Wanda's mask depends on calibration activations, and a GPU's matmul kernels differ from a CPU's (and from
another GPU's autotuned choice) in the last bits: weights near the per-row threshold land on either side,
and the same command gave pruned WikiText-2 perplexities 50.13 and 49.95 on two GPU machines. A comparison
of two restorations must start from one mask. The pruned checkpoint is 0.5 GB; its masks, one bit per
weight, are 13 MB: small enough to travel with the code.

    python -m benchmarks.official.masks pack PRUNED_CKPT masks.npz          # here, from scripts/prune.py's --out
    python -m benchmarks.official.masks apply DENSE masks.npz --out PRUNED_CKPT [--export-hf PRUNED_HF]

`apply` zeroes the dense model where the mask says so and checks every kernel's sum of |w| against the one
recorded by `pack`: a method that also changes the kept weights (SparseGPT) is refused, not silently
approximated.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np


def _abs_sums(model, paths) -> dict[str, float]:
    from lcc_jax.sharding import flat_params

    params = flat_params(model)
    return {p: float(np.abs(np.asarray(params[p][...], dtype=np.float64)).sum()) for p in paths}


def pack(pruned_folder: Path, out: Path) -> dict:
    """The checkpoint's masks as packed bits (+ shapes, |w| sums and the pruning meta) in one .npz."""
    from lcc_jax.checkpoint import load_pruned

    checkpoint = load_pruned(pruned_folder)
    if not checkpoint.masks:
        raise SystemExit(f"{pruned_folder} holds no masks (structured pruning changes shapes): nothing to pack")
    paths = sorted(checkpoint.masks)
    arrays, digest = {}, hashlib.sha256()
    for i, path in enumerate(paths):
        keep = np.asarray(checkpoint.masks[path], dtype=bool)
        arrays[f"bits{i}"] = np.packbits(keep.reshape(-1))
        digest.update(path.encode() + arrays[f"bits{i}"].tobytes())
    info = {"paths": paths, "shapes": [list(checkpoint.masks[p].shape) for p in paths],
            "abs_sums": _abs_sums(checkpoint.model, paths), "sha256": digest.hexdigest(),
            "prune": checkpoint.meta.get("prune"), "calibration": checkpoint.meta.get("calibration"),
            "sparsity_total": checkpoint.meta.get("sparsity_total"), "source": str(pruned_folder)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez_compressed(tmp, info=np.frombuffer(json.dumps(info).encode(), dtype=np.uint8), **arrays)
    tmp.replace(out)
    return info


def read(masks_file: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(info, {path: bool mask}) from a file written by `pack`."""
    with np.load(masks_file) as stored:
        info = json.loads(stored["info"].tobytes().decode())
        masks = {}
        for i, (path, shape) in enumerate(zip(info["paths"], info["shapes"], strict=True)):
            size = int(np.prod(shape))
            masks[path] = np.unpackbits(stored[f"bits{i}"], count=size).astype(bool).reshape(shape)
    return info, masks


def apply(dense: str, masks_file: Path, out: Path, export_hf: Path | None = None, *, rtol: float = 1e-6) -> dict:
    """Zero `dense` where the packed masks say so; save it as scripts/prune.py would (and a HF folder)."""
    import jax.numpy as jnp

    import lcc_jax
    from lcc_jax.checkpoint import save_pruned
    from lcc_jax.convert.export import check_writable, save_hf
    from lcc_jax.pruning.masks import apply_masks, sparsity_report
    from lcc_jax.sharding import flat_params

    check_writable(out.absolute(), overwrite=False)
    info, masks = read(masks_file)
    model, tokenizer, _ = lcc_jax.load(dense, dtype=jnp.float32)
    params = flat_params(model)
    for path, keep in masks.items():
        if path not in params or tuple(params[path][...].shape) != keep.shape:
            found = tuple(params[path][...].shape) if path in params else "absent"
            raise SystemExit(f"{masks_file}: mask {path} {keep.shape} does not fit {dense} ({found}): another model")
    device_masks = {path: jnp.asarray(keep) for path, keep in masks.items()}
    model = apply_masks(model, device_masks)
    sums = _abs_sums(model, info["paths"])
    off = {p: (sums[p], want) for p, want in info["abs_sums"].items() if abs(sums[p] - want) > rtol * max(want, 1.0)}
    if off:
        path, (got, want) = next(iter(off.items()))
        raise SystemExit(f"{len(off)} kernels differ from the packed checkpoint after masking (e.g. {path}: "
                         f"sum |w| {got:.6g} vs {want:.6g}): its pruning changed kept weights (SparseGPT?) or "
                         f"{dense} is not the model it pruned")
    report = sparsity_report(model)
    meta = {"model": dense, "prune": info["prune"], "calibration": info["calibration"],
            "sparsity_total": report.total, "config": model.config.to_hf(),
            "masks_from": {"file": str(masks_file), "sha256": info["sha256"], "source": info["source"]}}
    save_pruned(out, model, tokenizer, device_masks, meta=meta)
    if export_hf:
        save_hf(model, tokenizer, export_hf)
    return meta


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="masks of a pruned checkpoint -> .npz")
    p.add_argument("pruned", type=Path)
    p.add_argument("out", type=Path)
    a = sub.add_parser("apply", help="dense model + .npz -> pruned checkpoint (+ HF folder)")
    a.add_argument("dense")
    a.add_argument("masks", type=Path)
    a.add_argument("--out", type=Path, required=True)
    a.add_argument("--export-hf", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.command == "pack":
        info = pack(args.pruned, args.out)
        print(json.dumps({"out": str(args.out), "sha256": info["sha256"], "sparsity_total": info["sparsity_total"],
                          "bytes": args.out.stat().st_size}))
    else:
        meta = apply(args.dense, args.masks, args.out, args.export_hf)
        print(json.dumps({"out": str(args.out), "sparsity_total": meta["sparsity_total"],
                          "masks_sha256": meta["masks_from"]["sha256"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
