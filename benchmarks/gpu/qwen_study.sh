#!/usr/bin/env bash
# Device side, one call: keep the carried pieces of Qwen2.5-Coder-1.5B-Instruct's GGUF (.gpu_ship/qwen, made with
# `python -m benchmarks.ship split`) in /tmp/qwen_ship; once all are there, join and check them into the cache
# lcc_jax's built-in reads; then, given a budget in seconds, the Qwen ablation (resumed from /tmp/qwen_abl while
# the machine stays warm), results into $OUT. Needs benchmarks/gpu/unpack.sh's bundle (data, MiniLM, gguf).
# Usage: bash benchmarks/gpu/qwen_study.sh [BUDGET_S]   (0: only keep the pieces; SETTINGS, MEMBERS, SEEDS override)
set -u
source benchmarks/gpu/unpack.sh .gpu_ship/bundle1 5
mkdir -p /tmp/qwen_ship
cp -n .gpu_ship/qwen/* /tmp/qwen_ship/ 2>/dev/null
target=$LCC_CACHE_DIR/downloads/Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf
if [ ! -f "$target" ] && [ -f /tmp/qwen_ship/manifest.json ]; then
  want=$(python3 -c "import json; print(len(json.load(open('/tmp/qwen_ship/manifest.json'))['pieces']))")
  have=$(ls /tmp/qwen_ship/*.gguf.[0-9]* 2>/dev/null | wc -l)
  echo "qwen pieces here: $have of $want"
  [ "$have" -ge "$want" ] && python3 -m benchmarks.ship join /tmp/qwen_ship --out "$target" && rm -f /tmp/qwen_ship/*.gguf.[0-9]*
fi
budget=${1:-0}
[ "$budget" -gt 0 ] || exit 0
[ -f "$target" ] && [ "$BUNDLE_READY" = 1 ] || { echo "not ready: the Qwen GGUF or the bundle is missing"; exit 0; }
start=$(date +%s)
PAPER=probe:full:0.25:1e-3; RECIPE=probe:full:1.0:5e-3; LOFIT=lofit:bias:0.25:1e-2; BIAS=probe:bias:0.25:1e-3
timeout -s INT $(( budget - 25 )) python3 scripts/ablate.py qwen2.5-coder-1.5b --out /tmp/qwen_abl \
  --settings "${SETTINGS:-wanda:0.5}" --members "${MEMBERS:-$RECIPE,$PAPER,$LOFIT,$BIAS}" \
  --screen-seeds "${SEEDS:-0}" --final-seeds "${SEEDS:-0}" --finalists 1 --tasks suite --limit 500 \
  --zeroshot-batch-size 64 >> /tmp/qwen_ablate.log 2>&1
echo "ablate exit $? after $(( $(date +%s) - start )) s"; tail -8 /tmp/qwen_ablate.log
tar -C /tmp -czf "$OUT/qwen_abl.tgz" --exclude='pruned' --exclude='dense_capture' --exclude='pruned_capture.npy' \
  --exclude='train_checkpoints' --exclude='restored*' --exclude='*.npz' qwen_abl qwen_ablate.log
ls -la "$OUT"
