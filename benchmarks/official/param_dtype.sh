#!/usr/bin/env bash
# Does the reference's bf16 training of β and b explain its higher Alpaca validation loss? lcc_jax RestoreLCC on
# one GPU from the pruned model of the 3-seed comparison (PRUNED_MASKS), at the paper's settings and the shipped
# probing pairs, with --param-dtype bfloat16 (seeds in BF16_SEEDS) and float32 (seeds in FP32_SEEDS, the control
# on this machine); the first run does every stage, the others reuse its seed-independent stages.
# Writes $OUT/param_dtype.json (per run: dtype, seed, WikiText-2 ppl, final validation loss, heads) and the logs.
# Run from the repository root:  PRUNED_MASKS=masks.npz bash benchmarks/official/param_dtype.sh
set -u
WORK=${WORK:-/tmp/param_dtype}
OUT=${OUT:-$WORK/out}
MODEL=${MODEL:-smollm2-135m}
BF16_SEEDS=${BF16_SEEDS:-"0 1 2"}
FP32_SEEDS=${FP32_SEEDS:-"0"}
: "${PRUNED_MASKS:?set PRUNED_MASKS to a masks.npz from python -m benchmarks.official.masks pack}"
mkdir -p "$WORK" "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
source benchmarks/official/job_stages.sh
say() { echo "[param_dtype $SECONDS s] $*" | tee -a "$WORK/status.txt"; }

[ -f "$WORK/dense_hf/config.json" ] || python3 scripts/convert.py "$MODEL" "$WORK/dense_hf" --overwrite > "$WORK/convert.log" 2>&1
[ -d "$WORK/pruned_ckpt" ] || python3 -m benchmarks.official.masks apply "$WORK/dense_hf" "$PRUNED_MASKS" \
    --out "$WORK/pruned_ckpt" > "$WORK/apply.log" 2>&1 || { say "applying the masks failed (apply.log)"; exit 1; }
ARGS=(--pruned "$WORK/pruned_ckpt" --negatives auto --top-k 0.25 --learning-rate 0.001 --epochs 3 --batch-size 8
      --num-train 2000 --num-probe 1000 --components 10 --no-plots --no-export-hf)
first=""
for run in $(for s in $BF16_SEEDS; do echo "bfloat16:$s"; done; for s in $FP32_SEEDS; do echo "float32:$s"; done); do
  dtype=${run%%:*}; seed=${run#*:}; folder=$WORK/${dtype}_seed$seed
  if [ ! -f "$folder/summary.json" ]; then
    if [ -z "$first" ]; then
      mkdir -p "$folder"
      [ -f "$folder/pairs.jsonl" ] || gunzip -c benchmarks/official/pairs/lcc_pairs.jsonl.gz > "$folder/pairs.jsonl"
    else
      seed_independent_stages "$first" "$folder"
    fi
    say "lcc_jax --param-dtype $dtype --seed $seed -> $folder"
    python3 scripts/restore.py "$WORK/dense_hf" --out "$folder" --seed "$seed" --probe-seed "$seed" \
        --param-dtype "$dtype" "${ARGS[@]}" ${LCC_EXTRA:-} > "$WORK/${dtype}_seed$seed.log" 2>&1 || say "failed (${dtype}_seed$seed.log)"
  fi
  [ -z "$first" ] && [ -f "$folder/components.npz" ] && first=$folder
done
python3 - "$WORK" "$OUT/param_dtype.json" <<'EOF'
import json, sys
from pathlib import Path
work, rows = Path(sys.argv[1]), []
for folder in sorted(work.glob("*_seed*")):
    if not (folder / "summary.json").exists():
        continue
    summary = json.loads((folder / "summary.json").read_text())
    history = json.loads((folder / "train_history.json").read_text())
    dtype, seed = folder.name.split("_seed")
    rows.append({"param_dtype": dtype, "seed": int(seed), "ppl_pruned": summary.get("ppl_pruned"),
                 "ppl_restored": summary.get("ppl_restored"), "valid_loss": history["valid_loss"][-1],
                 "heads": summary.get("selected_heads")})
Path(sys.argv[2]).write_text(json.dumps(rows, indent=1) + "\n")
for r in rows:
    print(r["param_dtype"], r["seed"], r["ppl_pruned"], r["ppl_restored"], r["valid_loss"])
EOF
cp "$WORK"/*.log "$WORK/status.txt" "$OUT/" 2>/dev/null
