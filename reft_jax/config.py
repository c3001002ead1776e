"""The config's shared vocabulary: its error, list and dotted-update helpers, and the core sections'
validation (train, checkpoint, mesh). Every other section is validated beside the code that reads it
(model/build.py, data/load.py, eval/record.py, each defence, each pipeline); pipelines/validate.py runs
them all."""

from __future__ import annotations

import json
import os
import re

import ml_collections
from flax import traverse_util

from reft_jax.files import write_atomic
from reft_jax.optim import MODES

BUILD_ALIGNMENT = "build"  # reft.alignment: build a real model's alignment set (pipelines/alignment.py)

# resume_policy: what a rerun does when its config differs from workdir/config.json in a field that changes
# results while the workdir holds finished stages or checkpoints. strict: refuse; reuse: go on, reusing them.
RESUME_POLICIES = ("strict", "reuse")
# Fields (sections or dotted keys) a rerun may change freely: they change how a run is logged, checkpointed,
# laid out on devices or batched for generation, never what it trains (checkpoints restore across meshes).
# `method` too: one workdir holds several defences' runs, which share stages by design (README "Running").
FREE_FIELDS = (
  "log",
  "checkpoint",
  "mesh",
  "plan",
  "compile_cache",
  "resume_policy",
  "eval.batch_size",
  "eval.name",
  "method",
  # Which cells a suite runs: each cell derives its own config, so adding defences, attacks, seeds or the
  # attacker's settings to a finished suite adds cells (a rerun skips the recorded ones) and changes none.
  "demo.methods",
  "demo.seeds",
  "sweep",
  "robustness",
)


class ConfigError(ValueError):
  pass


def csv_list(s: str, kind=str) -> list:
  """A comma-separated config string -> its non-empty items, converted by `kind`."""
  return [kind(x.strip()) for x in s.split(",") if x.strip()]


def check(ok: bool, field: str, value, why: str):
  """Raises ConfigError naming config.<field> and its value unless ok."""
  if not ok:
    raise ConfigError(f"config.{field}={value!r}: {why}")


def with_updates(c: ml_collections.ConfigDict, **updates) -> ml_collections.ConfigDict:
  """A copy of the config with dotted-key updates ("train.lr"=1e-4)."""
  c = c.copy_and_resolve_references()
  for key, value in updates.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def validate_core(c: ml_collections.ConfigDict) -> None:
  """train, checkpoint and mesh."""
  t = c.train
  check(t.mode in MODES, "train.mode", t.mode, f"must be one of {MODES}")
  if t.mode == "regex":
    check(bool(t.trainable_regex), "train.trainable_regex", t.trainable_regex, "must be set when train.mode=regex")
    try:
      re.compile(t.trainable_regex)
    except re.error as e:
      check(False, "train.trainable_regex", t.trainable_regex, f"invalid regex ({e})")
  for f in ("lr", "num_steps", "batch_size", "grad_accum"):
    check(t[f] > 0, f"train.{f}", t[f], "must be positive")
  check(t.warmup_steps >= 0, "train.warmup_steps", t.warmup_steps, "must be >= 0")
  check(t.loss_chunk >= -1, "train.loss_chunk", t.loss_chunk, "must be >= -1 (0 = unchunked, -1 = auto)")
  check(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "must be >= 0")
  check(0 <= t.b1 < 1 and 0 <= t.b2 < 1, "train.b1/b2", (t.b1, t.b2), "must lie in [0, 1)")
  check(
    t.schedule in ("constant", "linear", "cosine"), "train.schedule", t.schedule, "must be constant, linear or cosine"
  )
  check(
    t.batch_size % t.grad_accum == 0, "train.grad_accum", t.grad_accum, f"must divide train.batch_size={t.batch_size}"
  )
  check(
    c.checkpoint.every_steps >= 0,
    "checkpoint.every_steps",
    c.checkpoint.every_steps,
    "must be >= 0 (0 = only at the end)",
  )
  check(c.resume_policy in RESUME_POLICIES, "resume_policy", c.resume_policy, f"must be one of {RESUME_POLICIES}")
  check(c.checkpoint.max_to_keep >= 1, "checkpoint.max_to_keep", c.checkpoint.max_to_keep, "must be >= 1")
  for f in ("data", "fsdp", "tensor"):
    v = c.mesh[f]
    check(v == -1 or v >= 1, f"mesh.{f}", v, "must be a positive size or -1 (the rest)")
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


def dump(c: ml_collections.ConfigDict, workdir: str) -> str:
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  write_atomic(path, json.dumps(c.to_dict(), indent=2, sort_keys=True))
  return path


def read_saved(workdir: str) -> dict | None:
  """workdir/config.json (None when there is none); ValueError in one line when it does not parse."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: not a readable config ({e}); restore it or move it away") from None
  if not isinstance(saved, dict):
    raise ValueError(f"{path}: not a config (a JSON object expected); restore it or move it away")
  return saved


def differences(saved: dict, current: ml_collections.ConfigDict) -> list[str]:
  """'field: saved -> current' for every field outside FREE_FIELDS whose value differs. A field only one side
  has (added or removed by a code change since) is not compared: its value there is unknown."""
  now = traverse_util.flatten_dict(json.loads(json.dumps(current.to_dict())), sep=".")  # JSON's types, as saved
  then = traverse_util.flatten_dict(saved, sep=".")
  free = lambda k: any(k == f or k.startswith(f + ".") for f in FREE_FIELDS)
  return [
    f"{k}: {then[k]!r} -> {now[k]!r}" for k in sorted(now.keys() & then.keys()) if not free(k) and now[k] != then[k]
  ]
