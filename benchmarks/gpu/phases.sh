#!/usr/bin/env bash
# Device side, sourced: resumable phases under one call's budget. Set PHASE_DIR (done markers) and PHASE_LOG, and
# `deadline` (epoch seconds) before calling `phase NAME COMMAND...`: a phase already done is skipped, one with a
# minute or less left is not started (returns 1), and a running one gets SIGINT at the deadline (lcc_jax's scripts
# then stop cleanly and resume from their files on the next call) and SIGKILL 20 s later: on 2026-12-07 a recovery
# benchmark ran on past its SIGINT until the call's own limit killed the call before its results were packed.
phase() {
  local name=$1; shift; local left=$(( deadline - $(date +%s) ))
  [ -f "$PHASE_DIR/.done_$name" ] && return 0
  [ "$left" -gt 60 ] || { echo "phase $name: not started, ${left} s left" | tee -a "$PHASE_LOG"; return 1; }
  echo "phase $name: start with ${left} s left" | tee -a "$PHASE_LOG"
  local t0=$(date +%s)
  timeout -s INT -k 20 "$left" "$@" >> "$PHASE_LOG" 2>&1; local rc=$?
  echo "phase $name: exit $rc after $(( $(date +%s) - t0 )) s" | tee -a "$PHASE_LOG"
  [ $rc = 0 ] && touch "$PHASE_DIR/.done_$name"
  return $rc
}
