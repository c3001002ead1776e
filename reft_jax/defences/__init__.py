"""Every defence, one module each, registered on import (defences/registry.py)."""

from reft_jax.defences import booster, guardrail, lisa, mimic, reft, restore, sft, smart, vaccine  # noqa: F401
from reft_jax.defences.registry import REGISTRY, Defence, get, names, register, run_defence, sections

__all__ = ["REGISTRY", "Defence", "get", "names", "register", "run_defence", "sections"]
