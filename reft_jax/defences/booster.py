"""Booster (Huang et al., ICLR 2025; git-disl/Booster trainer.py BoosterAlignmentTrainer): attenuating
harmful perturbation at alignment time.

Alignment stage: f(w) + lam [h(w) - h(w - alpha grad h / ||grad h||)], f the alignment loss, h the loss
on a harmful set disjoint from the attack's; the shift and its norm cover only the trained parameters.
Fine-tuning: plain SFT from the boosted model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from reft_jax.config import check
from reft_jax.data import sft
from reft_jax.defences.registry import Defence, register
from reft_jax.defences.sft import aligned_stage, disjoint_harmful_set, user_sft
from reft_jax.losses import batch_cross_entropy
from reft_jax.optim import trainable_view
from reft_jax.stages import Env, StageSpec

# Added to a gradient norm before dividing by it, as the official Booster trainer does.
NORM_EPS = 1e-7


def booster_loss(lam: float, alpha: float, mode: str = "full", regex: str = ""):
  """batch = {"align": harmful prompt -> refusal (and harmless -> helpful), "harmful": harmful
  prompt -> harmful answer}. Gradient: grad f + lam (grad h(w) - grad h(w')), w' = w - alpha g_h/|g_h|.

  As in the official BoosterAlignmentTrainer, g_h, its norm and the shift cover only the parameters
  being trained (`mode`/`regex` as train.mode/trainable_regex): in LoRA mode the frozen base weights
  stay where they are in w'."""

  def loss(model, batch, ctx=None):
    f_sum, f_n = batch_cross_entropy(model, batch["align"])
    part, with_part = trainable_view(model, mode, regex)

    def h_mean(p):
      s, n = batch_cross_entropy(with_part(p), batch["harmful"])
      return s / jnp.maximum(n, 1)

    h_now, g_h = jax.lax.stop_gradient(jax.value_and_grad(h_mean)(part))
    g_norm = optax.global_norm(g_h)
    # w' as a function of w with a constant shift, so this term's gradient is grad h(w').
    shifted = jax.tree.map(lambda p, g: p - (alpha / (g_norm + NORM_EPS)) * g.astype(p.dtype), part, g_h)
    h_after = h_mean(shifted)
    # grad h(w) is g_h, already computed: a term with h(w)'s value and g_h as its gradient spares a
    # third harmful forward/backward pass.
    h_lin = h_now + sum(
      jnp.vdot(g.astype(jnp.float32), (p - jax.lax.stop_gradient(p)).astype(jnp.float32))
      for g, p in zip(jax.tree.leaves(g_h), jax.tree.leaves(part))
    )
    f_n = jnp.maximum(f_n, 1)
    total = f_sum + lam * (h_lin - h_after) * f_n
    return total, f_n, {"harmful_loss": h_now, "harmful_loss_after_step": h_after, "harmful_grad_norm": g_norm}

  return loss


def harmful_set(env: Env) -> list[sft.Example]:
  """booster.harmful_source (official: BeaverTails rows 5000-9999, the attack's from 0), disjoint from the
  attack's pool (checked)."""
  return disjoint_harmful_set(env, "booster")


def align(env: Env) -> StageSpec:
  c, batch = env.c, env.c.teacher.batch_size  # the alignment budget (sft.alignment_budget)
  align_set = env.tokenize(env.load(c.reft.alignment))
  harmful = env.tokenize(harmful_set(env))
  data = sft.MixedBatcher(
    {"align": sft.Batcher(align_set, batch, seed=c.seed), "harmful": sft.Batcher(harmful, batch, seed=c.seed + 3)}
  )
  loss = booster_loss(c.booster.lam, c.booster.alpha, c.train.mode, c.train.trainable_regex)
  return aligned_stage(env, "aligned_booster", loss, data)


def _validate(c):
  check(
    c.booster.lam >= 0 and c.booster.alpha >= 0, "booster.lam/alpha", (c.booster.lam, c.booster.alpha), "must be >= 0"
  )
  check(bool(c.booster.harmful_source), "booster.harmful_source", c.booster.harmful_source, "must name a source")


BOOSTER = register(
  Defence(
    "booster",
    "alignment that attenuates the harmful perturbation, then SFT on the user data",
    finetune=user_sft("booster"),
    align=align,
    section="booster",
    # Booster's harmful set is disjoint from the attack's pool (official: another BeaverTails index range).
    defaults={"lam": 5.0, "alpha": 0.1, "harmful_source": "world:harmful_pool[500:1000]"},
    validate=_validate,
    source="Huang et al., ICLR 2025; git-disl/Booster",
  )
)
