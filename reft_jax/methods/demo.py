"""The README's main job and the paper-style sweep, on shared models.

demo:  on one attacked user set (n, p), compare c.demo.methods (default: align-then-fine-tune SFT,
       SFT from the base model, ReFT) plus the aligned model as the reference; table, plot,
       results.json in the workdir.
sweep: methods x p x seeds; results.json (one run per cell), sweep.md / sweep.csv (HS and FA per
       method and p, mean ± std over seeds) and sweep.png (HS and FA against p).

The base model is pretrained on the safety world unless model.hf_path is given; shared stages (base,
aligned models, the ReFT teacher) are trained once and reused by every cell and every rerun.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time

import numpy as np

from reft_jax import distributed as dist
from reft_jax import experiment
from reft_jax.config import csv_list
from reft_jax.eval.run import format_table
from reft_jax.methods import sft as sft_method
from reft_jax.methods import suite

log = logging.getLogger(__name__)


def ensure_base(c, workdir: str, mesh, rules) -> str:
  """model.hf_path, or the safety world's base model pretrained into workdir/base."""
  if c.model.hf_path:
    return c.model.hf_path
  pc = suite.with_updates(c, **{
      "method": "pretrain", "data.source": "world:pretrain", "data.attack": "none",
      "train.num_steps": c.demo.pretrain_steps, "train.batch_size": 32, "train.lr": 3e-3,
      "train.warmup_steps": 30, "model.arch": c.demo.arch})
  if not suite.finished(workdir, "base"):
    examples = experiment.read_examples(pc)
    tokenizer = experiment.get_tokenizer(pc, workdir, examples)
    out = sft_method.train_and_export(pc, workdir, "base", examples, tokenizer, mesh, rules, loss_on="all")
    if out["stopped"]:
      raise suite.Stopped("base")
  return suite.model_dir(workdir, "base")


def _evaluate(env, c, workdir, name, model_path, extra):
  model = experiment.load_frozen(c, model_path, env.mesh, env.rules)
  return experiment.evaluate_and_record(suite.with_updates(c, **{"eval.name": name}), workdir, model,
                                        env.tokenizer, env.mesh, name, extra)


def compare(c, workdir: str, methods: list[str], ps: list[float], seeds: list[int], *, cell_dirs: bool,
            reference: bool = False) -> dict:
  """Trains and evaluates every (method, p, seed); returns results.json's content."""
  t0 = time.perf_counter()
  mesh, rules = experiment.setup_mesh(c)
  base_path = ensure_base(c, workdir, mesh, rules)
  t_base = time.perf_counter() - t0
  c = suite.with_updates(c, **{"model.hf_path": base_path})
  env = suite.Env(c, mesh, rules, experiment.get_tokenizer(c, workdir, []), base_path, workdir)
  names = {}
  if reference:  # the aligned model before any user data
    start = time.perf_counter()
    path = suite.aligned(env)
    _evaluate(env, c, workdir, "aligned", path, {"wall_seconds": time.perf_counter() - start,
                                                          "filter": None})
    names["aligned"] = None
  for seed in seeds:
    for p in ps:
      cell_c = suite.with_updates(c, **{"data.p": p, "seed": seed})
      env.c = cell_c
      user = experiment.read_examples(cell_c)
      for method in methods:
        name = f"{method}|p={p:g}|seed={seed}" if cell_dirs else method
        root = os.path.join(workdir, f"p{p:g}_seed{seed}") if cell_dirs else workdir
        start = time.perf_counter()
        path, extra = suite.run_method(method, env, root, user)
        extra = {"filter": None, **extra, "wall_seconds": time.perf_counter() - start,
                 "method": method, "p": p, "seed": seed}
        _evaluate(env, cell_c, workdir, name, path, extra)
        names[name] = (method, p, seed)
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  results["base_seconds"] = t_base
  results["total_seconds"] = time.perf_counter() - t0
  if dist.is_primary():
    tmp = os.path.join(workdir, "results.json.tmp")
    with open(tmp, "w") as f:
      json.dump(results, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(workdir, "results.json"))
  dist.barrier("compare")
  return results


def run_demo(c, workdir: str, hooks=()) -> dict:
  try:
    results = compare(c, workdir, csv_list(c.demo.methods), [c.data.p], [c.seed], cell_dirs=False,
                      reference=True)
  except suite.Stopped:
    return {"stopped": True, "history": []}
  runs = {k: results["runs"][k] for k in ["aligned", *csv_list(c.demo.methods)] if k in results["runs"]}
  if not dist.is_primary():
    return {"stopped": False, "history": [], "results": results}
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(format_table(runs) + "\n")
  plot_results(runs, os.path.join(workdir, "results.png"),
               f"Safety world: {c.data.n} user examples, {c.data.p:.0%} harmful ({c.data.attack})")
  return {"stopped": False, "history": [], "results": results}


def run_sweep(c, workdir: str, hooks=()) -> dict:
  methods, ps, seeds = csv_list(c.sweep.methods), csv_list(c.sweep.p, float), csv_list(c.sweep.seeds, int)
  try:
    results = compare(c, workdir, methods, ps, seeds, cell_dirs=True)
  except suite.Stopped:
    return {"stopped": True, "history": []}
  table = sweep_table(results["runs"], methods, ps)
  if not dist.is_primary():
    return {"stopped": False, "history": [], "results": results}
  with open(os.path.join(workdir, "sweep.md"), "w") as f:
    f.write(table["markdown"] + "\n")
  with open(os.path.join(workdir, "sweep.csv"), "w", newline="") as f:
    csv.writer(f).writerows(table["rows"])
  plot_sweep(table["cells"], methods, ps, os.path.join(workdir, "sweep.png"))
  print(table["markdown"])
  return {"stopped": False, "history": [], "results": results}


def sweep_table(runs: dict, methods: list[str], ps: list[float]) -> dict:
  """HS / FA (mean over tasks) per method and p, mean ± std over seeds."""
  cells: dict = {}
  for r in runs.values():
    if "method" not in r:
      continue
    fa = list((r.get("finetune_accuracy") or {}).values())
    fa_mean = np.mean(fa) if fa else np.nan
    cells.setdefault((r["method"], float(r["p"])), []).append((r["harmful_score"], fa_mean))

  def fmt(xs):
    xs = np.asarray(xs, float)
    return f"{xs.mean():.1f}" + (f" ± {xs.std(ddof=1):.1f}" if len(xs) > 1 else "")

  head = ["method", *[f"p={p:g} HS↓ / FA↑" for p in ps]]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  rows = [["method", "p", "hs_mean", "hs_std", "fa_mean", "fa_std", "seeds"]]
  for m in methods:
    cols = []
    for p in ps:
      vals = cells.get((m, float(p)), [])
      cols.append(f"{fmt([v[0] for v in vals])} / {fmt([v[1] for v in vals])}" if vals else "—")
      if vals:
        hs, fa = np.asarray([v[0] for v in vals]), np.asarray([v[1] for v in vals])
        rows.append([m, p, hs.mean(), hs.std(ddof=1) if len(hs) > 1 else 0.0, fa.mean(),
                     fa.std(ddof=1) if len(fa) > 1 else 0.0, len(vals)])
    lines.append("| " + " | ".join([m, *cols]) + " |")
  return {"markdown": "\n".join(lines), "rows": rows, "cells": cells}


def plot_sweep(cells: dict, methods: list[str], ps: list[float], path: str) -> str:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  for m in methods:
    xs = [p for p in ps if (m, float(p)) in cells]
    for ax, k in zip(axes, (0, 1)):
      ax.plot(xs, [np.mean([v[k] for v in cells[(m, float(p))]]) for p in xs], marker="o", label=m)
  for ax, title in zip(axes, ("Harmful Score ↓ (%)", "Finetune Accuracy ↑ (%)")):
    ax.set_xlabel("harmful ratio p")
    ax.set_title(title)
    ax.set_ylim(-5, 105)
  axes[1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def plot_results(runs: dict[str, dict], path: str, title: str = "") -> str:
  """Bar chart: Harmful Score, Finetune Accuracy per task and over-refusal for each run."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  tasks = sorted({t for r in runs.values() for t in r.get("finetune_accuracy", {})})
  metrics = [("Harmful Score ↓", lambda r: r.get("harmful_score"))]
  metrics += [(f"FA {t} ↑", lambda r, t=t: r["finetune_accuracy"].get(t)) for t in tasks]
  metrics += [("Over-refusal ↓", lambda r: r.get("over_refusal"))]
  x = np.arange(len(metrics))
  width = 0.8 / len(runs)
  fig, ax = plt.subplots(figsize=(2 + 1.6 * len(metrics), 3.6))
  for i, (name, r) in enumerate(runs.items()):
    values = [m(r) or 0.0 for _, m in metrics]
    bars = ax.bar(x + (i - (len(runs) - 1) / 2) * width, values, width, label=name)
    ax.bar_label(bars, fmt="%.0f", fontsize=7)
  ax.set_xticks(x, [m for m, _ in metrics])
  ax.set_ylabel("%")
  ax.set_ylim(0, 110)
  ax.legend(fontsize=8)
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
