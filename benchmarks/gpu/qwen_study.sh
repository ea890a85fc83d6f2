#!/usr/bin/env bash
# Device side, one call: keep the carried piece of bundle3 (`MODEL=qwen bash benchmarks/gpu/make_bundle.sh`:
# Qwen2.5-Coder-1.5B-Instruct's GGUF, MiniLM, gguf, the data; 26 pieces); once all are there, unpack.sh joins and
# checks them and puts the GGUF where the built-in qwen2.5-coder-1.5b reads it. Then, given a budget in seconds,
# the Qwen study in phases, each resumed from /tmp/qwen (or $STUDY_DIR) while the machine stays warm:
#   1. scripts/ablate.py: the screening members on seed 0, the finalists by Alpaca validation loss
#   2. scripts/benchmark_recovery.py on seed 0 for the methods the ablation does not train (LoRA, DoRA, masked
#      LoRA, LoFiT's reference setting), from the ablation's pruned checkpoint (hard links: one mask for both)
#   3. the ablation's finalists and references on seeds 0, 1, 2
#   4. the recovery methods on seeds 1, 2
# Results (no checkpoints) into $OUT/<study dir name>.tgz after every call.
# Usage: bash benchmarks/gpu/qwen_study.sh [BUDGET_S]   (0: only keep the piece; SETTING, MEMBERS, METHODS override;
# RECOVERY=0 runs phases 1 and 3 only; BUNDLE picks the bundle;
# STUDY_MODEL and EXTRA flags (e.g. --calibration piqa) run it on another model or data; ABL_EXTRA goes to ablate.py
# alone (e.g. --members-per-grid 2 on an 80 GB card: six Qwen members in one grid asked for a 59 GiB buffer);
# STUDY_DIR keeps such a run apart from another in the same lease; SEED_FROM starts from an earlier run's cells)
set -u
source benchmarks/gpu/lease.sh ${BUNDLE:-.gpu_ship/bundle3} ${1:-0}
setting=${SETTING:-wanda:0.5}; slug=$(python3 -c "from lcc_jax.benchmark.cells import setting_slug as s; print(s('$setting'))")
PAPER=probe:full:0.25:1e-3; RECIPE=probe:full:1.0:5e-3; LOFIT=lofit:bias:0.25:1e-2; BIAS=probe:bias:0.25:1e-3
members=${MEMBERS:-$PAPER,$BIAS,$LOFIT,random:full:0.25:1e-3,lofit:full:0.25:1e-3,probe:bias:0.25:1e-2,$RECIPE,probe:bias:1.0:1e-2,probe-layers:full:0.25:1e-3}
methods=${METHODS:-masked_lora,lofit_reference,lora,dora}
common=(${STUDY_MODEL:-qwen2.5-coder-1.5b} --dtype bf16 --tasks suite --limit 500 --zeroshot-batch-size 64 ${EXTRA:-})
study=${STUDY_DIR:-/tmp/qwen}; log=$study/study.log; mkdir -p $study
# SEED_FROM=<a results folder of an earlier run>: start from its finished cells (ablation/, recovery/) instead of
# redoing them; the prune is redone, and the ablation refuses (benchmark.recovery._check_same_prune) if it scores
# otherwise than the one those cells came from
if [ -n "${SEED_FROM:-}" ] && [ ! -e $study/abl ]; then
  cp -r "$SEED_FROM/ablation" $study/abl && { [ ! -d "$SEED_FROM/recovery" ] || cp -r "$SEED_FROM/recovery" $study/rec; }
  echo "seeded $study from $SEED_FROM"
fi

PHASE_DIR=$study PHASE_LOG=$log
source benchmarks/gpu/phases.sh
share_prune() {  # the recovery benchmark starts from the ablation's pruned checkpoint and pruned scores
  mkdir -p $study/rec/$slug
  [ -e $study/rec/$slug/pruned ] || cp -al $study/abl/$slug/pruned $study/rec/$slug/pruned
  [ -e $study/rec/$slug/pruned.json ] || cp $study/abl/$slug/pruned.json $study/rec/$slug/
}
abl=(python3 scripts/ablate.py "${common[@]}" --out $study/abl --settings "$setting" --members "$members"
     --screen-seeds 0 --finalists 2 ${ABL_EXTRA:-})
rec=(python3 scripts/benchmark_recovery.py "${common[@]}" --out $study/rec --settings "$setting" --methods "$methods")
if [ "${RECOVERY:-1}" = 1 ]; then
  phase ablate0 "${abl[@]}" --final-seeds 0 && share_prune && phase recovery0 "${rec[@]}" --seeds 0 \
    && phase ablate012 "${abl[@]}" --final-seeds 0,1,2 && phase recovery012 "${rec[@]}" --seeds 0,1,2
else  # RECOVERY=0: the ablation alone (new members against the references, within one run)
  phase ablate0 "${abl[@]}" --final-seeds 0 && phase ablate012 "${abl[@]}" --final-seeds 0,1,2
fi
tail -5 $log
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
tar -C "$(dirname $study)" -czf "$OUT/$(basename $study).tgz" --exclude='pruned' --exclude='*_capture*' --exclude='train_checkpoints' \
  --exclude='restored*' --exclude='*.safetensors' --exclude='*.npz' --exclude='*.npy' "$(basename $study)"
ls -la "$OUT"
