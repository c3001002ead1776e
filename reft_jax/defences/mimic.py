"""Mimic-format safety data (Eiras et al., ICLR 2025): fine-tuning from the aligned model on the user data
plus safety examples rewritten into the user task's format (data/attacks.py:mimic_safety); data only,
the LM loss."""

from __future__ import annotations

from reft_jax.config import check
from reft_jax.data.attacks import mimic_safety
from reft_jax.defences.registry import Defence, register
from reft_jax.defences.sft import aligned_stage
from reft_jax.stages import Env, StageSpec


def finetune(env: Env, root: str, start: str, user) -> StageSpec:
  refusals = [e for e in env.load(env.c.reft.alignment) if e.meta.get("is_harmful")]
  safety = mimic_safety(refusals, user, env.c.mimic.ratio, seed=env.c.seed)
  return StageSpec("mimic", env.tokenize(user + safety), init=start)


def _validate(c):
  check(0 <= c.mimic.ratio <= 1, "mimic.ratio", c.mimic.ratio, "must lie in [0, 1]")


MIMIC = register(
  Defence(
    "mimic",
    "SFT on the user data mixed with safety data in the user task's format",
    finetune=finetune,
    align=aligned_stage,
    section="mimic",
    defaults={"ratio": 0.05},
    validate=_validate,
    source="Eiras et al., ICLR 2025",
  )
)
