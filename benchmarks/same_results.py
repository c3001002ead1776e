"""Are two runs' numbers identical? Compares every run of two results.json files (HS, degenerate, FA per task,
over-refusal per set, filter, Lisa/restore records), ignoring timings; exit 0 when identical.

  python benchmarks/same_results.py runs/demo/results.json runs/demo_after/results.json
"""

import json
import sys

TIMINGS = ("wall_seconds", "eval_seconds", "base_seconds", "total_seconds")


def _numbers(run: dict) -> dict:
  return {k: v for k, v in run.items() if k not in TIMINGS and k != "config"}


def main(a: str, b: str) -> int:
  runs_a, runs_b = (json.load(open(p))["runs"] for p in (a, b))
  differ = 0
  for name in sorted(set(runs_a) | set(runs_b)):
    if name not in runs_a or name not in runs_b:
      print(f"{name}: only in {a if name in runs_a else b}")
      differ += 1
      continue
    x, y = _numbers(runs_a[name]), _numbers(runs_b[name])
    keys = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))
    print(
      f"{name}: "
      + ("identical" if not keys else "differs in " + ", ".join(f"{k} ({x.get(k)} vs {y.get(k)})" for k in keys))
    )
    differ += bool(keys)
  print(f"{len(set(runs_a) | set(runs_b)) - differ} identical, {differ} different")
  return int(differ > 0)


if __name__ == "__main__":
  sys.exit(main(*sys.argv[1:3]))
