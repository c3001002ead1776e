"""Every defence, one module each, registered on import (defences/registry.py)."""

from reft_jax.defences import (  # noqa: F401
  antidote,
  booster,
  guardrail,
  lisa,
  mimic,
  panacea,
  reft,
  restore,
  safelora,
  sft,
  smart,
  tvaccine,
  vaccine,
)
from reft_jax.defences.registry import REGISTRY, Defence, get, names, register, run_defence, sections

__all__ = ["REGISTRY", "Defence", "get", "names", "register", "run_defence", "sections"]
