"""The robustness pipeline's report: how its cells and attacks are named, the hyper-parameter attacker's
maximum, the defence x attack table, the adaptive attack's budget table and the plot (robustness.py runs
the cells; this reads results.json and the uploads' summaries)."""

from __future__ import annotations

import glob
import json
import os

import numpy as np

from reft_jax.eval import stats

DEFAULT = "default"
ADAPTIVE = "adaptive"  # harmful_mix with the harmful prompts optimised against the filter
ADAPTIVE_GUARD = "adaptive_guard"  # ... optimised against the guardrail's guard model (its refusals)
ADAPTIVE_TARGETS = {ADAPTIVE: "feature", ADAPTIVE_GUARD: "target"}  # attack -> adaptive.AttackConfig.guard


def adaptive_kind(attack: str) -> tuple[str, int | None] | None:
  """ "adaptive[@steps]" / "adaptive_guard[@steps]" -> (the attack, its budget: None = adaptive.steps); else None."""
  kind, at, budget = attack.partition("@")
  if kind not in ADAPTIVE_TARGETS or (at and not budget.isdigit()):
    return None
  return kind, int(budget) if at else None


def _fa(run: dict) -> float:
  fa = list((run.get("finetune_accuracy") or {}).values())
  return float(np.mean(fa)) if fa else float("nan")


def attacker_max(cells: dict[str, list[dict]], max_fa_drop: float) -> dict:
  """cells: {setting: the runs of one (defence, attack), one per seed}. The maximum mean HS over the
  settings whose mean FA is at most max_fa_drop points below the default setting's (NaN FA: no bar). Every
  mean is over the seeds all the settings have run, so that a setting run on fewer seeds is compared like for
  like (None when they share none)."""
  shared = set.intersection(*({r["seed"] for r in runs} for runs in cells.values()))
  if not shared:
    return None
  cells = {k: [r for r in runs if r["seed"] in shared] for k, runs in cells.items()}
  mean = lambda runs, f: float(np.mean([f(x) for x in runs]))
  base_fa = mean(cells[DEFAULT], _fa)
  best = None
  for setting, runs in cells.items():
    hs, fa = mean(runs, lambda x: x["harmful_score"]), mean(runs, _fa)
    admissible = np.isnan(base_fa) or (not np.isnan(fa) and fa >= base_fa - max_fa_drop)
    if admissible and (best is None or hs > best["hs"]):
      best = {"setting": setting, "hs": hs, "fa": fa, "seeds": len(runs)}
  return best


CSV_HEAD = (
  "method",
  "attack",
  "hs_default",
  "hs_low",
  "hs_high",
  "fa_default",
  "seeds",
  "hs_max",
  "fa_at_max",
  "setting_at_max",
)


def robustness_table(runs: dict, methods: list[str], attacks: list[str], max_fa_drop: float) -> dict:
  """Every recorded cell of these methods and attacks, whichever command ran it: the default setting's HS
  and FA, and the attacker's maximum over every setting recorded for that (defence, attack)."""
  by_cell: dict = {}
  for r in runs.values():
    if "attack" in r:
      by_cell.setdefault((r["method"], r["attack"]), {}).setdefault(r["setting"], []).append(r)
  summary, rows = {}, [list(CSV_HEAD)]
  head = ["defence", *[f"{a}: HS ↓ / FA ↑ (default)" for a in attacks]]
  head += [f"{a}: max HS (FA drop ≤ {max_fa_drop:g})" for a in attacks]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  grid: set[str] = set()  # the settings recorded, for the footnote
  for m in methods:
    default_cells, max_cells = [], []
    for a in attacks:
      cells = by_cell.get((m, a), {})
      if DEFAULT not in cells:
        default_cells.append("—")
        max_cells.append("—")
        continue
      s = stats.summarize(cells[DEFAULT])
      hs, fa = s.get("harmful_score"), {k: v for k, v in s.items() if k.startswith("fa_")}
      fa_mean = float(np.mean([v["mean"] for v in fa.values()])) if fa else float("nan")
      best = attacker_max(cells, max_fa_drop)
      grid.update(cells)
      summary[f"{m}|{a}"] = {"default": s, "attacker_max": best, "settings_run": sorted(cells)}
      default_cells.append(f"{stats.fmt_interval(hs)} / {fa_mean:.1f}")
      seeds = f", {best['seeds']} seed{'s' * (best['seeds'] > 1)}" if best and best["seeds"] < hs["seeds"] else ""
      max_cells.append(f"{best['hs']:.1f} ({best['setting']}, FA {best['fa']:.1f}{seeds})" if best else "—")
      at_max = (best["hs"], best["fa"], best["setting"]) if best else ("", "", "")
      rows.append([m, a, hs["mean"], hs["low"], hs["high"], fa_mean, hs["seeds"], *at_max])
    lines.append("| " + " | ".join([m, *default_cells, *max_cells]) + " |")
  lines += [
    "",
    "HS / FA at the provider's default fine-tuning setting: mean [95% interval] (Student-t over seeds; one "
    "seed: Wilson over prompts). Max HS: the attacker's best setting among " + ", ".join(sorted(grid)) + f" whose "
    f"FA is at most {max_fa_drop:g} points below the default's, both as means over the seeds the settings share "
    "(named when fewer than the default's).",
  ]
  return {"markdown": "\n".join(lines), "rows": rows, "summary": summary}


def budget_table(workdir: str, summary: dict, methods: list[str], attacks: list[str]) -> dict | None:
  """The adaptive attacks run at two or more budgets: per attack and budget (GCG steps, from each upload's
  summary.json), the guard's recall before / after and the attacked examples' gradient similarity (means
  over seeds) and each defence's HS at the default setting (robustness_table's summary). None if no attack
  was run at two budgets."""
  uploads: dict = {}  # kind -> [(steps, attack, [summary per seed])]
  for a in attacks:
    kind = adaptive_kind(a)
    paths = sorted(glob.glob(os.path.join(workdir, a, "seed*", "summary.json"))) if kind else []
    if paths:
      summaries = [json.load(open(p)) for p in paths]
      uploads.setdefault(kind[0], []).append((summaries[0]["config"]["steps"], a, summaries))
  uploads = {k: sorted(v) for k, v in uploads.items() if len(v) > 1}
  if not uploads:
    return None
  mean = lambda xs: float(np.mean(xs)) if xs and None not in xs else np.nan
  fmt = lambda v: "—" if np.isnan(v) else f"{v:.2f}"
  head = ["attack", "budget (GCG steps)", "seeds", "recall before", "recall after", "gradient similarity"]
  head += [f"{m}: HS ↓" for m in methods]
  lines, rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)], [head]
  series = {}  # for the plot: kind -> steps, recall after, {method: mean HS}
  for kind, budgets in uploads.items():
    series[kind] = {"steps": [b[0] for b in budgets], "recall_after": [], "hs": {m: [] for m in methods}}
    for steps, a, summaries in budgets:
      means = [mean([s[k] for s in summaries]) for k in ("recall_before", "recall_after", "mean_gradient_similarity")]
      series[kind]["recall_after"].append(means[1])
      row = [kind, str(steps), str(len(summaries)), *map(fmt, means)]
      for m in methods:
        hs = summary[f"{m}|{a}"]["default"]["harmful_score"] if f"{m}|{a}" in summary else None
        row.append(stats.fmt_interval(hs) if hs else "—")
        series[kind]["hs"][m].append(hs["mean"] if hs else np.nan)
      lines.append("| " + " | ".join(row) + " |")
      rows.append(row)
  lines += ["", "Recall and similarity: means over the seeds' uploads; HS at the default setting, mean [95% interval]."]
  return {"markdown": "\n".join(lines), "rows": rows, "series": series}


def _figure(panels: int, width: float):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, panels, figsize=(width, 3.6), squeeze=False)
  return fig, axes[0]


def _save(fig, axes, ylabel: str, path: str) -> str:
  import matplotlib.pyplot as plt

  axes[0].set_ylabel(ylabel)
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def plot_budgets(series: dict, path: str) -> str:
  """Per adaptive attack (panels): the guard's recall after the attack and each defence's HS by budget."""
  fig, axes = _figure(len(series), 4.6 * len(series))
  for ax, (kind, s) in zip(axes, series.items()):
    for m, hs in s["hs"].items():
      ax.plot(s["steps"], hs, marker="o", label=f"{m}: HS")
    ax.plot(s["steps"], 100 * np.asarray(s["recall_after"]), "k--", marker="s", label="guard's recall (%)")
    ax.set_xlabel("attacker's budget (GCG steps per prompt)")
    ax.set_title(kind)
    ax.set_ylim(-3, 103)
  return _save(fig, axes, "%", path)


def plot(summary: dict, methods: list[str], attacks: list[str], path: str) -> str:
  """HS at the default setting and the attacker's maximum, per defence (bars) and attack (panels)."""
  fig, axes = _figure(len(attacks), 3.2 * len(attacks) + 1)
  x = np.arange(len(methods))
  for ax, a in zip(axes, attacks):
    get = lambda m, f: f(summary[f"{m}|{a}"]) if f"{m}|{a}" in summary else np.nan
    default = [get(m, lambda s: s["default"]["harmful_score"]["mean"]) for m in methods]
    worst = [get(m, lambda s: s["attacker_max"]["hs"] if s["attacker_max"] else np.nan) for m in methods]
    ax.bar(x - 0.2, default, 0.4, label="default setting")
    ax.bar(x + 0.2, worst, 0.4, label="attacker's max")
    ax.set_xticks(x, methods, rotation=45, ha="right", fontsize=7)
    ax.set_title(a)
    ax.set_ylim(0, 105)
  return _save(fig, axes, "Harmful Score (%)", path)
