"""Defences on shared models: one defence alone (`--config.method=<defence>`), or every (defence, p, seed)
cell of the demo and the sweep. Shared stages (the base model, alignment stages, the ReFT teacher) live in
the workdir and are reused by every cell and every rerun; a cell's own stages live in its directory.

  sft_base     base --SFT(user)-->
  sft_aligned  base --SFT(align)--> aligned --SFT(user)-->
  vaccine      base --Vaccine(align)--> --SFT(user)-->
  booster      base --Booster(align, harmful)--> --SFT(user)-->
  lisa         aligned --Lisa(user, align)-->
  mimic        aligned --SFT(user + safety data in the user's format)-->
  smart        aligned --SMART(user): CE + adversarial smoothness + proximal to a momentum copy-->
  restore      sft_aligned's model, a small share of weights restored toward the aligned model
  tvaccine     base --T-Vaccine(align: Vaccine on sampled safety-critical layers)--> --SFT(user)-->
  panacea      aligned --SFT(user) + an adaptive harmful perturbation eps--> w + eps
  safelora     sft_aligned's model, each layer's update projected onto the aligned-minus-base subspace
  antidote     aligned --SFT(user)--> the weights most important on harmful data pruned (Wanda score)
  guardrail    aligned --SFT(user data a moderation judge lets through)-->
  reft         base --teacher(align)--> filter(user) --> base --SFT(kept) + KL(teacher, align)-->
"""

from __future__ import annotations

import csv
import json
import os
import time

from reft_jax import distributed as dist
from reft_jax.config import with_updates
from reft_jax.data.load import get_tokenizer, read_examples
from reft_jax.defences import run_defence
from reft_jax.defences.sft import aligned_stage
from reft_jax.eval.record import evaluate_and_record
from reft_jax.model import save_hf
from reft_jax.model.build import build_model, load_frozen, setup_mesh
from reft_jax.pipelines import train as train_pipeline
from reft_jax.stages import Env, finished, model_dir, run_stage, stage_seconds


def ensure_base(c, workdir: str, mesh, rules) -> str:
  """model.hf_path, or the safety world's base model pretrained into workdir/base."""
  if c.model.hf_path:
    return c.model.hf_path
  pc = with_updates(
    c,
    **{
      "method": "pretrain",
      "data.source": "world:pretrain",
      "data.attack": "none",
      "train.num_steps": c.demo.pretrain_steps,
      "train.batch_size": 32,
      "train.lr": 3e-3,
      "train.warmup_steps": 30,
      "model.arch": c.demo.arch,
    },
  )
  if not finished(workdir, "base"):
    examples = read_examples(pc)
    tokenizer = get_tokenizer(pc, workdir, examples)
    train_pipeline.train_and_export(pc, workdir, "base", examples, tokenizer, mesh, rules, loss_on="all")
  return model_dir(workdir, "base")


def evaluate(env: Env, c, workdir: str, name: str, model_path: str, extra: dict) -> dict:
  model = load_frozen(c, model_path, env.mesh, env.rules)
  return evaluate_and_record(
    with_updates(c, **{"eval.name": name}), workdir, model, env.tokenizer, env.mesh, name, extra
  )


def run_one(c, workdir: str) -> dict:
  """`--config.method=<defence>`: that defence alone on the configured user data, from model.hf_path (on the
  safety world without one: the world's base model pretrained into workdir/base, as the demo does; else a
  random init of model.arch): its alignment stage, its fine-tuning stage, evaluation (eval.enabled) and
  results.json, in the same stages the demo and the sweep run."""
  start = time.perf_counter()
  mesh, rules = setup_mesh(c)
  user = read_examples(c)
  if c.model.hf_path or c.data.source.startswith("world:"):  # the safety world: its pretrained base, as the demo
    base = ensure_base(c, workdir, mesh, rules)
    tokenizer = get_tokenizer(with_updates(c, **{"model.hf_path": base}), workdir, [])
  else:
    base, tokenizer = model_dir(workdir, "base"), get_tokenizer(c, workdir, user)
    if not finished(workdir, "base"):
      save_hf(build_model(c, mesh, rules, tokenizer), base, tokenizer)
  c = with_updates(c, **{"model.hf_path": base})
  env = Env(c, mesh, rules, tokenizer, base, workdir)
  path, record = run_defence(env, workdir, c.method, user)
  out = {"model_dir": path}
  if c.eval.enabled:
    extra = {
      "filter": None,
      **record,
      "wall_seconds": time.perf_counter() - start,
      "stage_seconds": stage_seconds(workdir),
      "method": c.method,
    }
    out["results"] = evaluate(env, c, workdir, c.eval.name or c.method, path, extra)
  return out


def compare(
  c, workdir: str, methods: list[str], ps: list[float], seeds: list[int], *, cell_dirs: bool, reference: bool = False
) -> dict:
  """Trains and evaluates every (method, p, seed); returns results.json's content."""
  t0 = time.perf_counter()
  mesh, rules = setup_mesh(c)
  base_path = ensure_base(c, workdir, mesh, rules)
  t_base = time.perf_counter() - t0
  c = with_updates(c, **{"model.hf_path": base_path})
  env = Env(c, mesh, rules, get_tokenizer(c, workdir, []), base_path, workdir)
  if reference:  # the aligned model before any user data
    start = time.perf_counter()
    path = run_stage(env, workdir, aligned_stage(env)).model_dir
    evaluate(env, c, workdir, "aligned", path, {"wall_seconds": time.perf_counter() - start, "filter": None})
  for seed in seeds:
    for p in ps:
      cell_c = with_updates(c, **{"data.p": p, "seed": seed})
      env.c = cell_c
      user = read_examples(cell_c)
      for method in methods:
        name = f"{method}|p={p:g}|seed={seed}" if cell_dirs else method
        root = os.path.join(workdir, f"p{p:g}_seed{seed}") if cell_dirs else workdir
        start = time.perf_counter()
        path, extra = run_defence(env, root, method, user)
        extra = {
          "filter": None,
          **extra,
          "wall_seconds": time.perf_counter() - start,
          "stage_seconds": stage_seconds(workdir, root),
          "method": method,
          "p": p,
          "seed": seed,
        }
        evaluate(env, cell_c, workdir, name, path, extra)
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  results["base_seconds"] = t_base
  results["total_seconds"] = time.perf_counter() - t0
  if dist.is_primary():
    write_json(os.path.join(workdir, "results.json"), results)
  dist.barrier("compare")
  return results


def write_table(workdir: str, stem: str, markdown: str, rows: list | None = None) -> None:
  """workdir/<stem>.md (and <stem>.csv from rows): a suite's table, as the README quotes it."""
  with open(os.path.join(workdir, f"{stem}.md"), "w") as f:
    f.write(markdown + "\n")
  if rows is not None:
    with open(os.path.join(workdir, f"{stem}.csv"), "w", newline="") as f:
      csv.writer(f).writerows(rows)


def write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
