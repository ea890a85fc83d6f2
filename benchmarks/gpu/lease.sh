#!/usr/bin/env bash
# Device side, sourced first by the scripts that run in phases: keep the carried piece of the bundle (unpack.sh);
# then stop there when the call only carries a piece (budget 0) or the bundle is not complete yet, else set
# `deadline` (epoch seconds: the budget less a margin for packing the results) for phases.sh.
# Usage: source benchmarks/gpu/lease.sh BUNDLE_DIR BUDGET_S [MARGIN_S]   (PIECES overrides the piece count)
source benchmarks/gpu/unpack.sh "$1" ${PIECES:-}
budget=${2:-0}
[ "$budget" -gt 0 ] || exit 0
[ "$BUNDLE_READY" = 1 ] || { echo "not ready: the bundle is incomplete"; exit 0; }
deadline=$(( $(date +%s) + budget - ${3:-30} ))
