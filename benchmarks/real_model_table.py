"""The README's real-model table from finished workdirs: one row per (label, results.json run), every rate
with its 95% Wilson interval over the evaluation prompts.

  python benchmarks/real_model_table.py shipped=runs/smollm2_shipped reft=runs/smollm2:reft ...

LABEL=WORKDIR[:RUN] (RUN: the key under results.json "runs"; default: the only one, or LABEL). Seeds of one
row: LABEL=WORKDIR[:RUN]+WORKDIR[:RUN]+... (each rate as its mean with a t-interval over the seeds; the
filter cell and the training time as the seeds' means).
"""

from __future__ import annotations

import json
import os
import sys

from reft_jax.eval import stats


def load_one(label: str, where: str) -> dict:
  workdir, _, run = where.partition(":")
  with open(os.path.join(workdir, "results.json")) as f:
    runs = json.load(f)["runs"]
  run = run or (next(iter(runs)) if len(runs) == 1 else label)
  if run not in runs:
    sys.exit(f"error: {workdir}/results.json has no run {run!r} (it has {', '.join(runs)})")
  return runs[run]


def load_run(spec: str) -> tuple[str, list[dict]]:
  label, _, where = spec.partition("=")
  return label, [load_one(label, w) for w in where.split("+")]


def _mean(values: list) -> float | None:
  values = [v for v in values if v is not None]
  return sum(values) / len(values) if values else None


def row(label: str, seeds: list[dict]) -> list[str]:
  rates = stats.summarize(seeds)  # one run: Wilson over the prompts; several: t over the seeds
  cell = lambda key: stats.fmt_interval(rates.get(key))
  flts = [r["filter"] for r in seeds if r.get("filter")]
  means = {k: _mean([f.get(k) for f in flts]) for k in ("precision", "recall", "false_positive_rate")}
  filter_cell = " / ".join("—" if m is None else f"{m:.2f}" for m in means.values()) if flts else "—"
  wall = _mean([r.get("wall_seconds") for r in seeds])
  r = seeds[0]
  return [
    label,
    cell("harmful_score"),
    cell("over_refusal"),
    cell("over_refusal_trigger"),
    *[cell(f"fa_{t}") for t in sorted(r.get("finetune_accuracy") or {})],
    cell("degenerate"),
    filter_cell,
    "—" if not wall else f"{wall / 60:.1f}",  # 0: every stage was reused from another run
  ]


def table(specs: list[str]) -> str:
  runs = [load_run(s) for s in specs]
  tasks = sorted({t for _, seeds in runs for r in seeds for t in (r.get("finetune_accuracy") or {})})
  head = [
    "model",
    "HS ↓",
    "over-refusal requests ↓",
    "over-refusal trigger words ↓",
    *[f"FA {t} ↑" for t in tasks],
    "degenerate % (harmful set)",
    "filter P / R / FPR",
    "training min",
  ]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  lines += ["| " + " | ".join(row(label, r)) + " |" for label, r in runs]
  return "\n".join(lines)


if __name__ == "__main__":
  if len(sys.argv) < 2:
    sys.exit(__doc__)
  print(table(sys.argv[1:]))
