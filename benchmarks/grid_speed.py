"""Grid training speed: R restorations side by side (`restore.grid.fit_grid`) against one, on real Alpaca data.

    python -m benchmarks.grid_speed --shape smollm2-135m --members 1,8 --epochs 1 --out grid_speed.json

Each grid size runs twice in one process: cold (compiling) and warm (the executables cached), both timed
end to end (data packing, steps, validation). Members differ in heads, mode and learning rate; the
weights are random in the named shape (the step's cost does not depend on their values).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time

import jax
import numpy as np

from benchmarks.common import device_name, get_shape, memory, random_model, versions
from lcc_jax.data.instructions import load_instructions
from lcc_jax.restore.compensation import init_compensation
from lcc_jax.restore.grid import GridMember, fit_grid
from lcc_jax.train import TrainConfig, epoch_batches

log = logging.getLogger("benchmarks")


def _members(config, count: int) -> list[GridMember]:
    total, d = config.total_heads, config.head_dim
    basis = np.swapaxes(np.linalg.qr(np.random.default_rng(0).normal(size=(total, d, d)))[0], 1, 2).astype(np.float32)
    modes = ("full", "bias_only", "no_bias")
    out = []
    for i in range(count):
        ranking = np.random.default_rng(i).permutation(total)
        comp = init_compensation(basis, ranking, 0.25, jax.random.key(i), mode=modes[i % 3])
        out.append(GridMember(f"m{i}", comp, (1e-3, 5e-3, 1e-2)[i % 3], seed=42 + i % 3))
    return out


def run(shape_name: str, sizes: list[int], epochs: int, num_train: int) -> list[dict]:
    import jax.numpy as jnp

    shape = get_shape(shape_name)
    model = random_model(shape, dtype=jnp.bfloat16)
    samples = load_instructions("alpaca", "train", limit=num_train)
    rng = np.random.default_rng(0)
    # token ids with the real samples' prompt/response lengths (about 4 characters a token)
    lengths = [(max(1, len(s.prompt) // 4), max(1, len(s.response) // 4)) for s in samples]
    seqs, masks = [], []
    for p, r in lengths:
        p, r = min(p, 400), min(r, 500 - min(p, 400))
        seqs.append(rng.integers(3, shape.vocab_size, p + r).tolist())
        masks.append([0.0] * p + [1.0] * r)
    config = TrainConfig(epochs=epochs, batch_size=8, eval_every_epoch=False, log_every=50)
    records = []
    for size in sizes:
        members = _members(model.config, size)
        batches_for = lambda seed: epoch_batches(seqs, masks, dataclasses.replace(config, seed=seed), pad_id=0)  # noqa: E731
        times = []
        for attempt in ("cold", "warm"):
            started = time.perf_counter()
            results = fit_grid(model, members, batches_for, config)
            times.append(time.perf_counter() - started)
            log.info("%d member(s), %s: %.1f s", size, attempt, times[-1])
        steps = results[0].steps
        records.append({"shape": shape_name, "members": size, "epochs": epochs, "samples": len(seqs), "steps": steps,
                        "cold_s": times[0], "warm_s": times[1], "warm_s_per_step": times[1] / steps,
                        "memory": memory()})
    base = records[0]["warm_s"]
    for r in records:
        r["warm_ratio_to_first"] = r["warm_s"] / base
        r["cold_ratio_to_first"] = r["cold_s"] / records[0]["cold_s"]
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="smollm2-135m")
    parser.add_argument("--members", default="1,8")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    records = run(args.shape, [int(x) for x in args.members.split(",")], args.epochs, args.num_train)
    report = {"device": device_name(), "versions": versions(), "records": records}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
