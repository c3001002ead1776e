"""Lisa (Huang et al., NeurIPS 2024; git-disl/Lisa trainer.py LisaTrainer): lazy safety alignment.

Fine-tuning from the aligned model alternates K_a alignment and K_f user steps (alignment first; both
scaled down in their ratio when the run is short, `lisa_cycle`), each with (rho/2)||w - w~||^2 over the
trained parameters to the weights the other state ended with (off for the first 10% of steps).
"""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp
from flax import nnx

from reft_jax.config import check
from reft_jax.data import sft
from reft_jax.defences.registry import Defence, register
from reft_jax.defences.sft import aligned_stage
from reft_jax.losses import batch_cross_entropy
from reft_jax.optim import trainable_copy, trainable_labels
from reft_jax.stages import Env, MethodState, StageSpec
from reft_jax.train import split_model

log = logging.getLogger(__name__)


def lisa_loss(rho: float):
  """batch = {"user", "align"}; ctx.extras: "align_phase" (1 = alignment state), "prox_on", and
  "anchor" (the weights the other state ended with, for the parameters being trained)."""

  def loss(model, batch, ctx):
    phase = ctx.extras["align_phase"]
    # Only the active state's batch is computed (lax.cond runs one branch).
    total, count = jax.lax.cond(
      phase > 0, lambda: batch_cross_entropy(model, batch["align"]), lambda: batch_cross_entropy(model, batch["user"])
    )
    count = jnp.maximum(count, 1)
    params = nnx.to_pure_dict(nnx.state(model))
    anchor = ctx.extras["anchor"]
    sq = jax.tree.map(lambda p, a: jnp.sum(jnp.square(p.astype(jnp.float32) - a)), _subset(params, anchor), anchor)
    prox = 0.5 * rho * sum(jax.tree.leaves(sq)) * ctx.extras["prox_on"]
    return total + prox * count, count, {"proximal": prox, "align_phase": phase.astype(jnp.float32)}

  return loss


def _subset(params: dict, like: dict) -> dict:
  """The entries of `params` at the paths present in `like`."""
  return {k: (_subset(params[k], v) if isinstance(v, dict) else params[k]) for k, v in like.items()}


def lisa_schedule(k_align: int, k_user: int):
  """Step -> 1 in the alignment state, 0 in the user state: K_a alignment steps, then K_f user steps
  (the official LisaTrainer starts in the alignment state and switches on a per-state clock)."""
  period = k_align + k_user

  def phase(step: int) -> int:
    return int(period > 0 and step % period < k_align)

  return phase


def lisa_cycle(k_align: int, k_user: int, num_steps: int, min_cycles: int) -> tuple[int, int]:
  """The (K_a, K_f) a run of num_steps uses. The published ones (100/900) when the run holds
  min_cycles full cycles of them (the official scripts run 2,000-20,000 steps: 2-20 cycles);
  otherwise both scaled down in the published ratio, so that a short run still alternates min_cycles
  times rather than running one cycle.

  The exact ratio when a multiple of its smallest integer form fits min_cycles times (300 steps:
  7/63); below that, the nearest split of the longest period that fits, each state >= 1 step."""
  period = k_align + k_user
  if k_align == 0 or k_user == 0 or num_steps >= min_cycles * period:
    return k_align, k_user  # one state only, or the published cycle already repeats enough
  g = math.gcd(k_align, k_user)
  m = num_steps // (min_cycles * (period // g))
  if m >= 1:
    return m * (k_align // g), m * (k_user // g)
  p = max(2, num_steps // min_cycles)
  ka = min(p - 1, max(1, round(p * k_align / period)))
  return ka, p - ka


def lisa_state(params: dict, labels: dict, k_align: int, k_user: int, prox_after: float) -> MethodState:
  """Method state for lisa_loss, as the official LisaTrainer: entering a state (and at step 0)
  snapshots the trained parameters, i.e. the weights the other state ended with, as the proximal
  anchor; the proximal term is on for steps > prox_after (official: steps > 10% of the run)."""
  part = lambda p: trainable_copy(p, labels)
  phase_of = lisa_schedule(k_align, k_user)
  extras = {
    "anchor": part(params),
    "align_phase": jnp.asarray(phase_of(0), jnp.int32),
    "prox_on": jnp.asarray(0.0, jnp.float32),
  }

  def before_step(step, state):
    phase = phase_of(step)
    extras = dict(state.extras)
    if step == 0 or phase != int(extras["align_phase"]):
      extras["anchor"] = part(state.params)
    extras["align_phase"] = jnp.asarray(phase, jnp.int32)
    extras["prox_on"] = jnp.asarray(float(step > prox_after), jnp.float32)
    return state.replace(extras=extras)

  return MethodState(extras, before_step=before_step)


def finetune(env: Env, root: str, start: str, user) -> StageSpec:
  c, lc = env.c, env.c.lisa
  k_align, k_user = lisa_cycle(lc.k_align, lc.k_user, c.train.num_steps, lc.min_cycles)
  log.info(
    "lisa: K_a/K_f = %d/%d (configured %d/%d, %d steps, min_cycles %d)",
    k_align,
    k_user,
    lc.k_align,
    lc.k_user,
    c.train.num_steps,
    lc.min_cycles,
  )
  data = sft.MixedBatcher(
    {
      "user": sft.Batcher(env.tokenize(user), c.train.batch_size, seed=c.seed),
      "align": sft.Batcher(env.tokenize(env.load(c.reft.alignment)), c.train.batch_size, seed=c.seed + 5),
    }
  )

  def setup(model):
    params = split_model(model)[1]
    labels = trainable_labels(params, c.train.mode, c.train.trainable_regex)
    return lisa_state(params, labels, k_align, k_user, lc.proximal_warmup * c.train.num_steps)

  return StageSpec(
    "lisa",
    data,
    init=start,
    loss=lisa_loss(lc.rho),
    setup=setup,
    record={"lisa": {"k_align": k_align, "k_user": k_user}},
  )


def _validate(c):
  lc = c.lisa
  check(
    lc.k_align >= 0 and lc.k_user >= 0 and lc.k_align + lc.k_user > 0,
    "lisa.k_align/k_user",
    (lc.k_align, lc.k_user),
    "must be >= 0 and not both 0",
  )
  check(lc.min_cycles >= 1, "lisa.min_cycles", lc.min_cycles, "must be >= 1")


LISA = register(
  Defence(
    "lisa",
    "fine-tuning that alternates alignment and user states with a proximal term",
    finetune=finetune,
    align=aligned_stage,
    section="lisa",
    # K_a/K_f as published; a run shorter than min_cycles * (K_a + K_f) steps scales both down in the
    # published ratio so that it still alternates min_cycles times (Lisa's script: 20,000 steps = 20
    # cycles; Booster's Lisa runs: 2,000 steps = 2 cycles).
    defaults={"k_align": 100, "k_user": 900, "rho": 1.0, "proximal_warmup": 0.1, "min_cycles": 4},
    validate=_validate,
    source="Huang et al., NeurIPS 2024; git-disl/Lisa",
  )
)
