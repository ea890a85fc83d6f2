#!/usr/bin/env bash
# Device side, one call per invocation: the phases of a lanes file, one lane per GPU, every lane at once, each phase
# resumable (benchmarks/gpu/phases.sh) while the machine stays warm. On a multi-GPU kind (nvidia-h100-x4, -x8) the
# budget counts the time the machine is held, so N GPUs do N times the work per device second.
#
# Lanes file (LANES=path): one phase per line, `LANE NAME [after=PHASE[,PHASE...]] -- COMMAND`; the lines of one lane
# run in order, the lanes at once; `after=` waits until those phases (of any lane) are done, and gives up when one of
# them failed or the deadline comes. LANE is a GPU number, or `GPU.N` for one of several lanes sharing that GPU
# (a small model leaves a GPU idle while its process does host work: compiling, batching, writing; other processes
# fill those gaps). COMMAND is one command (it gets SIGINT at the deadline, and lcc_jax's scripts then stop cleanly
# and resume on the next call), run by bash with CUDA_VISIBLE_DEVICES=GPU and $WORK (the results folder) set; where
# lanes share a GPU, each process may take XLA_PYTHON_CLIENT_MEM_FRACTION = 0.9 / (lanes on it) of its memory (set
# SHARED_MEM_FRACTION to change that). `export NAME=value` lines set variables for every command; '#' lines are
# comments.
# Everything under $WORK except checkpoints and weights comes back in $OUT/lanes.tgz.
# Usage: LANES=benchmarks/gpu/lanes/NAME.txt [BUNDLE=.gpu_ship/bundleN] bash benchmarks/gpu/lanes.sh [BUDGET_S]
#        (0 or no budget: only keep the carried piece of the bundle)
set -u
lanes_file=${LANES:?set LANES to a lanes file (benchmarks/gpu/lanes/)}
source benchmarks/gpu/lease.sh ${BUNDLE:-.gpu_ship/bundle3} ${1:-0} 45
export WORK=${WORK:-/tmp/lanes}; mkdir -p "$WORK"
PHASE_DIR=$WORK
source benchmarks/gpu/phases.sh
while IFS= read -r line; do
  case $line in export\ *) eval "$line" ;; esac
done < "$lanes_file"

phase_lines() { grep -v -e '^[[:space:]]*#' -e '^[[:space:]]*export ' -e '^[[:space:]]*$' "$lanes_file"; }

wait_for() {  # wait_for PHASE,PHASE...: 0 once every one is done, 1 if one failed or the deadline came
  local p
  for p in ${1//,/ }; do
    until [ -f "$WORK/.done_$p" ]; do
      [ -f "$WORK/.failed_$p" ] && { echo "waiting for $p: it failed" >> "$PHASE_LOG"; return 1; }
      [ "$(date +%s)" -lt "$deadline" ] || { echo "waiting for $p: out of time" >> "$PHASE_LOG"; return 1; }
      sleep 5
    done
  done
}

lane() {  # lane LANE (run in its own subshell): its phases in order, stopping at the first that fails or is cut
  local id=$1 gpu=${1%%.*} line head cmd l name after sharing
  PHASE_LOG=$WORK/lane$id.log
  export CUDA_VISIBLE_DEVICES=$gpu
  sharing=$(phase_lines | awk '{print $1}' | sort -u | grep -c -E "^$gpu([.]|\$)")
  if [ "$sharing" -gt 1 ]; then
    export XLA_PYTHON_CLIENT_MEM_FRACTION=${SHARED_MEM_FRACTION:-$(python3 -c "print(round(0.9 / $sharing, 3))")}
    echo "lane $id: GPU $gpu shared by $sharing lanes, memory fraction $XLA_PYTHON_CLIENT_MEM_FRACTION" >> "$PHASE_LOG"
  fi
  while IFS= read -r line; do
    head=${line%% -- *}; cmd=${line#* -- }
    read -r l name after <<< "$head"
    [ "$l" = "$id" ] || continue
    [ -f "$WORK/.done_$name" ] && continue
    if [ -n "${after:-}" ]; then wait_for "${after#after=}" || return; fi
    rm -f "$WORK/.failed_$name"
    phase "$name" bash -c "exec $cmd" || { touch "$WORK/.failed_$name"; return; }
  done < <(phase_lines)
}

for id in $(phase_lines | awk '{print $1}' | sort -u); do lane "$id" & done
wait
for log in "$WORK"/lane*.log; do echo "== $log"; grep '^phase ' "$log" | tail -4; done
nvidia-smi --query-gpu=index,name,memory.used --format=csv,noheader 2>/dev/null
tar -C "$(dirname "$WORK")" -czf "$OUT/lanes.tgz" --exclude='pruned' --exclude='*_capture*' --exclude='train_checkpoints' \
  --exclude='restored*' --exclude='*.safetensors' --exclude='*.npz' --exclude='*.npy' --exclude='jax_compile' \
  "$(basename "$WORK")"
ls -la "$OUT"
