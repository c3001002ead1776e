"""The defence registry: one `Defence` per method, read by config validation, the suite, the planner,
the CLI and the docs. A defence is a recipe over the stage runner:

  align     (optional) the alignment stage from the base model, shared by every cell of a run (its
            stage name is its identity: defences that align alike share it)
  finetune  the stage on the user's data, from the aligned model (or the base model when there is no
            alignment stage; a defence may start from another model, e.g. ReFT's student from the base)
  posthoc   (optional) a step after fine-tuning that needs no training loop (e.g. restoration)

Registering a new defence is one file: its loss (over the shared train step), its stages, its config
section with the published defaults, and its validation; nothing else in the package changes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import ml_collections

from reft_jax.data.sft import Example
from reft_jax.stages import Env, StageSpec, run_stage


@dataclasses.dataclass(frozen=True)
class Defence:
  name: str
  summary: str  # one line: what it does (CLI help and docs)
  finetune: Callable[[Env, str, str, list[Example]], StageSpec]  # (env, root, start model dir, user data)
  align: Callable[[Env], StageSpec] | None = None
  posthoc: Callable[[Env, str, str, str, list[Example]], tuple[str, dict]] | None = None
  # (env, root, aligned model dir, fine-tuned model dir, user data) -> (final model dir, results fields)
  section: str = ""  # its config section (c.<section>); "" = none
  defaults: dict = dataclasses.field(default_factory=dict)  # that section's published defaults
  validate: Callable[[ml_collections.ConfigDict], None] | None = None  # raises config.ConfigError
  source: str = ""  # the paper and official code it follows (docs/FIDELITY.md has the details)


REGISTRY: dict[str, Defence] = {}


def register(defence: Defence) -> Defence:
  """Adds a defence (a module-level call: importing its file registers it); returns it."""
  if defence.name in REGISTRY and REGISTRY[defence.name] is not defence:
    raise ValueError(f"defence {defence.name!r} is already registered")
  REGISTRY[defence.name] = defence
  return defence


def get(name: str) -> Defence:
  if name not in REGISTRY:
    raise ValueError(f"defence {name!r} is not one of {names()}")
  return REGISTRY[name]


def names() -> tuple[str, ...]:
  return tuple(REGISTRY)


def sections() -> dict[str, dict]:
  """{section: published defaults} of every registered defence with a config section."""
  return {d.section: d.defaults for d in REGISTRY.values() if d.section}


def run_defence(env: Env, root: str, name: str, user: list[Example]) -> tuple[str, dict]:
  """Runs `name` on the user data: its alignment stage (in env.shared_dir, reused when finished), its
  fine-tuning stage (in root) and its post-hoc step. Returns (final model dir, results.json fields)."""
  d = get(name)
  aligned = run_stage(env, env.shared_dir, d.align(env)).model_dir if d.align else env.base_path
  spec = d.finetune(env, root, aligned, user)
  path, record = run_stage(env, root, spec).model_dir, dict(spec.record)
  if d.posthoc:
    path, more = d.posthoc(env, root, aligned, path, user)
    record.update(more)
  return path, record
