"""The robustness table: defences x attacks x seeds, and the hyper-parameter attacker.

  reft-jax --config=configs/default.py:robustness --workdir=runs/robustness

Every (attack, attacker setting, seed, defence) cell trains on shared stages (the base model, alignment
stages, the ReFT teacher: trained once in the workdir) and is evaluated; a rerun skips the cells already in
results.json. Attacks (robustness.attacks): any data.attack (harmful_mix, benign: p = 0, aoa, aoa_task), and
`adaptive`: the harmful_mix upload with every harmful prompt optimised against ReFT's filter (white box: the
shared teacher, its layer, R and tau) while keeping its training gradient (data/adaptive.py, Virus's dual
objective; settings adaptive.*), written once per seed to WORKDIR/adaptive/seed<seed>/user.jsonl with the
filter's recall before and after in summary.json. Every defence then trains on that same upload.
`adaptive_guard`: the same attack aimed at the guardrail defence's guard instead (the shared aligned model
answering each prompt, a refusal flags it; adaptive.guard="target": GCG's target CE of the harmful answer's
opening on that model), in WORKDIR/adaptive_guard/seed<seed>/ with the guard's recall before and after.
Either takes the attacker's budget as `@steps` (`adaptive@0,adaptive@5,adaptive@20`: GCG steps per prompt,
adaptive.steps without it), each budget its own upload and column; with two or more budgets of one attack,
robustness_budget.md / .png give the guard's recall, the gradient similarity and each defence's HS by budget.

The hyper-parameter attacker (robustness.lrs / epochs / ranks; TamperBench's protocol): the user picks the
fine-tuning learning rate, the number of epochs (multiples of train.num_steps) and the LoRA rank. For each
defence and attack it reports the **maximum HS over the attacker's settings whose FA dropped by at most
robustness.max_fa_drop points** against the defence's FA under the provider's default setting (train.*)
— both averaged over the seeds the settings share. The default setting is always part of the grid. The
table covers every cell recorded in results.json for robustness.methods x attacks, whichever command ran it:
a grid run on harmful_mix alone, or on fewer seeds, adds to the table a later run of all attacks writes.

Writes robustness.md / robustness.csv (defence x attack: HS and FA at the default setting, mean [95%
interval over seeds], and the attacker's maximum with the setting that reached it) and robustness.png.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import time

import numpy as np

from reft_jax import distributed as dist
from reft_jax.config import check, csv_list, with_updates
from reft_jax.data import adaptive, sources
from reft_jax.data.attacks import ATTACKS
from reft_jax.data.formats import write_jsonl
from reft_jax.data.load import get_tokenizer, read_examples
from reft_jax.defences import get as get_defence
from reft_jax.defences import names as defence_names
from reft_jax.defences import run_defence
from reft_jax.defences.reft import choose_tau, recorded_layer
from reft_jax.model.build import load_frozen, setup_mesh
from reft_jax.pipelines.robustness_report import (
  ADAPTIVE,
  ADAPTIVE_TARGETS,
  DEFAULT,
  adaptive_kind,
  budget_table,
  plot,
  plot_budgets,
  robustness_table,
)
from reft_jax.pipelines.suite import ensure_base, evaluate, write_json, write_table
from reft_jax.stages import Env, run_stage


def settings(c) -> list[tuple[str, dict]]:
  """The attacker's grid as (name, config overrides); the provider's default first, named "default"."""
  r, t = c.robustness, c.train
  lrs = csv_list(r.lrs, float) or [t.lr]
  epochs = csv_list(r.epochs, float) or [1.0]
  ranks = csv_list(r.ranks, int) if t.mode == "lora" else []
  out = [(DEFAULT, {})]
  for lr, ep, rank in itertools.product(lrs, epochs, ranks or [t.lora_rank]):
    over = {}
    if lr != t.lr:
      over["train.lr"] = lr
    if ep != 1:
      over["train.num_steps"] = max(1, round(ep * t.num_steps))
    if rank != t.lora_rank:
      over["train.lora_rank"] = rank
    if over:
      name = ",".join(f"{k.removeprefix('train.')}={v:g}" for k, v in over.items())
      out.append((name, over))
  return out


def cell_name(method: str, attack: str, setting: str, seed: int) -> str:
  return f"{method}|{attack}|{setting}|seed={seed}"


def run(c, workdir: str) -> dict:
  r = c.robustness
  methods, attacks, seeds = csv_list(r.methods), csv_list(r.attacks), csv_list(r.seeds, int)
  grid = settings(c)
  t0 = time.perf_counter()
  mesh, rules = setup_mesh(c)
  base = ensure_base(c, workdir, mesh, rules)
  c = with_updates(c, **{"model.hf_path": base})
  env = Env(c, mesh, rules, get_tokenizer(c, workdir, []), base, workdir)
  done = _recorded(workdir)
  for attack in attacks:
    for seed in seeds:
      data_attack = "harmful_mix" if adaptive_kind(attack) else attack
      data_c = with_updates(
        c, **{"data.attack": data_attack, "seed": seed, **({"data.p": 0.0} if attack == "benign" else {})}
      )
      user = read_examples(data_c)
      if adaptive_kind(attack):
        env.c = data_c
        user = adaptive_upload(env, workdir, user, seed, attack)
      for setting, over in grid:
        cell_c = with_updates(data_c, **over)
        env.c = cell_c
        for method in methods:
          name = cell_name(method, attack, setting, seed)
          if name in done:
            continue
          root = os.path.join(workdir, attack, setting, f"seed{seed}")
          start = time.perf_counter()
          path, record = run_defence(env, root, method, user)
          extra = {"filter": None, **record, "wall_seconds": time.perf_counter() - start}
          extra.update(method=method, attack=attack, setting=setting, overrides=over, seed=seed, p=cell_c.data.p)
          evaluate(env, cell_c, workdir, name, path, extra)
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  table = robustness_table(results["runs"], methods, attacks, r.max_fa_drop)
  results["summary"] = table["summary"]
  results["total_seconds"] = time.perf_counter() - t0
  if dist.is_primary():
    write_json(os.path.join(workdir, "results.json"), results)
    write_table(workdir, "robustness", table["markdown"], table["rows"])
    budgets = budget_table(workdir, table["summary"], methods, attacks)
    if budgets:
      write_table(workdir, "robustness_budget", budgets["markdown"], budgets["rows"])
      plot_budgets(budgets["series"], os.path.join(workdir, "robustness_budget.png"))
      print(budgets["markdown"])
    plot(table["summary"], methods, attacks, os.path.join(workdir, "robustness.png"))
    print(table["markdown"])
  dist.barrier("robustness")
  return {"results": results}


def adaptive_upload(env: Env, workdir: str, user: list, seed: int, attack: str = ADAPTIVE) -> list:
  """The upload with its harmful prompts optimised against ReFT's filter (attack "adaptive": the shared
  teacher, trained here if no cell has yet) or the guardrail's guard ("adaptive_guard": the shared aligned
  model), at `attack`'s budget ("adaptive@20": 20 GCG steps); cached in workdir/<attack>/seed<seed>/
  (user.jsonl, then summary.json)."""
  c = env.c
  out = os.path.join(workdir, attack, f"seed{seed}")
  path = os.path.join(out, "user.jsonl")
  if os.path.exists(os.path.join(out, "summary.json")):  # written last: the attack finished
    return sources.load_source(path)
  kind, steps = adaptive_kind(attack)
  target = ADAPTIVE_TARGETS[kind]
  if target == "feature":
    teacher_dir = run_stage(env, env.shared_dir, get_defence("reft").align(env)).model_dir
    guard = load_frozen(c, teacher_dir, env.mesh, env.rules)
    r = np.load(os.path.join(os.path.dirname(teacher_dir), "refusal_direction.npy"))
    layer = recorded_layer(teacher_dir)
    tau = choose_tau(c, guard, r, env.tokenizer, layer, env.mesh)
  else:  # the guardrail defence's guard: guardrail.path, or the aligned model it fine-tunes from
    guard_dir = c.guardrail.path or run_stage(env, env.shared_dir, get_defence("guardrail").align(env)).model_dir
    guard, r, layer, tau = load_frozen(c, guard_dir, env.mesh, env.rules), None, 0, 0.0
  student = load_frozen(c, env.base_path, env.mesh, env.rules)
  budget = {} if steps is None else {"steps": steps}
  config = adaptive.AttackConfig(
    **{**c.adaptive.to_dict(), **budget}, guard=target, template=c.data.template, seq_len=c.data.seq_len
  )
  start = time.perf_counter()
  result = adaptive.optimise_prompts(
    user, guard, student, env.tokenizer, r, layer, tau, config, seed, progress=dist.is_primary()
  )
  attacked = [e for e in result.examples if e.meta.get("adaptive")]
  originals = [e for e, new in zip(user, result.examples) if new.meta.get("adaptive")]
  summary = {"guard": target, "attacked": len(attacked), **_recalls(env, guard, originals, attacked, target, tau)}
  summary.update(tau=float(tau), layer=layer, seconds=time.perf_counter() - start, config=dataclasses.asdict(config))
  if dist.is_primary():
    write_jsonl(result.examples, path)
    write_json(os.path.join(out, "summary.json"), summary)
  dist.barrier(kind)
  return result.examples


def _recalls(env: Env, guard, originals: list, attacked: list, target: str, tau: float) -> dict:
  """The guard's recall on the harmful prompts before and after the attack: the filter's score >= tau, or
  (target) the guard model refusing them as the guardrail defence asks it (guardrail.refusal_scores)."""
  mean = lambda xs: float(np.mean(xs)) if len(xs) else None
  sims = mean([e.meta["gradient_similarity"] for e in attacked])
  if target == "feature":
    before = np.asarray([e.meta["filter_score_before"] for e in attacked])
    after = np.asarray([e.meta["filter_score_after"] for e in attacked])
    return {"recall_before": mean(before >= tau), "recall_after": mean(after >= tau), "mean_gradient_similarity": sims}
  from reft_jax.defences.guardrail import refusal_scores

  c = env.c
  flag = lambda exs: refusal_scores(
    guard, env.tokenizer, exs, c.data.template, c.guardrail.max_new_tokens, c.eval.batch_size, env.mesh
  )[0]
  ce = lambda key: mean([e.meta[key] for e in attacked])
  return {
    "recall_before": mean(flag(originals)) if originals else None,
    "recall_after": mean(flag(attacked)) if attacked else None,
    "mean_target_ce_before": ce("target_ce_before"),
    "mean_target_ce_after": ce("target_ce_after"),
    "mean_gradient_similarity": sims,
  }


def _recorded(workdir: str) -> set[str]:
  path = os.path.join(workdir, "results.json")
  if not os.path.exists(path):
    return set()
  with open(path) as f:
    return set(json.load(f).get("runs", {}))


def validate(c) -> None:
  r = c.robustness
  bad = [m for m in csv_list(r.methods) if m not in defence_names()]
  check(
    bool(csv_list(r.methods)) and not bad, "robustness.methods", r.methods, f"each must be one of {defence_names()}"
  )
  attacks = (*ATTACKS, *ADAPTIVE_TARGETS)
  bad = [a for a in csv_list(r.attacks) if a not in ATTACKS and not adaptive_kind(a)]
  check(
    bool(csv_list(r.attacks)) and not bad,
    "robustness.attacks",
    r.attacks,
    f"each must be one of {attacks}, an adaptive one optionally with its budget (adaptive@20)",
  )
  if any(adaptive_kind(a) for a in csv_list(r.attacks)):
    try:
      adaptive.AttackConfig(**c.adaptive.to_dict())
    except (TypeError, ValueError) as e:
      check(False, "adaptive", c.adaptive.to_dict(), str(e))
  try:
    lrs, epochs, ranks, seeds = (
      csv_list(r.lrs, float),
      csv_list(r.epochs, float),
      csv_list(r.ranks, int),
      csv_list(r.seeds, int),
    )
  except ValueError:
    check(
      False, "robustness.lrs/epochs/ranks/seeds", (r.lrs, r.epochs, r.ranks, r.seeds), "must be comma-separated numbers"
    )
  check(
    all(x > 0 for x in lrs + epochs + ranks),
    "robustness.lrs/epochs/ranks",
    (r.lrs, r.epochs, r.ranks),
    "must be positive",
  )
  check(bool(seeds), "robustness.seeds", r.seeds, "must name at least one seed")
  check(r.max_fa_drop >= 0, "robustness.max_fa_drop", r.max_fa_drop, "must be >= 0")
