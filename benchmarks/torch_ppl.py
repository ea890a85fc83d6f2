#!/usr/bin/env python
"""Reference WikiText-2 perplexity in PyTorch transformers (Wanda's eval_ppl_wikitext), for parity with lcc_jax.

  python benchmarks/torch_ppl.py HF_FOLDER [--seqlen 2048] [--limit-chunks N] [--json OUT]

Same text as lcc_jax (lcc_jax.data.text.load_text("wikitext2")), tokenized once by the model's own
tokenizer, non-overlapping seqlen chunks, ppl = exp(sum_i loss_i * seqlen / (n * seqlen)).
"""

import argparse
import json
import time

import torch
import transformers

from lcc_jax.data.text import load_text


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--limit-chunks", type=int, default=None)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(args.model)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    ids = tokenizer(load_text("wikitext2"), return_tensors="pt").input_ids
    chunks = ids.shape[1] // args.seqlen
    if args.limit_chunks:
        chunks = min(chunks, args.limit_chunks)
    start = time.perf_counter()
    nlls = []
    with torch.no_grad():
        for i in range(chunks):
            batch = ids[:, i * args.seqlen : (i + 1) * args.seqlen].to(device)
            logits = model(batch).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], batch[0, 1:])
            nlls.append(loss.float() * args.seqlen)
    ppl = torch.exp(torch.stack(nlls).sum() / (chunks * args.seqlen)).item()
    result = {"ppl": ppl, "chunks": chunks, "seqlen": args.seqlen, "seconds": time.perf_counter() - start,
              "dtype": args.dtype, "device": device, "torch": torch.__version__, "transformers": transformers.__version__}
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
