"""Every method of the comparison as (alignment stage, fine-tuning stage) on shared models, used by
the demo and the sweep. Shared stages (base, aligned models, the ReFT teacher) live in `shared_dir`
and are reused across cells (p, seed); per-cell stages live in the cell's workdir.

  sft_base     base --SFT(user)-->
  sft_aligned  base --SFT(align)--> aligned --SFT(user)-->
  vaccine      base --Vaccine(align)--> --SFT(user)-->
  booster      base --Booster(align, harmful)--> --SFT(user)-->
  lisa         aligned --Lisa(user, align)-->
  mimic        aligned --SFT(user + safety data in the user's format)-->
  smart        aligned --SMART(user): CE + adversarial smoothness + proximal to a momentum copy-->
  restore      sft_aligned's model, a small share of weights restored toward the aligned model
  reft         base --teacher(align)--> filter(user) --> base --SFT(kept) + KL(teacher, align)-->
"""

from __future__ import annotations

import dataclasses
import os

from reft_jax import experiment
from reft_jax.data import attacks, sft
from reft_jax.losses import make_lm_loss
from reft_jax.methods import baselines, reft
from reft_jax.model import save_hf
from reft_jax.optim import trainable_labels

METHODS = ("sft_base", "sft_aligned", "vaccine", "booster", "lisa", "mimic", "restore", "reft", "smart")


def with_updates(c, **updates):
  """A copy of the config with dotted-key updates."""
  c = c.copy_and_resolve_references()
  for key, value in updates.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


model_dir, finished = experiment.model_dir, experiment.finished


class Stopped(Exception):
  """A stage was interrupted by SIGTERM/SIGINT (its checkpoint is saved)."""


@dataclasses.dataclass
class Env:
  c: object
  mesh: object
  rules: object
  tokenizer: object
  base_path: str
  shared_dir: str


def _tok(env, examples):
  return sft.tokenize(examples, env.tokenizer, env.c.data.seq_len, env.c.data.template)


def train(env: Env, root: str, stage: str, init_path: str, data, loss_fn=None, **kw) -> str:
  """One training stage from the model at init_path; exports root/<stage>/model (skipped if there).
  loss_fn defaults to the LM loss (chunked as train.loss_chunk says)."""
  loss_fn = loss_fn or make_lm_loss(env.c.train.loss_chunk)
  if not finished(root, stage):
    c = with_updates(env.c, **{"model.hf_path": init_path})
    model = experiment.build_model(c, env.mesh, env.rules, env.tokenizer)
    model, _, stopped, _ = experiment.train_stage(c, root, stage, model, data, loss_fn, env.mesh,
                                                  env.rules, **kw)
    if stopped:
      raise Stopped(stage)
    save_hf(model, model_dir(root, stage), env.tokenizer)
  return model_dir(root, stage)


def alignment(env: Env) -> list:
  return experiment.load(env.c, env.c.reft.alignment)


def aligned(env: Env, how: str = "sft") -> str:
  """The base model aligned on the alignment data by sft, vaccine or booster (shared). Every alignment
  stage trains with the ReFT teacher's optimisation (teacher.*: lr, steps, batch, warm-up), so all defences
  get one alignment budget (the published protocol's alignment lr/epochs, not the fine-tuning ones)."""
  env = dataclasses.replace(env, c=with_updates(env.c, **{f"train.{k}": v for k, v in env.c.teacher.items()}))
  c = env.c
  stage = "aligned" if how == "sft" else f"aligned_{how}"
  align = _tok(env, alignment(env))
  if how == "sft":
    return train(env, env.shared_dir, stage, env.base_path, align)
  if how == "vaccine":
    return train(env, env.shared_dir, stage, env.base_path, align, baselines.vaccine_loss(c.vaccine.rho))
  # Booster's harmful set must not be the attack's: the official code draws it from BeaverTails rows
  # 5000-9999 and the attack from rows 0-..., so the defence never sees the attack's prompts.
  harmful_examples = experiment.load(c, c.booster.harmful_source)
  if c.data.attack != "none":
    from reft_jax.config import ConfigError
    from reft_jax.data.assets import overlap

    shared = sorted({i for i, _ in overlap(harmful_examples, experiment.load(c, c.data.harmful_source))})
    if shared:
      raise ConfigError(
          f"config.booster.harmful_source={c.booster.harmful_source!r} shares {len(shared)} prompt(s) with "
          f"the attack's pool config.data.harmful_source={c.data.harmful_source!r} (e.g. "
          f"{harmful_examples[shared[0]].prompt[:60]!r}); Booster's harmful set must be disjoint from it")
  harmful = _tok(env, harmful_examples)
  data = sft.MixedBatcher({"align": sft.Batcher(align, c.train.batch_size, seed=c.seed),
                           "harmful": sft.Batcher(harmful, c.train.batch_size, seed=c.seed + 3)})
  return train(env, env.shared_dir, stage, env.base_path, data,
               baselines.booster_loss(c.booster.lam, c.booster.alpha, c.train.mode, c.train.trainable_regex))


def _params(env: Env, path: str) -> dict:
  """The parameters of the model at `path`, sharded on the env's mesh (for a method's extra state)."""
  model = experiment.build_model(with_updates(env.c, **{"model.hf_path": path}), env.mesh, env.rules,
                                 env.tokenizer)
  return experiment.split_model(model)[1]


def lisa(env: Env, root: str, user) -> str:
  """The aligned model fine-tuned with Lisa: K_a/K_f scaled to the run in the published ratio
  (baselines.lisa_cycle); the proximal anchors cover the trained parameters only."""
  import logging

  c = env.c
  start = aligned(env)
  if finished(root, "lisa"):
    return model_dir(root, "lisa")
  lc = c.lisa
  k_align, k_user = baselines.lisa_cycle(lc.k_align, lc.k_user, c.train.num_steps, lc.min_cycles)
  logging.getLogger(__name__).info("lisa: K_a/K_f = %d/%d (configured %d/%d, %d steps, min_cycles %d)",
                                   k_align, k_user, lc.k_align, lc.k_user, c.train.num_steps, lc.min_cycles)
  data = sft.MixedBatcher({"user": sft.Batcher(_tok(env, user), c.train.batch_size, seed=c.seed),
                           "align": sft.Batcher(_tok(env, alignment(env)), c.train.batch_size,
                                                seed=c.seed + 5)})
  params = _params(env, start)
  labels = trainable_labels(params, c.train.mode, c.train.trainable_regex)
  extras, before_step = baselines.lisa_state(params, labels, k_align, k_user,
                                             lc.proximal_warmup * c.train.num_steps)
  del params
  return train(env, root, "lisa", start, data, baselines.lisa_loss(lc.rho), extras=extras,
               before_step=before_step)


def smart(env: Env, root: str, user) -> str:
  """The aligned model fine-tuned with SMART; the momentum copy covers the trained parameters only."""
  c, s = env.c, env.c.smart
  start = aligned(env)
  if finished(root, "smart"):
    return model_dir(root, "smart")
  params = _params(env, start)
  labels = trainable_labels(params, c.train.mode, c.train.trainable_regex)
  extras, before_step = baselines.smart_state(params, labels, s.beta, c.seed)
  del params
  loss = baselines.smart_loss(s.lam, s.eps, s.sigma, s.eta, s.mu)
  return train(env, root, "smart", start, _tok(env, user), loss, extras=extras, before_step=before_step)


def mimic(env: Env, root: str, user) -> str:
  c = env.c
  refusals = [e for e in alignment(env) if e.meta.get("is_harmful")]
  safety = attacks.mimic_safety(refusals, user, c.mimic.ratio, seed=c.seed)
  return train(env, root, "mimic", aligned(env), _tok(env, user + safety))


def restore(env: Env, root: str, user) -> tuple[str, dict]:
  """Post-hoc restoration of the align-then-fine-tune model toward the aligned one (the official
  algorithm, methods/restore.py): the benign direction comes from up to 256 benign user prompts (the
  official task training prompts); the task metric for the restart rule and the checkpoint choice is
  the finetune accuracy on 64 labelled benign user examples."""
  from reft_jax import refusal
  from reft_jax.eval.metrics import percent, task_correct
  from reft_jax.generate import generate_texts
  from reft_jax.methods.restore import RestoreConfig, restore_safety
  from reft_jax.model import load_hf

  c = env.c
  if finished(root, "restore"):
    return model_dir(root, "restore"), {}
  load = lambda path: load_hf(path, c.model.param_dtype, env.mesh, rules=env.rules)
  aligned_model = load(aligned(env))
  finetuned = load(run_method("sft_aligned", env, root, user)[0])
  probes = experiment.load(c, c.reft.probe_harmful, c.reft.probe_size)
  harmful = refusal.tokenize_prompts(probes, env.tokenizer, c.data.seq_len, c.data.template)
  plain = [e for e in user if not e.meta.get("is_harmful")]
  benign = (refusal.tokenize_prompts(plain[:256], env.tokenizer, c.data.seq_len, c.data.template)
            if plain else None)
  labelled = [e for e in plain if "label" in e.meta][:64]
  metric = None
  if labelled:
    prompts = [sft.format_prompt(e, c.data.template, env.tokenizer) for e in labelled]

    def metric(model):
      answers = generate_texts(model, env.tokenizer, prompts, batch_size=c.eval.batch_size,
                               max_new_tokens=c.eval.task_max_new_tokens or c.eval.max_new_tokens)
      return percent(task_correct(e.meta.get("task", "sst2"), a, str(e.meta["label"]), c.eval.fa_match)
                     for e, a in zip(labelled, answers))

  r = c.restore
  cfg = RestoreConfig(rate=r.rate, steps=r.steps, warmup_steps=r.warmup_steps, rollback_frac=r.rollback_frac,
                      min_task_ratio=r.min_task_ratio)
  model, report = restore_safety(aligned_model, finetuned, harmful, cfg, metric, benign)
  save_hf(model, model_dir(root, "restore"), env.tokenizer)
  keys = ("edited_layers", "per_step", "restored_weights", "rolled_back", "restarted", "checkpoint",
          "task_before", "task_warmup", "task_after")
  return model_dir(root, "restore"), {"restore": {k: report.get(k) for k in keys}}


def run_method(name: str, env: Env, root: str, user) -> tuple[str, dict]:
  """Trains `name` on the user data; returns (final model dir, extra result fields)."""
  if name == "sft_base":
    return train(env, root, "sft_base", env.base_path, _tok(env, user)), {}
  if name == "sft_aligned":
    return train(env, root, "sft_aligned", aligned(env), _tok(env, user)), {}
  if name in ("vaccine", "booster"):
    return train(env, root, name, aligned(env, name), _tok(env, user)), {}
  if name == "lisa":
    cycle = baselines.lisa_cycle(env.c.lisa.k_align, env.c.lisa.k_user, env.c.train.num_steps,
                                 env.c.lisa.min_cycles)
    return lisa(env, root, user), {"lisa": dict(zip(("k_align", "k_user"), cycle))}
  if name == "mimic":
    return mimic(env, root, user), {}
  if name == "smart":
    return smart(env, root, user), {}
  if name == "restore":
    return restore(env, root, user)
  if name == "reft":
    c = with_updates(env.c, **{"model.hf_path": env.base_path, "eval.enabled": False})
    out = reft.run(c, root, teacher_dir=env.shared_dir)
    if out["stopped"]:
      raise Stopped("reft")
    import json

    with open(os.path.join(root, "filter", "summary.json")) as f:
      flt = json.load(f)
    keys = ("precision", "recall", "kept_fraction", "tau", "false_positive_rate")
    return out["model_dir"], {"filter": {k: flt[k] for k in keys}}
  raise ValueError(f"method {name!r} is not one of {METHODS}")
