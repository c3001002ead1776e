"""The README's real-model table from finished workdirs: one row per (label, results.json run), every rate
with its 95% Wilson interval over the evaluation prompts.

  python benchmarks/real_model_table.py shipped=runs/smollm2_shipped reft=runs/smollm2:reft ...

LABEL=WORKDIR[:RUN] (RUN: the key under results.json "runs"; default: the only one, or LABEL).
"""

from __future__ import annotations

import json
import os
import sys

from reft_jax.eval.stats import wilson


def load_run(spec: str) -> tuple[str, dict]:
  label, _, where = spec.partition("=")
  workdir, _, run = where.partition(":")
  with open(os.path.join(workdir, "results.json")) as f:
    runs = json.load(f)["runs"]
  run = run or (next(iter(runs)) if len(runs) == 1 else label)
  if run not in runs:
    sys.exit(f"error: {workdir}/results.json has no run {run!r} (it has {', '.join(runs)})")
  return label, runs[run]


def rate(value: float | None, n: int | None) -> str:
  if value is None:
    return "—"
  if not n:
    return f"{value:.1f}"
  lo, hi = wilson(value, n)
  return f"{value:.1f} [{lo:.1f}, {hi:.1f}]"


def row(label: str, r: dict) -> list[str]:
  counts = r.get("counts", {})
  fa = r.get("finetune_accuracy") or {}
  by_set = r.get("over_refusal_by_set") or {}
  flt = r.get("filter")
  g = lambda x: "—" if x is None else f"{x:.2f}"
  filter_cell = (
    f"{g(flt.get('precision'))} / {g(flt.get('recall'))} / {g(flt.get('false_positive_rate'))}" if flt else "—"
  )
  wall = r.get("wall_seconds")
  return [
    label,
    rate(r.get("harmful_score"), counts.get("harmful")),
    rate(by_set.get("harmless", r.get("over_refusal")), counts.get("harmless")),
    rate(by_set.get("trigger"), counts.get("trigger")),
    *[rate(fa.get(t), counts.get(t)) for t in sorted(fa)],
    rate((r.get("degenerate_by_set") or {}).get("harmful", r.get("degenerate")), counts.get("harmful")),
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
