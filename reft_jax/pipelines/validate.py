"""Config validation before anything runs: every section's validator, beside the code that reads it."""

from __future__ import annotations

import ml_collections

from reft_jax import defences
from reft_jax.config import check, validate_core
from reft_jax.data.load import validate_data
from reft_jax.defences.reft_filter import validate_filter
from reft_jax.eval.record import validate_eval
from reft_jax.model.build import validate_model
from reft_jax.pipelines import demo, robustness, screen

# What --config.method runs besides a single defence (defences.names()).
PIPELINES = ("sft", "pretrain", "demo", "sweep", "robustness", "analyze", "screen")


def methods() -> tuple[str, ...]:
  return (*PIPELINES, *defences.names())


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises config.ConfigError naming the first bad field."""
  check(c.method in methods(), "method", c.method, f"must be one of {methods()}")
  validate_model(c)
  validate_core(c)
  validate_data(c)
  for d in defences.REGISTRY.values():
    if d.validate:
      d.validate(c)
  validate_filter(c)  # the reft section's filter fields, beside the filter (defences/reft_filter.py)
  demo.validate(c)
  robustness.validate(c)
  screen.validate(c)
  validate_eval(c)
