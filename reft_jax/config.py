"""Config validation (before anything runs) and the RunOptions/optimizer arguments derived from it."""

from __future__ import annotations

import json
import os
import re

import ml_collections

from reft_jax.data.attacks import ATTACKS
from reft_jax.model import PRESETS, LoraConfig, RunOptions
from reft_jax.optim import MODES

METHODS = ("sft", "pretrain", "reft", "demo", "sweep", "analyze", "screen")
BUILD_ALIGNMENT = "build"  # reft.alignment: build a real model's alignment set (methods/alignment.py)


class ConfigError(ValueError):
  pass


def csv_list(s: str, kind=str) -> list:
  """A comma-separated config string -> its non-empty items, converted by `kind`."""
  return [kind(x.strip()) for x in s.split(",") if x.strip()]


def _check(ok: bool, field: str, value, why: str):
  if not ok:
    raise ConfigError(f"config.{field}={value!r}: {why}")


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first bad field."""
  _check(c.method in METHODS, "method", c.method, f"must be one of {METHODS}")
  m, t, d = c.model, c.train, c.data
  _check(bool(m.hf_path) or m.arch in PRESETS, "model.arch", m.arch,
         f"must be one of {tuple(PRESETS)} when model.hf_path is empty")
  if m.hf_path.startswith((".", "/", "~")):  # a local path (anything else may be a hub name)
    _check(os.path.isdir(os.path.expanduser(m.hf_path)), "model.hf_path", m.hf_path,
           "directory does not exist")
  try:
    run_options(c)
  except ValueError as e:
    raise ConfigError(f"config.model/train: {e}") from None
  _check(t.mode in MODES, "train.mode", t.mode, f"must be one of {MODES}")
  if t.mode == "regex":
    _check(bool(t.trainable_regex), "train.trainable_regex", t.trainable_regex,
           "must be set when train.mode=regex")
    try:
      re.compile(t.trainable_regex)
    except re.error as e:
      _check(False, "train.trainable_regex", t.trainable_regex, f"invalid regex ({e})")
  for f in ("lr", "num_steps", "batch_size", "grad_accum"):
    _check(t[f] > 0, f"train.{f}", t[f], "must be positive")
  _check(t.warmup_steps >= 0, "train.warmup_steps", t.warmup_steps, "must be >= 0")
  _check(t.loss_chunk >= 0, "train.loss_chunk", t.loss_chunk, "must be >= 0 (0 = unchunked)")
  _check(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "must be >= 0")
  _check(0 <= t.b1 < 1 and 0 <= t.b2 < 1, "train.b1/b2", (t.b1, t.b2), "must lie in [0, 1)")
  _check(t.schedule in ("constant", "linear", "cosine"), "train.schedule", t.schedule,
         "must be constant, linear or cosine")
  _check(t.batch_size % t.grad_accum == 0, "train.grad_accum", t.grad_accum,
         f"must divide train.batch_size={t.batch_size}")
  _check(d.seq_len >= 8, "data.seq_len", d.seq_len, "must be >= 8")
  buckets(c)
  _check(d.template in ("alpaca", "chat", "none"), "data.template", d.template,
         "must be alpaca, chat or none")
  if d.source == "builtin":
    _check(d.builtin_examples > 0, "data.builtin_examples", d.builtin_examples, "must be positive")
  elif _is_local(d.source):
    _check(os.path.exists(d.source), "data.source", d.source, "file not found")
  _check(d.attack in ("none", *ATTACKS), "data.attack", d.attack, f"must be none or one of {ATTACKS}")
  _check(0 <= d.p <= 1, "data.p", d.p, "must lie in [0, 1]")
  _check(d.n > 0, "data.n", d.n, "must be positive")
  from reft_jax.data.sources import SCHEMAS, parse_fields

  _check(d.schema in SCHEMAS, "data.schema", d.schema, f"must be one of {tuple(SCHEMAS)}")
  try:
    parse_fields(d.fields)
  except ValueError as e:
    _check(False, "data.fields", d.fields, str(e))
  try:
    from reft_jax.data.safety_world import WorldConfig

    WorldConfig(**c.world.to_dict())
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.world: {e}") from None
  r = c.reft
  _check(r.layer >= 0, "reft.layer", r.layer, "must be >= 0 (0 = num_layers // 2)")
  _check(r.lam >= 0 and r.beta >= 0, "reft.lam/beta", (r.lam, r.beta), "must be >= 0")
  _check(r.temperature > 0, "reft.temperature", r.temperature, "must be positive")
  _check(0 <= r.ema_momentum < 1, "reft.ema_momentum", r.ema_momentum, "must lie in [0, 1)")
  _check(r.tau_mode in ("fixed", "calibrated", "fpr"), "reft.tau_mode", r.tau_mode,
         "must be fixed, calibrated or fpr")
  _check(0 <= r.target_fpr < 1, "reft.target_fpr", r.target_fpr, "must lie in [0, 1)")
  _check(0 < r.target_recall <= 1, "reft.target_recall", r.target_recall, "must lie in (0, 1]")
  _check(r.align_seq_len == 0 or r.align_seq_len >= 8, "reft.align_seq_len", r.align_seq_len,
         "must be 0 (= data.seq_len) or >= 8")
  _check(r.probe_size >= 2, "reft.probe_size", r.probe_size, "must be >= 2")
  _check(r.topk >= 0 and r.align_batch_size > 0, "reft.topk/align_batch_size", (r.topk, r.align_batch_size),
         "topk must be >= 0 and align_batch_size positive")
  if r.alignment == BUILD_ALIGNMENT:
    a = c.alignment
    for f in ("harmful", "harmless"):
      _check(bool(a[f]), f"alignment.{f}", a[f], "must name a source when reft.alignment=build")
    _check(a.n_harmful >= 0 and a.n_harmless >= 0, "alignment.n_harmful/n_harmless",
           (a.n_harmful, a.n_harmless), "must be >= 0 (0 = all)")
    _check(a.max_new_tokens > 0, "alignment.max_new_tokens", a.max_new_tokens, "must be positive")
  for f in ("lr", "num_steps", "batch_size"):
    _check(c.teacher[f] > 0, f"teacher.{f}", c.teacher[f], "must be positive")
  _check(c.teacher.batch_size >= 2, "teacher.batch_size", c.teacher.batch_size,
         "must be >= 2 (every batch holds both classes)")
  from reft_jax.methods.suite import METHODS as SUITE

  for section in ("demo", "sweep"):
    names = csv_list(c[section].methods)
    bad = [m for m in names if m not in SUITE]
    _check(bool(names) and not bad, f"{section}.methods", c[section].methods, f"each must be one of {SUITE}")
  try:
    ps = csv_list(c.sweep.p, float)
    seeds = csv_list(c.sweep.seeds, int) + csv_list(c.demo.seeds, int)
  except ValueError:
    _check(False, "sweep.p/seeds, demo.seeds", (c.sweep.p, c.sweep.seeds, c.demo.seeds),
           "must be comma-separated numbers")
  _check(bool(csv_list(c.demo.seeds)) and bool(csv_list(c.sweep.seeds)), "demo.seeds/sweep.seeds",
         (c.demo.seeds, c.sweep.seeds), "must name at least one seed")
  del seeds
  _check(all(0 <= p <= 1 for p in ps), "sweep.p", c.sweep.p, "ratios must lie in [0, 1]")
  _check(c.vaccine.rho >= 0, "vaccine.rho", c.vaccine.rho, "must be >= 0")
  _check(c.booster.lam >= 0 and c.booster.alpha >= 0, "booster.lam/alpha", (c.booster.lam, c.booster.alpha),
         "must be >= 0")
  _check(c.lisa.k_align >= 0 and c.lisa.k_user >= 0 and c.lisa.k_align + c.lisa.k_user > 0,
         "lisa.k_align/k_user", (c.lisa.k_align, c.lisa.k_user), "must be >= 0 and not both 0")
  _check(c.lisa.min_cycles >= 1, "lisa.min_cycles", c.lisa.min_cycles, "must be >= 1")
  rs = c.restore
  _check(0 < rs.rate <= 1, "restore.rate", rs.rate, "must lie in (0, 1]")
  _check(rs.steps >= 1 and 0 <= rs.warmup_steps <= rs.steps, "restore.steps/warmup_steps",
         (rs.steps, rs.warmup_steps), "steps must be >= 1 and 0 <= warmup_steps <= steps")
  _check(0 <= rs.rollback_frac <= 1, "restore.rollback_frac", rs.rollback_frac, "must lie in [0, 1]")
  _check(0 < rs.min_task_ratio <= 1, "restore.min_task_ratio", rs.min_task_ratio, "must lie in (0, 1]")
  _check(0 <= c.mimic.ratio <= 1, "mimic.ratio", c.mimic.ratio, "must lie in [0, 1]")
  _check(0 <= c.screen.max_flagged <= 1, "screen.max_flagged", c.screen.max_flagged, "must lie in [0, 1]")
  # screen.teacher is checked by methods/screen.py:prepare, which main runs first (no import upward here)
  sm = c.smart
  for f in ("lam", "mu", "eps", "sigma", "eta"):
    _check(sm[f] >= 0, f"smart.{f}", sm[f], "must be >= 0")
  _check(0 <= sm.beta < 1, "smart.beta", sm.beta, "must lie in [0, 1)")
  e = c.eval
  _check(0 <= e.drop_overlap <= 1, "eval.drop_overlap", e.drop_overlap, "must lie in [0, 1]")
  _check(e.prompt_style in ("auto", "plain", "aoa"), "eval.prompt_style", e.prompt_style,
         "must be auto, plain or aoa")
  from reft_jax.eval.metrics import FA_MATCHES

  _check(e.fa_match in FA_MATCHES, "eval.fa_match", e.fa_match, f"must be one of {FA_MATCHES}")
  _check(e.task_max_new_tokens >= 0, "eval.task_max_new_tokens", e.task_max_new_tokens,
         "must be >= 0 (0 = eval.max_new_tokens)")
  _check(e.judge in ("keyword", "oracle", "classifier"), "eval.judge", e.judge,
         "must be keyword, oracle or classifier")
  if e.judge == "classifier":
    _check(bool(e.judge_path), "eval.judge_path", e.judge_path, "must be set for eval.judge=classifier")
  try:
    eval_tasks(c)
  except ValueError as err:
    _check(False, "eval.tasks", e.tasks, str(err))
  try:
    eval_harmless_sets(c)
  except ValueError as err:
    _check(False, "eval.harmless_sets", e.harmless_sets, str(err))
  _check(c.checkpoint.every_steps >= 0, "checkpoint.every_steps", c.checkpoint.every_steps,
         "must be >= 0 (0 = only at the end)")
  _check(c.checkpoint.max_to_keep >= 1, "checkpoint.max_to_keep", c.checkpoint.max_to_keep,
         "must be >= 1")
  for f in ("data", "fsdp", "tensor"):
    v = c.mesh[f]
    _check(v == -1 or v >= 1, f"mesh.{f}", v, "must be a positive size or -1 (the rest)")
  import jax

  from reft_jax.sharding import mesh_shape, parse_rules

  try:
    mesh_shape(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, jax.device_count())
  except ValueError as e:
    raise ConfigError(f"config.mesh: {e}") from None
  try:
    parse_rules(c.mesh.rules)
  except ValueError as e:
    raise ConfigError(f"config.mesh.rules={c.mesh.rules!r}: {e}") from None


def _is_local(spec: str) -> bool:
  from reft_jax.data.sources import HUB_SOURCES

  return (not spec.startswith(("hub:", "tfds:", "world:", "asset:", "builtin:"))
          and spec not in (*HUB_SOURCES, "builtin"))


def eval_harmless_sets(c: ml_collections.ConfigDict) -> dict[str, str]:
  """'trigger=builtin:trigger_eval,mix=a+b' -> {'trigger': 'builtin:trigger_eval', 'mix': 'a,b'}: names are
  lower-case identifiers other than the sets' own (harmless, harmful, the tasks); '+' joins sources."""
  out = {}
  for item in csv_list(c.eval.harmless_sets):
    name, sep, spec = (x.strip() for x in item.partition("="))
    if not sep or not re.fullmatch(r"[a-z][a-z0-9_]*", name) or not spec.strip("+"):
      raise ValueError(f"{item!r}: expected <name>=<source> (name: lower-case letters, digits, _)")
    if name in ("harmless", "harmful", "sst2", "agnews", "gsm8k") or name in out:
      raise ValueError(f"{item!r}: the name {name!r} is taken (harmless, harmful, the tasks, or repeated)")
    out[name] = ",".join(s.strip() for s in spec.split("+") if s.strip())
  return out


def eval_tasks(c: ml_collections.ConfigDict) -> dict[str, str]:
  """'sst2=world:sst2_test,gsm8k=gsm8k_test' -> {'sst2': 'world:sst2_test', 'gsm8k': 'gsm8k_test'}."""
  out = {}
  for item in csv_list(c.eval.tasks):
    task, sep, source = item.partition("=")
    if not sep or task.strip() not in ("sst2", "agnews", "gsm8k") or not source.strip():
      raise ValueError(f"{item!r}: expected <sst2|agnews|gsm8k>=<source>")
    out[task.strip()] = source.strip()
  return out


def buckets(c: ml_collections.ConfigDict) -> tuple[int, ...]:
  try:
    out = tuple(csv_list(c.data.buckets, int))
  except ValueError:
    raise ConfigError(f"config.data.buckets={c.data.buckets!r}: expected comma-separated lengths") from None
  if any(b < 8 for b in out):
    raise ConfigError(f"config.data.buckets={c.data.buckets!r}: lengths must be >= 8")
  return out


def run_options(c: ml_collections.ConfigDict) -> RunOptions:
  lora = None
  if c.train.mode == "lora":
    targets = tuple(csv_list(c.train.lora_targets))
    lora = LoraConfig(rank=c.train.lora_rank, alpha=c.train.lora_alpha, targets=targets)
  return RunOptions(dtype=c.model.dtype, param_dtype=c.model.param_dtype,
                    scan_layers=c.model.scan_layers, remat=c.model.remat, lora=lora,
                    attention=c.model.attention)


def dump(c: ml_collections.ConfigDict, workdir: str) -> str:
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  with open(path, "w") as f:
    json.dump(c.to_dict(), f, indent=2, sort_keys=True)
  return path
