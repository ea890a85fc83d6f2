"""What a folded compensation can reach: the dimension of the o_proj-bias shifts a head set spans.

    python -m benchmarks.compensation_span smollm2-135m --prune wanda:0.5 \
        --members results/smollm2/ablation/wanda-0.5/ablation/seed0 --out results/smollm2/compensation_span_wanda-0.5.json

RestoreLCC's per-head vectors δ (layers, heads, head_dim) are folded into the o_proj bias: layer l gets
b_l = Σ_h W_o[l, h] δ[l, h], one constant hidden-size vector per layer. Whatever the parametrization (β·V + b,
bias only, a span), a member's function class lies in the span of its heads' o_proj row blocks, layer by
layer, whose dimension is Σ_l rank(W_o[l, chosen heads]) — at most layers × hidden. This script measures those
ranks on real weights (dense and pruned) and, for each member of a `scripts/ablate.py` run (the member files of
one seed, which record the heads), the dimension its head set reaches and how many layers it touches, beside the
member's Alpaca validation loss and perplexity. A `span<K>` member keeps δ in K directions per head, so its
dimension is reported as the bound min(that span, K × heads), marked `bound`. Singular values are computed in float64
on the host; rank uses numpy's default tolerance (largest singular value × size × eps).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from lcc_jax.restore.probe import layer_head
from lcc_jax.study.members import MemberSpec

log = logging.getLogger("benchmarks")


def o_proj_kernels(model) -> np.ndarray:
    """(layers, heads·head_dim, hidden) float64: each layer's o_proj kernel, rows grouped by head."""
    return np.asarray(model.layers.attn.o_proj.kernel[...], dtype=np.float64)


def layer_spectra(kernels: np.ndarray) -> list[dict]:
    """Per layer: rank, smallest and largest singular value of the whole o_proj kernel."""
    out = []
    for kernel in kernels:
        s = np.linalg.svd(kernel, compute_uv=False)
        tol = s.max() * max(kernel.shape) * np.finfo(np.float64).eps
        out.append({"rank": int((s > tol).sum()), "sigma_max": float(s.max()), "sigma_min": float(s.min())})
    return out


def reachable_dimension(kernels: np.ndarray, heads: np.ndarray, num_heads: int, head_dim: int) -> dict:
    """Dimension of the per-layer bias shifts that the head set `heads` (flat l·H + h) can produce."""
    layers, within = layer_head(np.asarray(heads), num_heads)
    dims = []
    for layer, kernel in enumerate(kernels):
        rows = (within[layers == layer][:, None] * head_dim + np.arange(head_dim)).ravel()
        dims.append(int(np.linalg.matrix_rank(kernel[rows])) if rows.size else 0)
    return {"heads": int(len(layers)), "dimension": sum(dims), "layers_touched": int(np.unique(layers).size),
            "per_layer": dims}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a built-in name, a HF folder or anything lcc_jax.load accepts")
    parser.add_argument("--prune", default=None, help="method:sparsity to prune first, e.g. wanda:0.5 or sparsegpt:2:4")
    parser.add_argument("--nsamples", type=int, default=16, help="calibration samples for --prune")
    parser.add_argument("--seqlen", type=int, default=512, help="calibration tokens per sample for --prune")
    parser.add_argument("--members", type=Path, default=None,
                        help="a folder of ablate.py member results (one seed), e.g. <out>/wanda-0.5/ablation/seed0")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)

    import lcc_jax

    model, tokenizer, config = lcc_jax.load(args.model)
    result = {"model": args.model, "layers": config.num_layers, "heads": config.num_heads,
              "head_dim": config.head_dim, "hidden": config.hidden_size}
    variants = {"dense": o_proj_kernels(model)}
    if args.prune:
        method, _, sparsity = args.prune.partition(":")
        calibration = lcc_jax.CalibrationConfig(nsamples=args.nsamples, seqlen=args.seqlen)
        lcc_jax.prune(model, tokenizer, method=method, sparsity=sparsity, calibration=calibration)
        variants["pruned"] = o_proj_kernels(model)
        result["prune"] = {"setting": args.prune, "nsamples": args.nsamples, "seqlen": args.seqlen}
    for name, kernels in variants.items():
        spectra = layer_spectra(kernels)
        entry = {
            "zeros": float((kernels == 0).mean()),
            "rank_sum": sum(s["rank"] for s in spectra),
            "full_dimension": config.num_layers * config.hidden_size,
            "worst_condition": max(s["sigma_max"] / s["sigma_min"] if s["sigma_min"] > 0 else float("inf")
                                   for s in spectra),
            "ranks": [s["rank"] for s in spectra],
            "layers": spectra,
        }
        if args.members:
            entry["members"] = {}
            for path in sorted(args.members.glob("*.json")):
                member = json.loads(path.read_text())
                if "heads" not in member:
                    continue
                reach = reachable_dimension(kernels, member["heads"], config.num_heads, config.head_dim)
                span = MemberSpec.parse(member["member"]).span
                if span is not None:  # δ only in each head's top-K lost directions: at most K per head
                    reach["dimension"] = min(reach["dimension"], span * reach["heads"])
                    reach["per_layer"] = None
                    reach["bound"] = True
                entry["members"][member["member"]] = {
                    **reach, "trainable": member.get("trainable_params"), "valid_loss": member.get("valid_loss"),
                    "ppl": member.get("ppl")}
        log.info("%s: %d of %d dimensions (ranks %s); members (dimension, layers, valid loss): %s", name,
                 entry["rank_sum"], entry["full_dimension"], entry["ranks"],
                 {k: (v["dimension"], v["layers_touched"], v["valid_loss"]) for k, v in entry.get("members", {}).items()})
        result[name] = entry
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
