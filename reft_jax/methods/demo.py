"""The README's main job: on the safety world, compare align-then-fine-tune SFT, SFT from the base
model and ReFT on the same attacked user data (n, p), with one table, one plot, one results.json.

Stages (each skipped when its model exists): base (pretraining, unless model.hf_path is given) ->
aligned (SFT on the alignment data) -> sft_aligned, sft_base (SFT on the user data) -> teacher ->
filter -> student (ReFT) -> evaluation of the three runs.
"""

from __future__ import annotations

import json
import logging
import os
import time

from reft_jax import experiment
from reft_jax.eval.run import format_table
from reft_jax.methods import reft
from reft_jax.methods import sft as sft_method
from reft_jax.model import load_hf

log = logging.getLogger(__name__)


def _with(c, **updates):
  """A copy of the config with dotted-key updates."""
  c = c.copy_and_resolve_references()
  for key, value in updates.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def run(c, workdir: str, hooks=()) -> dict:
  t0 = time.perf_counter()
  mesh, rules = experiment.setup_mesh(c)
  base_path = c.model.hf_path
  if not base_path:  # pretrain the unaligned base model on the world (loss on every token)
    pc = _with(c, **{"method": "pretrain", "data.source": "world:pretrain", "data.attack": "none",
                     "train.num_steps": c.demo.pretrain_steps, "train.batch_size": 32,
                     "train.lr": 3e-3, "train.warmup_steps": 30, "model.arch": c.demo.arch})
    examples = experiment.read_examples(pc)
    tokenizer = experiment.get_tokenizer(pc, workdir, examples)
    if not sft_method.finished(workdir, "base"):
      out = sft_method.train_and_export(pc, workdir, "base", examples, tokenizer, mesh, rules, loss_on="all")
      if out["stopped"]:
        return {"stopped": True, "history": []}
    base_path = sft_method.model_dir(workdir, "base")
  t_base = time.perf_counter() - t0
  c = _with(c, **{"model.hf_path": base_path})
  tokenizer = experiment.get_tokenizer(c, workdir, [])
  user = experiment.read_examples(c)
  walls: dict[str, float] = {}

  def timed_stage(name, fn):
    start = time.perf_counter()
    out = fn()
    walls[name] = time.perf_counter() - start
    return out

  def sft_stage(stage, init_path, examples):
    if sft_method.finished(workdir, stage):
      return False
    return sft_method.train_and_export(_with(c, **{"model.hf_path": init_path}), workdir, stage, examples,
                                       tokenizer, mesh, rules)["stopped"]

  # 1. align-then-fine-tune: SFT on the alignment data, then SFT on the user data.
  align = experiment.load(c, c.reft.alignment)
  if timed_stage("aligned", lambda: sft_stage("aligned", base_path, align)):
    return {"stopped": True, "history": []}
  aligned_path = sft_method.model_dir(workdir, "aligned")
  if timed_stage("sft_aligned", lambda: sft_stage("sft_aligned", aligned_path, user)):
    return {"stopped": True, "history": []}
  # 2. SFT from the base model.
  if timed_stage("sft_base", lambda: sft_stage("sft_base", base_path, user)):
    return {"stopped": True, "history": []}
  # 3. ReFT: teacher -> filter -> student (evaluated inside).
  rc = _with(c, **{"eval.enabled": False})
  out = timed_stage("reft", lambda: reft.run(rc, workdir))
  if out["stopped"]:
    return out
  with open(os.path.join(workdir, "filter", "summary.json")) as f:
    flt = json.load(f)

  # "aligned" (before any user data) is the reference the attack starts from.
  runs = {"aligned": walls["aligned"], "sft_aligned": walls["aligned"] + walls["sft_aligned"],
          "sft_base": walls["sft_base"], "reft": walls["reft"]}
  for name, wall in runs.items():
    stage = "student" if name == "reft" else name
    model = load_hf(sft_method.model_dir(workdir, stage), c.model.param_dtype, mesh, rules=rules)
    extra = {"wall_seconds": wall, "filter": None}
    if name == "reft":
      extra["filter"] = {k: flt[k] for k in ("precision", "recall", "kept_fraction", "tau",
                                             "false_positive_rate")}
    experiment.evaluate_and_record(_with(c, **{"eval.name": name}), workdir, model, tokenizer, mesh, name,
                                   extra)
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  results["base_seconds"] = t_base
  results["total_seconds"] = time.perf_counter() - t0
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2, sort_keys=True)
  table = format_table({k: results["runs"][k] for k in runs})
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(table + "\n")
  plot_results({k: results["runs"][k] for k in runs}, os.path.join(workdir, "results.png"),
               f"Safety world: {c.data.n} user examples, {c.data.p:.0%} harmful ({c.data.attack})")
  return {"stopped": False, "history": [], "results": results, "table": table}


def plot_results(runs: dict[str, dict], path: str, title: str = "") -> str:
  """Bar chart: Harmful Score, Finetune Accuracy per task and over-refusal for each run."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

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
