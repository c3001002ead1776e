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
from reft_jax.eval import stats
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
    _write_json(os.path.join(workdir, "results.json"), results)
  dist.barrier("compare")
  return results


def run_demo(c, workdir: str, hooks=()) -> dict:
  """One seed: runs named by method (as before seeds existed). Several: one cell directory per seed,
  the table gives mean [95% t-interval] over seeds; one seed gives Wilson intervals over prompts."""
  methods, seeds = csv_list(c.demo.methods), csv_list(c.demo.seeds, int)
  try:
    results = compare(c, workdir, methods, [c.data.p], seeds, cell_dirs=len(seeds) > 1, reference=True)
  except suite.Stopped:
    return {"stopped": True, "history": []}
  summary = summarize_methods(results["runs"], ["aligned", *methods])
  results["summary"] = summary
  if not dist.is_primary():
    return {"stopped": False, "history": [], "results": results}
  _write_json(os.path.join(workdir, "results.json"), results)
  table = summary_table(summary, results["runs"])
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(table + "\n")
  print(table)
  plot_results({m: {k: v["mean"] for k, v in s.items()} | {"finetune_accuracy": {
      k[3:]: v["mean"] for k, v in s.items() if k.startswith("fa_")}} for m, s in summary.items()},
      os.path.join(workdir, "results.png"),
      f"Safety world: {c.data.n} user examples, {c.data.p:.0%} harmful ({c.data.attack}), "
      f"{len(seeds)} seed(s)")
  return {"stopped": False, "history": [], "results": results}


def _write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def summarize_methods(runs: dict, methods: list[str]) -> dict:
  """{method: stats.summarize(its runs over seeds)} in the given order; the seed-independent reference
  run ("aligned") is its own group."""
  groups: dict = {}
  for name, r in runs.items():
    groups.setdefault(r.get("method", name.split("|")[0]), []).append(r)
  return {m: stats.summarize(groups[m]) for m in methods if m in groups}


def summary_table(summary: dict, runs: dict) -> str:
  """Markdown: every rate as mean [95% interval], the filter and wall time averaged over seeds."""
  tasks = sorted({k[3:] for s in summary.values() for k in s if k.startswith("fa_")})
  extra = sorted({k for s in summary.values() for k in s if k.startswith("over_refusal_")})
  head = ["method", "seeds", "HS ↓", "degenerate %", *[f"FA {t} ↑" for t in tasks], "over-refusal ↓",
          *[f"over-refusal {k.removeprefix('over_refusal_')} ↓" for k in extra], "filter P / R / kept",
          "wall s"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for m, s in summary.items():
    mine = [r for name, r in runs.items() if r.get("method", name.split("|")[0]) == m]
    flts = [r["filter"] for r in mine if r.get("filter")]
    flt = "—"
    if flts:
      mean = lambda k: np.mean([f[k] for f in flts if f.get(k) is not None] or [np.nan])
      flt = f"{mean('precision'):.2f} / {mean('recall'):.2f} / {mean('kept_fraction'):.2f}"
    wall = np.mean([r.get("wall_seconds") or np.nan for r in mine])
    hs = s.get("harmful_score")
    cells = [m, str(hs["seeds"] if hs else len(mine)), stats.fmt_interval(hs),
             stats.fmt_interval(s.get("degenerate")), *[stats.fmt_interval(s.get(f"fa_{t}")) for t in tasks],
             stats.fmt_interval(s.get("over_refusal")), *[stats.fmt_interval(s.get(k)) for k in extra], flt,
             f"{wall:.1f}"]
    lines.append("| " + " | ".join(cells) + " |")
  n = {k: v for r in runs.values() for k, v in (r.get("counts") or {}).items()}
  lines.append("")
  lines.append("Mean [95% interval]: Wilson over prompts for one seed, Student-t over seeds for several. "
               "Prompts per figure: " + ", ".join(f"{k} {v}" for k, v in sorted(n.items())) + ".")
  return "\n".join(lines)


def run_sweep(c, workdir: str, hooks=()) -> dict:
  methods, ps, seeds = csv_list(c.sweep.methods), csv_list(c.sweep.p, float), csv_list(c.sweep.seeds, int)
  try:
    results = compare(c, workdir, methods, ps, seeds, cell_dirs=True)
  except suite.Stopped:
    return {"stopped": True, "history": []}
  table = sweep_table(results["runs"], methods, ps)
  cells: dict = {}
  for r in results["runs"].values():
    if "method" in r:
      cells.setdefault(f"{r['method']}|p={r['p']:g}", []).append(r)
  results["summary"] = {k: stats.summarize(v) for k, v in cells.items()}
  if not dist.is_primary():
    return {"stopped": False, "history": [], "results": results}
  _write_json(os.path.join(workdir, "results.json"), results)
  with open(os.path.join(workdir, "sweep.md"), "w") as f:
    f.write(table["markdown"] + "\n")
  with open(os.path.join(workdir, "sweep.csv"), "w", newline="") as f:
    csv.writer(f).writerows(table["rows"])
  plot_sweep(table["cells"], methods, ps, os.path.join(workdir, "sweep.png"))
  print(table["markdown"])
  return {"stopped": False, "history": [], "results": results}


def sweep_table(runs: dict, methods: list[str], ps: list[float]) -> dict:
  """HS / FA (mean over tasks) per method and p: mean ± the 95% t-interval's half-width over seeds
  (one seed: the value alone; its Wilson interval over prompts is in results.json's summary)."""
  cells: dict = {}
  for r in runs.values():
    if "method" not in r:
      continue
    fa = list((r.get("finetune_accuracy") or {}).values())
    fa_mean = np.mean(fa) if fa else np.nan
    cells.setdefault((r["method"], float(r["p"])), []).append((r["harmful_score"], fa_mean))

  def interval(xs):
    mean, low, high = stats.t_interval(xs)
    return mean, (high - low) / 2

  def fmt(xs):
    mean, half = interval(xs)
    return f"{mean:.1f}" + (f" ± {half:.1f}" if len(xs) > 1 else "")

  head = ["method", *[f"p={p:g} HS↓ / FA↑" for p in ps]]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  rows = [["method", "p", "hs_mean", "hs_ci95", "fa_mean", "fa_ci95", "seeds", "hs_values", "fa_values"]]
  for m in methods:
    cols = []
    for p in ps:
      vals = cells.get((m, float(p)), [])
      cols.append(f"{fmt([v[0] for v in vals])} / {fmt([v[1] for v in vals])}" if vals else "—")
      if vals:
        hs, fa = [v[0] for v in vals], [v[1] for v in vals]
        rows.append([m, p, *interval(hs), *interval(fa), len(vals), " ".join(f"{x:.1f}" for x in hs),
                     " ".join(f"{x:.1f}" for x in fa)])
    lines.append("| " + " | ".join([m, *cols]) + " |")
  n_seeds = sorted({len(v) for v in cells.values()})
  lines += ["", f"Mean ± 95% t-interval half-width over {'/'.join(map(str, n_seeds))} seed(s) per cell."]
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
