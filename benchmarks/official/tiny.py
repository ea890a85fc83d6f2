"""A tiny random Llama (Hugging Face folder, written by transformers' save_pretrained) and a handful of Alpaca
samples, for running the official harness end to end on a CPU in seconds.

    python -m benchmarks.official.tiny OUT_DIR [--samples 24] [--valid 8]

writes OUT_DIR/dense_hf (2 layers, 4 heads, 2 KV heads, hidden 64, head_dim 16, tied embeddings, RoPE theta
100000 like SmolLM2, a 384-token byte-level BPE tokenizer trained on Alpaca text), and OUT_DIR/train.jsonl,
OUT_DIR/valid.jsonl: the shortest Alpaca samples, so that no text reaches the model's position limit.
Layers != heads on purpose: the reference's head index is only right when they are equal.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TINY = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, rope_theta=100000.0,
            tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)


def shortest_samples(path: Path, count: int, skip: int = 0) -> list[dict]:
    """The `count` shortest records of a prompt/response .jsonl after the `skip` shortest, in file order."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    order = sorted(range(len(rows)), key=lambda i: (len(rows[i]["prompt"]) + len(rows[i]["response"]), i))
    keep = sorted(order[skip : skip + count])
    return [rows[i] for i in keep]


def make_tokenizer(texts: list[str]):
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY["vocab_size"], special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                                pad_token="<|endoftext|>")


def make_tiny(out: Path, data: Path, samples: int = 24, valid: int = 8, seed: int = 0) -> dict[str, Path]:
    """Write the tiny model and data under `out`; returns their paths."""
    import torch
    import transformers

    out.mkdir(parents=True, exist_ok=True)
    train_rows = shortest_samples(data / "train.jsonl", samples)
    valid_rows = shortest_samples(data / "valid.jsonl", valid)
    for name, rows in (("train.jsonl", train_rows), ("valid.jsonl", valid_rows)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    corpus = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()[:400]]
    tokenizer = make_tokenizer([r["prompt"] + r["response"] for r in corpus])
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**TINY)
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():  # weights far from their init, so pruning and compensation have something to do
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    folder = out / "dense_hf"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {"dense_hf": folder, "train": out / "train.jsonl", "valid": out / "valid.jsonl"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[3] / "shared/data/alpaca_2000",
                        help="folder with train.jsonl and valid.jsonl (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=24)
    parser.add_argument("--valid", type=int, default=8)
    args = parser.parse_args(argv)
    for name, path in make_tiny(args.out, args.data, args.samples, args.valid).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
