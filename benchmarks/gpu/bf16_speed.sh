#!/usr/bin/env bash
# Device side, one call: issue 16's suite target in bf16 beside fp32 on the same warm machine, then the SmolLM2
# recovery table in bf16 for what is left of the call (cells resume from /tmp/bf16 on the next call while warm).
# Needs bundle2 (3 pieces; carry one per call with `bash benchmarks/gpu/speed_targets.sh 0`). Results come back in
# $OUT/bf16.tgz (bf16 suite, bf16 recovery cells) and $OUT/speed.tgz (fp32 suite).
# Usage: bash benchmarks/gpu/bf16_speed.sh [BUDGET_S]   (default 570; each part gets its share of it)
set -u
budget=${1:-570}
zs_share=$(( budget * 3 / 10 ))
SPEED_DIR=/tmp/bf16 ZS_EXTRA="--dtype bf16" PHASES="zs_cold zs_warm" bash benchmarks/gpu/speed_targets.sh $zs_share
PHASES="zs_cold zs_warm" bash benchmarks/gpu/speed_targets.sh $zs_share
SPEED_DIR=/tmp/bf16 REC_EXTRA="--dtype bf16" PHASES=recovery bash benchmarks/gpu/speed_targets.sh $(( budget - 2 * zs_share ))
