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

import logging
import os

import numpy as np

from reft_jax import distributed as dist
from reft_jax.config import check, csv_list
from reft_jax.defences import names as defence_names
from reft_jax.eval import stats
from reft_jax.pipelines.suite import compare, write_json, write_table

log = logging.getLogger(__name__)


def run_demo(c, workdir: str) -> dict:
  """One seed: runs named by method (as before seeds existed). Several: one cell directory per seed,
  the table gives mean [95% t-interval] over seeds; one seed gives Wilson intervals over prompts."""
  methods, seeds = csv_list(c.demo.methods), csv_list(c.demo.seeds, int)
  results = compare(c, workdir, methods, [c.data.p], seeds, cell_dirs=len(seeds) > 1, reference=True)
  summary = summarize_methods(results["runs"], ["aligned", *methods])
  results["summary"] = summary
  if not dist.is_primary():
    return {"results": results}
  write_json(os.path.join(workdir, "results.json"), results)
  table = summary_table(summary, results["runs"])
  write_table(workdir, "results", table)
  print(table)
  plot_results(
    {
      m: {k: v["mean"] for k, v in s.items()}
      | {"finetune_accuracy": {k[3:]: v["mean"] for k, v in s.items() if k.startswith("fa_")}}
      for m, s in summary.items()
    },
    os.path.join(workdir, "results.png"),
    f"Safety world: {c.data.n} user examples, {c.data.p:.0%} harmful ({c.data.attack}), {len(seeds)} seed(s)",
  )
  return {"results": results}


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
  head = [
    "method",
    "seeds",
    "HS ↓",
    "degenerate %",
    *[f"FA {t} ↑" for t in tasks],
    "over-refusal ↓",
    *[f"over-refusal {k.removeprefix('over_refusal_')} ↓" for k in extra],
    "filter P / R / kept",
    "wall s",
  ]
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
    cells = [
      m,
      str(hs["seeds"] if hs else len(mine)),
      stats.fmt_interval(hs),
      stats.fmt_interval(s.get("degenerate")),
      *[stats.fmt_interval(s.get(f"fa_{t}")) for t in tasks],
      stats.fmt_interval(s.get("over_refusal")),
      *[stats.fmt_interval(s.get(k)) for k in extra],
      flt,
      f"{wall:.1f}",
    ]
    lines.append("| " + " | ".join(cells) + " |")
  n = {k: v for r in runs.values() for k, v in (r.get("counts") or {}).items()}
  lines.append("")
  lines.append(
    "Mean [95% interval]: Wilson over prompts for one seed, Student-t over seeds for several. "
    "Prompts per figure: " + ", ".join(f"{k} {v}" for k, v in sorted(n.items())) + "."
  )
  return "\n".join(lines)


def run_sweep(c, workdir: str) -> dict:
  methods, ps, seeds = csv_list(c.sweep.methods), csv_list(c.sweep.p, float), csv_list(c.sweep.seeds, int)
  results = compare(c, workdir, methods, ps, seeds, cell_dirs=True)
  table = sweep_table(results["runs"], methods, ps)
  cells: dict = {}
  for r in results["runs"].values():
    if "method" in r:
      cells.setdefault(f"{r['method']}|p={r['p']:g}", []).append(r)
  results["summary"] = {k: stats.summarize(v) for k, v in cells.items()}
  if not dist.is_primary():
    return {"results": results}
  write_json(os.path.join(workdir, "results.json"), results)
  write_table(workdir, "sweep", table["markdown"], table["rows"])
  plot_sweep(table["cells"], methods, ps, os.path.join(workdir, "sweep.png"))
  print(table["markdown"])
  return {"results": results}


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
        rows.append(
          [
            m,
            p,
            *interval(hs),
            *interval(fa),
            len(vals),
            " ".join(f"{x:.1f}" for x in hs),
            " ".join(f"{x:.1f}" for x in fa),
          ]
        )
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


def validate(c) -> None:
  """demo and sweep."""
  for section in ("demo", "sweep"):
    bad = [m for m in csv_list(c[section].methods) if m not in defence_names()]
    check(
      bool(csv_list(c[section].methods)) and not bad,
      f"{section}.methods",
      c[section].methods,
      f"each must be one of {defence_names()}",
    )
  try:
    ps = csv_list(c.sweep.p, float)
    csv_list(c.sweep.seeds, int) + csv_list(c.demo.seeds, int)
  except ValueError:
    check(
      False, "sweep.p/seeds, demo.seeds", (c.sweep.p, c.sweep.seeds, c.demo.seeds), "must be comma-separated numbers"
    )
  check(
    bool(csv_list(c.demo.seeds)) and bool(csv_list(c.sweep.seeds)),
    "demo.seeds/sweep.seeds",
    (c.demo.seeds, c.sweep.seeds),
    "must name at least one seed",
  )
  check(all(0 <= p <= 1 for p in ps), "sweep.p", c.sweep.p, "ratios must lie in [0, 1]")
