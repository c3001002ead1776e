"""The references every defence is compared with, and the alignment stage they share.

sft_base     base --SFT(user)-->                          (no defence: the attack's full effect)
sft_aligned  base --SFT(align)--> aligned --SFT(user)-->  (align-then-fine-tune, the field's baseline)
"""

from __future__ import annotations

from reft_jax.config import ConfigError
from reft_jax.defences.registry import Defence, register
from reft_jax.stages import Env, StageSpec


def alignment_budget(env: Env) -> dict:
  """Every alignment stage (aligned / Vaccine / Booster / the ReFT teacher) trains with teacher.* (lr,
  steps, batch, warm-up): one alignment budget for all defences, the published protocol's alignment
  lr/epochs rather than the fine-tuning ones."""
  return env.c.teacher.to_dict()


def aligned_stage(env: Env, name: str = "aligned", loss=None, data=None) -> StageSpec:
  """The base model trained on the alignment data (reft.alignment): SFT, or `loss` over `data`."""
  if data is None:
    data = env.tokenize(env.load(env.c.reft.alignment))
  return StageSpec(name, data, init=env.base_path, loss=loss, train=alignment_budget(env))


def disjoint_harmful_set(env: Env, section: str, limit: int = 0) -> list:
  """c.<section>.harmful_source (up to `limit` rows), the defence's own harmful examples, refused when it
  shares a prompt with the attack's pool: the official Booster / T-Vaccine / Panacea / Antidote code draws
  them from BeaverTails rows the attack never uses, so a defence never sees the attack's prompts."""
  c, spec = env.c, env.c[section].harmful_source
  examples = env.load(spec, limit)
  if c.data.attack != "none":
    from reft_jax.data.overlap import overlap

    shared = sorted({i for i, _ in overlap(examples, env.load(c.data.harmful_source))})
    if shared:
      raise ConfigError(
        f"config.{section}.harmful_source={spec!r} shares {len(shared)} prompt(s) with the attack's pool "
        f"config.data.harmful_source={c.data.harmful_source!r} (e.g. {examples[shared[0]].prompt[:60]!r}); "
        f"{section}'s harmful set must be disjoint from it"
      )
  if not examples:
    raise ConfigError(f"config.{section}.harmful_source={spec!r}: no examples")
  return examples


def user_sft(name: str):
  """The fine-tuning stage of the plain-SFT defences: the LM loss on the user data from `start`."""

  def finetune(env: Env, root: str, start: str, user) -> StageSpec:
    return StageSpec(name, env.tokenize(user).trimmed(), init=start)

  return finetune


SFT_BASE = register(
  Defence("sft_base", "SFT on the user data from the base model (no defence)", finetune=user_sft("sft_base"))
)
SFT_ALIGNED = register(
  Defence(
    "sft_aligned",
    "SFT on alignment data, then SFT on the user data",
    finetune=user_sft("sft_aligned"),
    align=aligned_stage,
  )
)
