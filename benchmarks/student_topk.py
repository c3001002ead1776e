"""ReFT student step: a teacher forward in every step vs the teacher's top-k logits cached once.

  python benchmarks/student_topk.py [--vocab 32000] [--steps 10] [--k 32]

Prints one table and writes benchmarks/results/student_topk.json. Timings belong here, not in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--vocab", type=int, default=32000)
  ap.add_argument("--arch", default="world")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=96)
  ap.add_argument("--k", type=int, default=32)
  ap.add_argument("--steps", type=int, default=10)
  args = ap.parse_args()

  from reft_jax import sharding as shd
  from reft_jax.data import sft
  from reft_jax.defences import reft
  from reft_jax.model import PRESETS, init_model
  from reft_jax.optim import make_optimizer
  from reft_jax.train import batch_shardings, init_train_state, jit_step, make_train_step, split_model

  cfg = PRESETS[args.arch].replace(vocab_size=args.vocab)
  mesh = shd.make_mesh(1, -1, 1)
  rng = np.random.default_rng(0)
  n = args.batch * 4

  def data():
    tokens = rng.integers(4, args.vocab, size=(n, args.seq)).astype(np.int32)
    mask = np.ones_like(tokens)
    loss = np.zeros_like(tokens)
    loss[:, args.seq // 2 :] = 1
    return sft.TokenizedSet(tokens, loss, mask, 0, np.full((n,), args.seq // 2 - 1, np.int32))

  user, align = data(), data()
  teacher = init_model(cfg, seed=1)
  rows = {}
  for mode in ("teacher forward", f"cached top-{args.k}"):
    topk = mode.startswith("cached")
    a = align
    t0 = time.perf_counter()
    if topk:
      vals, ids = reft.teacher_topk(teacher, align, args.k)
      a = align.with_fields(topk_logits=vals, topk_ids=ids)
    precompute = time.perf_counter() - t0
    batcher = sft.MixedBatcher({"user": sft.Batcher(user, args.batch), "align": sft.Batcher(a, args.batch)})
    graphdef, params = split_model(init_model(cfg, seed=2))  # fresh: the step donates its buffers
    tx, sched, labels = make_optimizer(params, lr=1e-4, num_steps=100)
    state, state_sh = init_train_state(params, tx, mesh)
    batch_sh = batch_shardings(batcher.local_batch(0), mesh)
    frozen_graphdef, frozen_params = split_model(teacher)
    frozen_sh = None if topk else jax.tree.map(lambda x: x.sharding, frozen_params)
    step = jit_step(
      make_train_step(
        graphdef, tx, reft.student_loss(1.0, 1.0, topk), sched, labels, 1, None if topk else frozen_graphdef
      ),
      state_sh,
      batch_sh,
      mesh,
      frozen_sh,
    )
    call = (lambda s, b: step(s, b)) if topk else (lambda s, b: step(s, b, frozen_params))
    t0 = time.perf_counter()
    state, m = call(state, batcher.global_batch(0, batch_sh))
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(1, args.steps + 1):
      state, m = call(state, batcher.global_batch(i, batch_sh))
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t0) / args.steps
    teacher_bytes = sum(x.nbytes for x in jax.tree.leaves(frozen_params))
    cache_bytes = (a.fields["topk_logits"].nbytes + a.fields["topk_ids"].nbytes) if topk else 0
    rows[mode] = {
      "step_ms": 1000 * dt,
      "tokens_per_sec": 2 * args.batch * args.seq / dt,
      "compile_s": compile_s,
      "precompute_s": precompute,
      "teacher_in_step_MB": 0.0 if topk else teacher_bytes / 2**20,
      "cache_MB": cache_bytes / 2**20,
      "cache_MB_per_1k_examples": cache_bytes / n * 1000 / 2**20,
    }
  print(
    f"jax {jax.__version__}, {jax.devices()[0].platform}, arch={args.arch}, vocab={args.vocab}, "
    f"batch={args.batch}x{args.seq} (user) + {args.batch}x{args.seq} (alignment)"
  )
  keys = list(next(iter(rows.values())))
  print("| mode | " + " | ".join(keys) + " |\n|" + "---|" * (len(keys) + 1))
  for mode, r in rows.items():
    print(f"| {mode} | " + " | ".join(f"{r[k]:.2f}" for k in keys) + " |")
  os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
  with open(os.path.join(os.path.dirname(__file__), "results", "student_topk.json"), "w") as f:
    json.dump({"args": vars(args), "jax": jax.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
