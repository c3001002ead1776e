"""Refusal-feature analysis of a model: per layer, the difference-of-means direction from one pair of
harmful / harmless prompt sets, and its separation on *held-out* sets — the evidence a provider
needs before trusting the filter (issue: a probe that learns "request vs puzzle" looks perfect on
the wrong negatives, so false positives on ordinary requests and on tasks are reported apart).

  reft-jax --config=configs/default.py:smollm2 --config.method=analyze --workdir=runs/layers
"""

from __future__ import annotations

import json
import os

import numpy as np

from reft_jax import distributed as dist
from reft_jax import refusal
from reft_jax.data.load import get_tokenizer, load
from reft_jax.model.build import load_frozen, setup_mesh
from reft_jax.config import csv_list
from reft_jax.data import assets


def _load_many(c, specs: str, limit: int):
  out = []
  for spec in csv_list(specs):
    out += load(c, spec, limit)
  return out


def recall_at_fpr(harm: np.ndarray, safe: np.ndarray, fpr: float) -> float:
  """Share of harmful prompts above the threshold that flags `fpr` of the harmless ones."""
  tau = np.quantile(safe, 1 - fpr)
  return float(np.mean(harm > tau))


def run(c, workdir: str) -> dict:
  a = c.analyze
  mesh, rules = setup_mesh(c)
  tokenizer = get_tokenizer(c, workdir, [])
  model = load_frozen(c, c.model.hf_path, mesh, rules)
  sets = {
    name: _load_many(c, getattr(a, name), a.n_train if name.endswith("train") else a.n_eval)
    for name in ("harmful_train", "harmless_train", "harmful_eval", "harmless_eval", "task_eval")
  }
  # Held-out means held out: drop evaluation prompts that (nearly) repeat a training prompt.
  for ev, tr in (("harmful_eval", "harmful_train"), ("harmless_eval", "harmless_train")):
    sets[ev] = assets.drop_overlapping(sets[ev], sets[tr], 0.8)
  layers = tuple(csv_list(a.layers, int)) or tuple(range(1, model.cfg.num_layers + 1))
  feats = {
    k: refusal.prompt_features(
      model, refusal.tokenize_prompts(v, tokenizer, c.data.seq_len, c.data.template), layers, mesh=mesh
    )
    for k, v in sets.items()
    if v
  }
  rows = []
  for j, layer in enumerate(layers):
    r = feats["harmful_train"][:, j].mean(0) - feats["harmless_train"][:, j].mean(0)
    score = {k: np.asarray(refusal.cosine(f[:, j], r)) for k, f in feats.items()}
    row = {
      "layer": layer,
      "auroc": refusal.auroc(score["harmful_eval"], score["harmless_eval"]),
      "recall@1%fpr": recall_at_fpr(score["harmful_eval"], score["harmless_eval"], 0.01),
      "recall@5%fpr": recall_at_fpr(score["harmful_eval"], score["harmless_eval"], 0.05),
    }
    if "task_eval" in score:
      tau5 = np.quantile(score["harmless_eval"], 0.95)
      row["auroc_vs_tasks"] = refusal.auroc(score["harmful_eval"], score["task_eval"])
      row["task_fpr@5%"] = float(np.mean(score["task_eval"] > tau5))
    rows.append(row)
  best = max(rows, key=lambda r: (r["recall@1%fpr"], r["auroc"]))
  out = {
    "rows": rows,
    "best_layer": best["layer"],
    "counts": {k: len(v) for k, v in sets.items()},
    "sets": {k: getattr(a, k) for k in sets},
    "model": c.model.hf_path,
  }
  if not dist.is_primary():  # one writer in the shared workdir
    return {"stopped": False, "history": [], "analysis": out}
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "refusal_layers.json"), "w") as f:
    json.dump(out, f, indent=2)
  table = layer_table(rows)
  with open(os.path.join(workdir, "refusal_layers.md"), "w") as f:
    f.write(table + "\n")
  print(table)
  print(f"best layer by recall at 1% FPR: {best['layer']}; counts {out['counts']}")
  return {"stopped": False, "history": [], "analysis": out}


def layer_table(rows: list[dict]) -> str:
  cols = [k for k in rows[0] if k != "layer"]
  lines = ["| layer | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
  for r in rows:
    lines.append(f"| {r['layer']} | " + " | ".join(f"{r[k]:.3f}" for k in cols) + " |")
  return "\n".join(lines)
