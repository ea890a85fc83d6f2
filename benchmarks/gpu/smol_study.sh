#!/usr/bin/env bash
# Device side, one call of at most ~9.5 minutes: the grid speed benchmark once, then the SmolLM2 ablation
# (resumed from /tmp/abl while the machine stays warm); results and logs into $OUT.
set -u
source benchmarks/gpu/unpack.sh .gpu_ship/bundle1 5
[ "$BUNDLE_READY" = 1 ] || exit 0
budget=${1:-540}; start=$(date +%s)
if [ ! -f /tmp/grid_speed.json ]; then
  python3 -m benchmarks.grid_speed --shape smollm2-135m --members 1,8 --epochs 1 --out /tmp/grid_speed.json \
    > /tmp/grid_speed.log 2>&1; tail -3 /tmp/grid_speed.log
fi
cp /tmp/grid_speed.json /tmp/grid_speed.log $OUT/ 2>/dev/null
left=$(( budget - ($(date +%s) - start) ))
timeout -s INT $left python3 scripts/ablate.py smollm2-135m --out /tmp/abl --settings ${SETTINGS:-wanda:0.5,sparsegpt:2:4} \
  --tasks suite --limit 500 --zeroshot-batch-size 64 >> /tmp/ablate.log 2>&1
echo "ablate exit $?"; tail -5 /tmp/ablate.log
tar -C /tmp -czf $OUT/abl.tgz --exclude='pruned' --exclude='dense_capture' --exclude='pruned_capture.npy' \
  --exclude='train_checkpoints' --exclude='restored*' abl ablate.log
ls -la $OUT
