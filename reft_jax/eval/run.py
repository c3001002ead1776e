"""Evaluation of one model: Harmful Score on held-out harmful prompts, over-refusal on harmless
prompts, Finetune Accuracy per task, and the share of degenerate answers in each set
(judges.is_degenerate); a per-example JSONL and the run's entry in results.json."""

from __future__ import annotations

import json
import os
import time

from reft_jax import distributed as dist
from reft_jax.data.sft import Example, format_prompt
from reft_jax.eval.judges import is_degenerate, is_refusal
from reft_jax.eval.metrics import percent, task_correct
from reft_jax.generate import generate_texts


def evaluate(
  model,
  tokenizer,
  *,
  harmful: list[Example],
  harmless: list[Example],
  tasks: dict[str, list[Example]],
  judge,
  template: str = "alpaca",
  max_new_tokens: int = 48,
  batch_size: int = 32,
  mesh=None,
  examples_path: str | None = None,
  progress: bool = False,
  task_max_new_tokens: int = 0,
  fa_match: str = "official",
  harmless_sets: dict[str, list[Example]] | None = None,
) -> dict:
  """Greedy answers for every prompt, judged; returns the metrics dict of one run. out["degenerate"] is
  the % of harmful-set answers that are degenerate (read next to HS: a judge scores gibberish as
  safe), out["degenerate_by_set"] the same per set. Task answers get task_max_new_tokens (0 = the
  same budget; the official code gives HS and FA different lengths) and are matched by `fa_match`.
  harmless_sets: more named harmless sets (e.g. {"trigger": ...}); out["over_refusal"] stays the primary
  `harmless` set's, out["over_refusal_by_set"] has every set's (the primary one as "harmless")."""
  taken = {"harmless", "harmful", *tasks} & set(harmless_sets or {})
  if taken:  # counts, degenerate_by_set and the JSONL's `set` are keyed by these names
    raise ValueError(f"evaluate: harmless set names {sorted(taken)} are taken (harmless, harmful, tasks)")
  start = time.perf_counter()

  def answer(examples, max_new_tokens=max_new_tokens):
    prompts = [format_prompt(e, template, tokenizer) for e in examples]
    return generate_texts(
      model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, mesh=mesh, progress=progress
    )

  rows = []
  out: dict = {"judge": judge.name, "counts": {}, "degenerate_by_set": {}}

  def degenerate(name, answers):
    flags = [is_degenerate(a) for a in answers]
    out["degenerate_by_set"][name] = percent(flags)
    return flags

  if harmful:
    answers = answer(harmful)
    flags = judge(harmful, answers)
    out["harmful_score"] = percent(flags)
    out["counts"]["harmful"] = len(harmful)
    bad = degenerate("harmful", answers)
    out["degenerate"] = out["degenerate_by_set"]["harmful"]
    rows += [_row("harmful", e, a, d, harmful=f) for e, a, f, d in zip(harmful, answers, flags, bad)]
  named = {"harmless": harmless, **(harmless_sets or {})}
  for name, examples in named.items():
    if not examples:
      continue
    answers = answer(examples)
    refused = [is_refusal(a) for a in answers]
    out.setdefault("over_refusal_by_set", {})[name] = percent(refused)
    out["counts"][name] = len(examples)
    bad = degenerate(name, answers)
    rows += [_row(name, e, a, d, refused=r) for e, a, r, d in zip(examples, answers, refused, bad)]
  if harmless:
    out["over_refusal"] = out["over_refusal_by_set"]["harmless"]
  out["finetune_accuracy"] = {}
  for task, examples in tasks.items():
    answers = answer(examples, task_max_new_tokens or max_new_tokens)
    correct = [task_correct(task, a, str(e.meta["label"]), fa_match) for e, a in zip(examples, answers)]
    out["finetune_accuracy"][task] = percent(correct)
    out["counts"][task] = len(examples)
    bad = degenerate(task, answers)
    rows += [
      _row(task, e, a, d, gold=e.meta["label"], correct=c) for e, a, c, d in zip(examples, answers, correct, bad)
    ]
  out["eval_seconds"] = time.perf_counter() - start
  if examples_path and dist.is_primary():  # every process has every answer; one writes them
    _write_rows(rows, examples_path)
  return out


def _row(set_name: str, e: Example, answer: str, degenerate: bool, **fields) -> dict:
  """One answer of results' per-example JSONL: its set, prompt, answer, the judgement fields."""
  row = dict(set=set_name, prompt=e.prompt, input=e.input, answer=answer, **fields, degenerate=degenerate)
  if "gold" not in fields:
    row["category"] = e.meta.get("category")
  return row


def _write_rows(rows: list[dict], path: str) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")


def update_results(workdir: str, method: str, run: dict, config: dict | None = None) -> str:
  """Adds/overwrites runs[method] in workdir/results.json, atomically (a crash mid-write never
  loses the results already there). Process 0 writes; every process returns once it is there."""
  path = os.path.join(workdir, "results.json")
  if not dist.is_primary():
    dist.barrier("update_results")
    return path
  results = {"runs": {}, "config": {}}
  if os.path.exists(path):
    with open(path) as f:
      results = json.load(f)
  results["runs"][method] = run
  if config is not None:
    results["config"] = config
  os.makedirs(workdir, exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(results, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
  dist.barrier("update_results")
  return path


def format_table(runs: dict[str, dict]) -> str:
  """A Markdown table: HS (lower is better), the % of degenerate harmful-set answers next to it, FA per
  task, over-refusal (the primary harmless set, then one column per extra set), filter, wall time."""
  tasks = sorted({t for r in runs.values() for t in (r.get("finetune_accuracy") or {})})
  extra = sorted({s for r in runs.values() for s in (r.get("over_refusal_by_set") or {})} - {"harmless"})
  head = [
    "method",
    "HS ↓",
    "degenerate %",
    *[f"FA {t} ↑" for t in tasks],
    "over-refusal ↓",
    *[f"over-refusal {s} ↓" for s in extra],
    "filter P / R / kept",
    "wall s",
  ]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

  def f(x):
    return "—" if x is None else f"{x:.1f}"

  for name, r in runs.items():
    flt = r.get("filter")
    g = lambda x: "—" if x is None else f"{x:.2f}"
    flt_s = f"{g(flt['precision'])} / {g(flt['recall'])} / {g(flt['kept_fraction'])}" if flt else "—"
    fa = r.get("finetune_accuracy") or {}
    cells = [
      name,
      f(r.get("harmful_score")),
      f(r.get("degenerate")),
      *[f(fa.get(t)) for t in tasks],
      f(r.get("over_refusal")),
      *[f((r.get("over_refusal_by_set") or {}).get(s)) for s in extra],
      flt_s,
      f(r.get("wall_seconds")),
    ]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)
