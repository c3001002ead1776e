"""Panacea (Wang et al., NeurIPS 2025; w-yibo/Panacea trainer.py `Panacea`, train.py): an adaptive
perturbation optimised during fine-tuning and added to the fine-tuned model before it is released.

Fine-tuning from the aligned model on the user data, with a harmful set h disjoint from the attack's:

  max_w max_{||eps|| <= rho}  lam [h(w + eps) - h(w)] - g(w)        g: the user (fine-tuning) loss

Each step (official `Panacea.training_step.step_eps`): the inner max in closed form,
eps = rho grad h(w) / (||grad h(w)|| + 1e-7) (one norm over all trained parameters: the LoRA adapters
under LoRA, as the official `requires_grad` set); then the weights are updated with
grad g(w) - lam [grad min(h(w + eps), cap) - grad h(w)] (eps a constant; the official clamps
h(w + eps) at 5 before its backward pass). eps is recomputed every step, never accumulated; the last
step's eps is added to the trained weights at the end (train.py: `param.data += epsilon[name]`), so the
exported model is w_T + eps_T.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import optax
from flax import nnx, traverse_util

from reft_jax import distributed as dist
from reft_jax.config import check
from reft_jax.data import sft
from reft_jax.defences.registry import Defence, register
from reft_jax.defences.sft import aligned_stage, disjoint_harmful_set
from reft_jax.files import write_atomic
from reft_jax.losses import batch_cross_entropy
from reft_jax.optim import trainable_view, overlay, trainable_copy, trainable_labels
from reft_jax.stages import Env, MethodState, StageSpec
from reft_jax.train import split_model

# Added to the harmful gradient's norm before dividing by it, as the official Panacea trainer does.
NORM_EPS = 1e-7
# The extras key (and the aux key the loss hands it over in) of the current perturbation.
EPSILON = "panacea_epsilon"


def panacea_epsilon(g_h: dict, rho: float) -> dict:
  """The inner maximiser: rho g_h / (||g_h|| + 1e-7), one global norm over the tree."""
  scale = rho / (optax.global_norm(g_h) + NORM_EPS)
  return jax.tree.map(lambda g: g * scale.astype(g.dtype), g_h)


def add_epsilon(params: dict, eps: dict) -> dict:
  """params with eps added at eps's paths (a trainable subset), in each parameter's dtype."""
  flat = traverse_util.flatten_dict(params)
  shifted = {k: flat[k].astype(jnp.float32) + e.astype(jnp.float32) for k, e in traverse_util.flatten_dict(eps).items()}
  return overlay(params, traverse_util.unflatten_dict(shifted))


def panacea_loss(lam: float, rho: float, cap: float = 5.0, mode: str = "full", regex: str = ""):
  """batch = {"user": the user's data, "harmful": harmful prompt -> harmful answer}. Gradient:
  grad g(w) - lam [grad min(h(w + eps), cap) - grad h(w)], eps = panacea_epsilon(grad h(w), rho) over the
  parameters being trained (`mode`/`regex` as train.mode/trainable_regex); cap <= 0: no clamp.

  aux[EPSILON] is eps (a tree, not a metric): panacea_state's `update` moves it into the method state."""

  def loss(model, batch, ctx=None):
    g_sum, g_n = batch_cross_entropy(model, batch["user"])
    part, with_part = trainable_view(model, mode, regex)

    def h_mean(p):
      s, n = batch_cross_entropy(with_part(p), batch["harmful"])
      return s / jnp.maximum(n, 1)

    h_now, g_h = jax.lax.stop_gradient(jax.value_and_grad(h_mean)(part))
    eps = panacea_epsilon(g_h, rho)
    # w + eps as a function of w with a constant eps, so this term's gradient is grad h(w + eps).
    h_pert = h_mean(add_epsilon(part, eps))
    # torch.clamp(max=cap): no gradient once h(w + eps) exceeds the cap (the official backward pass).
    h_clamped = jnp.minimum(h_pert, cap) if cap > 0 else h_pert
    # grad h(w) is g_h, already computed: a term with h(w)'s value and g_h as its gradient spares a third
    # harmful forward/backward pass (as booster_loss).
    h_lin = h_now + sum(
      jnp.vdot(g.astype(jnp.float32), (p - jax.lax.stop_gradient(p)).astype(jnp.float32))
      for g, p in zip(jax.tree.leaves(g_h), jax.tree.leaves(part))
    )
    g_n = jnp.maximum(g_n, 1)
    # Minimising g - lam (h(w + eps) - h(w)) is the outer max of the objective above.
    total = g_sum - lam * (h_clamped - h_lin) * g_n
    aux = {
      "user_loss": g_sum / g_n,
      "harmful_loss": h_now,
      "harmful_loss_perturbed": h_pert,
      "harmful_grad_norm": optax.global_norm(g_h),
      "epsilon_norm": optax.global_norm(eps),
      EPSILON: jax.tree.map(lambda e: e.astype(jnp.float32), eps),
    }
    return total, g_n, aux

  return loss


def panacea_state(params: dict, labels: dict) -> MethodState:
  """Method state for panacea_loss: extras[EPSILON] = the last step's eps over the trained parameters
  (zeros before the first step), float32; checkpointed with the run, so a resumed stage exports the same."""
  extras = {EPSILON: jax.tree.map(lambda x: x * 0, trainable_copy(params, labels))}

  def update(extras, aux):
    aux = dict(aux)
    return {**extras, EPSILON: aux.pop(EPSILON)}, aux

  return MethodState(extras, update=update)


def apply_epsilon(model, eps: dict) -> None:
  """Adds eps to the model's parameters in place (the official `param.data += epsilon[name]`)."""
  state = nnx.state(model)
  nnx.replace_by_pure_dict(state, add_epsilon(nnx.to_pure_dict(state), eps))
  nnx.update(model, state)


def harmful_set(env: Env) -> list[sft.Example]:
  """panacea.harmful_source (official: BeaverTails rows 5001-5999, `poison_data_start=5000`, `bad_sample_num`
  1000; the attack's from 0), disjoint from the attack's pool (checked)."""
  return disjoint_harmful_set(env, "panacea")


def finetune(env: Env, root: str, start: str, user) -> StageSpec:
  c, pc = env.c, env.c.panacea
  name = "panacea"
  # The official harmful loader draws batches of 10, the fine-tuning batch of its scripts: one size here.
  data = sft.MixedBatcher(
    {
      "user": sft.Batcher(env.tokenize(user), c.train.batch_size, seed=c.seed),
      "harmful": sft.Batcher(env.tokenize(harmful_set(env)), c.train.batch_size, seed=c.seed + 7),
    }
  )
  report = os.path.join(root, name, "panacea.json")
  record = {"panacea": {"rho": pc.rho, "lam": pc.lam}}
  if os.path.exists(report):  # a finished stage is reused without `finish`: its record comes from the file
    with open(report) as f:
      record["panacea"] = json.load(f)

  def setup(model):
    params = split_model(model)[1]
    return panacea_state(params, trainable_labels(params, c.train.mode, c.train.trainable_regex))

  def finish(model, extras):
    eps = extras[EPSILON]
    apply_epsilon(model, eps)  # the released model is w_T + eps_T
    record["panacea"] = {"rho": pc.rho, "lam": pc.lam, "epsilon_norm": float(optax.global_norm(eps))}
    if dist.is_primary():
      os.makedirs(os.path.dirname(report), exist_ok=True)
      write_atomic(report, json.dumps(record["panacea"], indent=2))

  loss = panacea_loss(pc.lam, pc.rho, pc.harmful_loss_cap, c.train.mode, c.train.trainable_regex)
  return StageSpec(name, data, init=start, loss=loss, setup=setup, finish=finish, record=record)


def _validate(c):
  pc = c.panacea
  for f in ("lam", "rho"):
    check(pc[f] >= 0, f"panacea.{f}", pc[f], "must be >= 0")
  check(pc.harmful_loss_cap >= 0, "panacea.harmful_loss_cap", pc.harmful_loss_cap, "must be >= 0 (0 = no clamp)")
  check(bool(pc.harmful_source), "panacea.harmful_source", pc.harmful_source, "must name a source")


PANACEA = register(
  Defence(
    "panacea",
    "fine-tuning that learns an adaptive perturbation raising the harmful loss, added to the released model",
    finetune=finetune,
    align=aligned_stage,
    section="panacea",
    # script/finetune/panacea_gsm8k.sh: lamb 0.001, eps_rho 1; trainer.py clamps h(w + eps) at 5. The harmful
    # set is disjoint from the attack's pool (official: another BeaverTails index range, as Booster's).
    defaults={"lam": 0.001, "rho": 1.0, "harmful_loss_cap": 5.0, "harmful_source": "world:harmful_pool[500:1000]"},
    validate=_validate,
    source="Wang et al., NeurIPS 2025; w-yibo/Panacea",
  )
)
