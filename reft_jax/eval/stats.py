"""Uncertainty of the reported rates: 95% intervals over evaluation prompts (one seed) and over seeds.

One seed: a rate is k of n prompts, so its interval is the Wilson score interval of a binomial
proportion (well behaved at 0% and 100%, where the normal approximation collapses to a point).
Several seeds: the mean over seeds with a Student-t interval (small samples, unknown variance).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats


def wilson(rate_percent: float, n: int) -> tuple[float, float]:
  """The 95% Wilson interval (in %) of a rate measured on n items (scipy's binomial test)."""
  if not n or rate_percent is None or math.isnan(rate_percent):
    return (float("nan"), float("nan"))
  ci = stats.binomtest(round(rate_percent * n / 100.0), n).proportion_ci(0.95, method="wilson")
  return (100.0 * float(ci.low), 100.0 * float(ci.high))


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
  """(mean, low, high) over seeds; a single value has no spread (low = high = mean)."""
  xs = np.asarray([v for v in values if v is not None and not math.isnan(v)], float)
  if xs.size == 0:
    return (float("nan"),) * 3
  mean = float(xs.mean())
  if xs.size == 1:
    return (mean, mean, mean)
  half = float(stats.t.ppf((1 + level) / 2, xs.size - 1) * xs.std(ddof=1) / math.sqrt(xs.size))
  return (mean, mean - half, mean + half)


# The rates of one run and the count each rests on (results.json's "counts" keys).
def run_rates(run: dict) -> dict[str, tuple[float | None, int]]:
  """{metric: (value %, number of prompts)} for every rate a run reports."""
  counts = run.get("counts") or {}
  out = {
    "harmful_score": (run.get("harmful_score"), counts.get("harmful", 0)),
    "over_refusal": (run.get("over_refusal"), counts.get("harmless", 0)),
  }
  if "degenerate" in run:
    out["degenerate"] = (run.get("degenerate"), counts.get("harmful", 0))
  for task, v in (run.get("finetune_accuracy") or {}).items():
    out[f"fa_{task}"] = (v, counts.get(task, 0))
  for name, v in (run.get("over_refusal_by_set") or {}).items():  # eval.harmless_sets; "harmless" is above
    if name != "harmless":
      out[f"over_refusal_{name}"] = (v, counts.get(name, 0))
  return {k: v for k, v in out.items() if v[0] is not None}


def summarize(runs: Sequence[dict]) -> dict[str, dict]:
  """The seeds of one method (one run per seed) -> {metric: {mean, low, high, values, n_prompts,
  seeds, interval}}. One run: the Wilson interval over its prompts; several: a t-interval over seeds."""
  by_metric: dict[str, list[tuple[float, int]]] = {}
  for run in runs:
    for k, v in run_rates(run).items():
      by_metric.setdefault(k, []).append(v)
  out = {}
  for k, vals in by_metric.items():
    values = [v for v, _ in vals]
    if len(values) == 1:
      mean, (low, high), how = values[0], wilson(values[0], vals[0][1]), "wilson"
    else:  # a rate's interval stops at 0% and 100% (the t-interval itself does not know the bounds)
      (mean, low, high), how = t_interval(values), "t over seeds"
      low, high = max(0.0, low), min(100.0, high)
    out[k] = dict(
      mean=mean, low=low, high=high, values=values, n_prompts=[n for _, n in vals], seeds=len(values), interval=how
    )
  return out


def fmt_interval(s: dict | None) -> str:
  """'35.0 [25.6, 45.2]' (mean [95% interval])."""
  if not s or s["mean"] is None or math.isnan(s["mean"]):
    return "—"
  return f"{s['mean']:.1f} [{s['low']:.1f}, {s['high']:.1f}]"
