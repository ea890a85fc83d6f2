#!/usr/bin/env bash
# Device side, one call per invocation: issue 16's speed targets on one GPU, in resumable phases (benchmarks/gpu/
# phases.sh) while the machine stays warm. Needs bundle2 (`MINILM=0 bash benchmarks/gpu/make_bundle.sh`: SmolLM2,
# gguf, the data; 3 pieces): carry one piece per call with `bash benchmarks/gpu/speed_targets.sh 0`, then
# `bash benchmarks/gpu/speed_targets.sh 565` until every phase is done. Each target gets its own compile cache
# folder (JAX_COMPILATION_CACHE_DIR), so "cold cache" and "warm cache" mean exactly that:
#   zs_cold, zs_warm   the SmolLM2 7-task suite, every document, one fresh process each: first with an empty cache,
#                      then reading what the first wrote (`scripts/evaluate.py --tasks suite`; wall and peak RSS
#                      in times.txt where /usr/bin/time exists, the phase's seconds in speed.log always)
#   zs_warm_tf         zs_warm again with the bundle's newer transformers first on the path (make_bundle.sh
#                      TRANSFORMERS=5.18.0): the image's 5.17 imports PyTorch with a process's first tokenizer load
#   zs_cold_noat, zs_warm_noat   zs_cold and zs_warm with XLA's GPU autotuning off (XLA_FLAGS
#                      --xla_gpu_autotune_level=0, a cache folder of their own): what autotuning adds to the cold
#                      compile, and what it buys in scoring
#   job7b_cold, job7b_warm   the Llama-2-7B-shape whole job (`benchmarks.run --stages job`), likewise; each record
#                      has per-phase compile seconds and cache hits
#   recovery           the SmolLM2 recovery table, 3 settings x 6 methods x 3 seeds, full zero-shot sets
#                      (`scripts/benchmark_recovery.py`; spans calls, resumed; eta.json has the measured seconds)
# Everything it writes comes back in $OUT/speed.tgz ($OUT/<name>.tgz with SPEED_DIR=/tmp/<name>, which keeps a second
# variant, e.g. ZS_EXTRA="--dtype bf16", apart from the first in the same lease).
# Usage: bash benchmarks/gpu/speed_targets.sh [BUDGET_S]   (PHASES="zs_cold zs_warm ..." picks phases)
set -u
source benchmarks/gpu/lease.sh ${BUNDLE:-.gpu_ship/bundle2} ${1:-0}
work=${SPEED_DIR:-/tmp/speed}; mkdir -p $work
PHASE_DIR=$work PHASE_LOG=$work/speed.log
source benchmarks/gpu/phases.sh
model=${SPEED_MODEL:-smollm2-135m}
time_cmd=(); [ -x /usr/bin/time ] && time_cmd=(/usr/bin/time -f "%e s wall, %M KB peak RSS" -a -o $work/times.txt)
zs=(env JAX_COMPILATION_CACHE_DIR=$work/jc_zs "${time_cmd[@]}" python3 scripts/evaluate.py "$model" --tasks suite
    --batch-size 64 ${ZS_EXTRA:-})
job7b=(env JAX_COMPILATION_CACHE_DIR=$work/jc_7b python3 -m benchmarks.run --shapes ${JOB_SHAPE:-llama2-7b} --stages job
       ${JOB_EXTRA:-})
recovery=(python3 scripts/benchmark_recovery.py "$model" --out $work/recovery --settings wanda:0.5,sparsegpt:2:4,flap:0.2
          --methods lora,dora,masked_lora,lofit,bias_only,restorelcc --seeds 0,1,2 --tasks suite --zeroshot-batch-size 64
          ${REC_EXTRA:-})
# the built-in's one-time conversion is not part of any target
phase convert python3 -c "import lcc_jax; lcc_jax.load('$model')" || true
for p in ${PHASES:-zs_cold zs_warm job7b_cold job7b_warm recovery}; do
  case $p in
    zs_cold|zs_warm) phase $p "${zs[@]}" --json $work/$p.json || break ;;
    zs_cold_noat|zs_warm_noat) phase $p env XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0" \
        JAX_COMPILATION_CACHE_DIR=$work/jc_zs_noat "${zs[@]:2}" --json $work/$p.json || break ;;
    zs_warm_tf) [ -d /tmp/site_tf ] || { echo "zs_warm_tf: no transformers wheel in the bundle"; break; }
      phase $p env PYTHONPATH=/tmp/site_tf:$PYTHONPATH "${zs[@]}" --json $work/$p.json || break ;;
    job7b_cold|job7b_warm) phase $p "${job7b[@]}" --out $work/$p.json || break ;;
    recovery) phase recovery "${recovery[@]}" || break ;;
  esac
done
cat $work/times.txt 2>/dev/null
tail -4 $work/speed.log
tar -C "$(dirname $work)" -czf "$OUT/$(basename $work).tgz" --exclude='jc_*' --exclude='pruned' --exclude='*_capture*' --exclude='restored*' \
  --exclude='train_checkpoints' --exclude='*.npz' --exclude='*.npy' --exclude='*.safetensors' "$(basename $work)"
ls -la "$OUT"
