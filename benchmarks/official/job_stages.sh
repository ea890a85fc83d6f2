# Sourced by gpu_call.sh and param_dtype.sh: what a second lcc_jax run may take over from a first one's job folder.
# seed_independent_stages FROM TO [probes.npz]: TO becomes a job folder holding FROM's pairs, captures, lost
# components and dense/pruned evaluations (none depends on --seed; the probes do only through --probe-seed, so
# they are copied only when asked), written atomically; nothing happens when TO exists.
seed_independent_stages() {
  local from=$1 to=$2; shift 2
  [ -d "$to" ] && return 0
  rm -rf "$to.tmp" && mkdir -p "$to.tmp" && (cd "$from" && cp -r pairs.jsonl dense_capture pruned_capture.npy \
      components.npz eval_dense.json eval_pruned.json "$@" "$to.tmp/") && mv "$to.tmp" "$to"
}
