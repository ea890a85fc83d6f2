#!/usr/bin/env bash
# Device side, one call per invocation: masked LoRA's learning rate chosen on the Alpaca validation loss, on SmolLM2
# at Wanda 50 % (masked LoRA won most perplexity comparisons at an untuned 1e-4, while RestoreLCC's recipe was chosen
# on this loss). Needs bundle2 (carry its pieces with `bash benchmarks/gpu/speed_targets.sh 0`). Phases, resumed from
# $RATE_DIR (default /tmp/rate) while the machine stays warm:
#   prune      one Wanda 50 % prune (`--prune-only`), which every folder below hard-links (`--base`)
#   seed0      masked LoRA at each rate of $RATES on seed 0, one --out folder per rate
#   seeds12    the same on seeds 1 and 2; or, with SEED_STEPS="0 chosen", seeds 1 and 2 at the rate the validation
#              loss chose on seed 0 only (choice_seed0.json): 2 cells instead of 2 per rate. The final choice is then
#              made on seed 0, the seed every folder ran (by_validation chooses on the shared seeds).
#   rivals     RestoreLCC's recipe, LoFiT (budget-matched) and bias-only on seeds 0-2 from the same prune
#   choose     `python -m lcc_jax.benchmark.by_validation` over the rate folders, the chosen one set against the
#              rivals with paired intervals: choice.json
# Every cell records its validation loss (valid_loss), so the rivals' and the chosen rate's can be compared too.
# Usage: bash benchmarks/gpu/lora_rate.sh [BUDGET_S]   (RATES="1e-4 3e-4 1e-3", SETTING=wanda:0.5, REC_EXTRA=...;
# SEED_STEPS="0 0,1,2" ("0 chosen": seeds 1-2 at seed 0's choice only), RIVALS=restorelcc_recipe,lofit,bias_only
# and RIVAL_SEEDS=0,1,2 make a smaller run)
set -u
source benchmarks/gpu/lease.sh ${BUNDLE:-.gpu_ship/bundle2} ${1:-0}
work=${RATE_DIR:-/tmp/rate}; mkdir -p $work
PHASE_DIR=$work PHASE_LOG=$work/rate.log
source benchmarks/gpu/phases.sh
setting=${SETTING:-wanda:0.5}
rec=(python3 scripts/benchmark_recovery.py ${RATE_MODEL:-smollm2-135m} --settings "$setting" --tasks suite
     --zeroshot-batch-size 64 ${REC_EXTRA:-})
rates=(${RATES:-1e-4 3e-4 1e-3})
ok=1
phase prune "${rec[@]}" --out $work/base --prune-only || ok=0
folders=$(printf "$work/lr_%s " "${rates[@]}")
for seeds in ${SEED_STEPS:-0 0,1,2}; do  # every rate on seed 0 first, then seeds 1 and 2
  if [ "$seeds" = chosen ]; then  # seeds 1 and 2 at seed 0's choice only
    [ $ok = 1 ] && { phase choose_seed0 python3 -m lcc_jax.benchmark.by_validation --method masked_lora $folders \
      --out $work/choice_seed0.json || ok=0; }
    [ $ok = 1 ] && { lr=$(python3 -c "import json; print(json.load(open('$work/choice_seed0.json'))[0]['chosen'])")
      lr=${lr##*/lr_}  # the chosen folder is $work/lr_<rate>
      phase "lr_${lr}_seeds_1,2" "${rec[@]}" --out $work/lr_$lr --base $work/base --methods masked_lora \
        --lora-learning-rate $lr --seeds 1,2 || ok=0; }
    continue
  fi
  for lr in "${rates[@]}"; do
    [ $ok = 1 ] && { phase "lr_${lr}_seeds_${seeds}" "${rec[@]}" --out $work/lr_$lr --base $work/base --methods masked_lora \
      --lora-learning-rate $lr --seeds $seeds || ok=0; }
  done
done
[ $ok = 1 ] && { phase rivals "${rec[@]}" --out $work/rivals --base $work/base \
  --methods ${RIVALS:-restorelcc_recipe,lofit,bias_only} --seeds ${RIVAL_SEEDS:-0,1,2} || ok=0; }
[ $ok = 1 ] && phase choose python3 -m lcc_jax.benchmark.by_validation --method masked_lora \
  $folders --rivals $work/rivals --out $work/choice.json
tail -12 $work/rate.log
tar -C "$(dirname $work)" -czf "$OUT/$(basename $work).tgz" --exclude='pruned' --exclude='*_capture*' --exclude='restored*' \
  --exclude='train_checkpoints' --exclude='*.npz' --exclude='*.npy' --exclude='*.safetensors' "$(basename $work)"
ls -la "$OUT"
