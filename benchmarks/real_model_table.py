"""The README's real-model table from finished workdirs: one row per (label, results.json run), every rate
with its 95% Wilson interval over the evaluation prompts.

  python benchmarks/real_model_table.py shipped=runs/smollm2_shipped reft=runs/smollm2:reft ...

LABEL=WORKDIR[:RUN] (RUN: the key under results.json "runs"; default: the only one, or LABEL).
"""

from __future__ import annotations

import json
import os
import sys

from reft_jax.eval import stats


def load_run(spec: str) -> tuple[str, dict]:
  label, _, where = spec.partition("=")
  workdir, _, run = where.partition(":")
  with open(os.path.join(workdir, "results.json")) as f:
    runs = json.load(f)["runs"]
  run = run or (next(iter(runs)) if len(runs) == 1 else label)
  if run not in runs:
    sys.exit(f"error: {workdir}/results.json has no run {run!r} (it has {', '.join(runs)})")
  return label, runs[run]


def row(label: str, r: dict) -> list[str]:
  rates = stats.summarize([r])  # one run: each rate with its Wilson interval over the prompts
  cell = lambda key: stats.fmt_interval(rates.get(key))
  flt = r.get("filter")
  g = lambda x: "—" if x is None else f"{x:.2f}"
  filter_cell = (
    f"{g(flt.get('precision'))} / {g(flt.get('recall'))} / {g(flt.get('false_positive_rate'))}" if flt else "—"
  )
  wall = r.get("wall_seconds")
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
  tasks = sorted({t for _, r in runs for t in (r.get("finetune_accuracy") or {})})
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
