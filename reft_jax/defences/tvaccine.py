"""T-Vaccine (Liu et al. 2024, arXiv 2410.09760; Lslland/T-Vaccine trainer.py BaseTrainer, the `mesfa`
optimizer): Vaccine restricted to safety-critical layers.

Alignment stage. Every `reweight_every` steps (official --probability_steps 200) one harmful example
(prompt + harmful answer) gives each layer's gradient norm ||dL/d attn_out_l||, and a layer's sampling
probability is its share of their sum. Every `resample_every` steps (--lisa_interval_steps 20) `layers`
layers (--lisa_activated_layers 8) are drawn without replacement with those probabilities. Each step is
Vaccine's two passes on the selected layers only: eps_l = rho g_l / ||g_S|| (one norm over the selected
layers), zero elsewhere, and the attention parameters of the other layers get no gradient (the official
code sets requires_grad=False on their attention modules; the MLPs stay trainable). Unlike torch, which
skips a frozen parameter, optax still applies the Adam momentum and weight decay it carries to those rows.
Fine-tuning: plain SFT from the vaccinated model.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from reft_jax.config import check
from reft_jax.data import sft
from reft_jax.defences.registry import Defence, register
from reft_jax.defences.sft import aligned_stage, disjoint_harmful_set, user_sft
from reft_jax.losses import batch_cross_entropy
from reft_jax.stages import Env, MethodState, StageSpec
from reft_jax.train import split_model

# Added to a gradient norm before dividing by it, as the official trainer does.
NORM_EPS = 1e-7
# Added to every layer's weight before drawing: np.random.choice(replace=False) needs at least `layers`
# non-zero probabilities, and an example whose answer was truncated away has all-zero norms (uniform
# then); the official code crashes on both.
WEIGHT_FLOOR = 1e-12


def attn_out_grad(model, batch):
  """dL/d attn_out [L, B, T, D], L the batch's mean token CE: what the official backward hooks on every
  attention module record (the gradient w.r.t. its output, after o_proj)."""
  cfg = model.cfg
  b, t = batch["tokens"].shape
  zeros = jnp.zeros((cfg.num_layers, b, t, cfg.hidden_size), jnp.float32)

  def mean(delta):
    s, n = batch_cross_entropy(model, batch, {"attn_out": delta})
    return s / jnp.maximum(n, 1)

  return jax.grad(mean)(zeros)


def layer_grad_norms(model, batch):
  """[L] the norm of each layer's attention-output gradient (official pre/after_gradient_magnitude_step)."""
  return jnp.sqrt(jnp.sum(jnp.square(attn_out_grad(model, batch)), axis=(1, 2, 3)))


def layer_probabilities(norms) -> np.ndarray:
  """Each layer's share of the summed gradient norms (official after_gradient_magnitude_step)."""
  w = np.nan_to_num(np.asarray(norms, np.float64)) + WEIGHT_FLOOR
  return w / w.sum()


def select_layers(rng: np.random.Generator, probs, n: int) -> np.ndarray:
  """A [L] 0/1 mask of min(n, L) layers drawn without replacement with probabilities `probs` (official
  switch_active_layers: np.random.choice(L, n, replace=False, p=probs))."""
  p = np.asarray(probs, np.float64)
  idx = rng.choice(len(p), size=min(n, len(p)), replace=False, p=p / p.sum())
  mask = np.zeros(len(p), np.float32)
  mask[idx] = 1.0
  return mask


def _attention_frozen_outside(model, selected):
  """The same model, except that the attention parameters of unselected layers get no gradient."""
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  keep = selected > 0

  def freeze(p):  # per-layer params are stacked on axis 0
    return jnp.where(keep.reshape((-1,) + (1,) * (p.ndim - 1)), p, jax.lax.stop_gradient(p))

  params["blocks"]["attn"] = jax.tree.map(freeze, params["blocks"]["attn"])
  return nnx.merge(graphdef, params)


def tvaccine_loss(rho: float):
  """ctx.extras["layers"]: [L], 1.0 on the selected layers (tvaccine_state)."""

  def loss(model, batch, ctx):
    selected = ctx.extras["layers"]
    # Pass 1: the gradient w.r.t. the selected layers' attention outputs (one norm over them).
    g = attn_out_grad(model, batch) * selected[:, None, None, None]
    norm = jnp.sqrt(jnp.sum(g * g))
    eps = jax.lax.stop_gradient(rho * g / (norm + NORM_EPS))
    # Pass 2: the loss under the perturbation; its parameter gradient is the update.
    total, count = batch_cross_entropy(_attention_frozen_outside(model, selected), batch, {"attn_out": eps})
    return total, count, {"attn_grad_norm": norm, "layers_selected": jnp.sum(selected)}

  return loss


def tvaccine_state(
  graphdef, pool: sft.TokenizedSet, num_layers: int, layers: int, resample_every: int, reweight_every: int, seed: int
) -> MethodState:
  """extras "probs" (the layers' sampling probabilities) and "layers" (the selection), refreshed on the
  host before a step as the official training_step does at the start of its step. Both live in the
  checkpointed extras, so a resumed run keeps the selection it had."""
  norms_of = jax.jit(lambda params, b: layer_grad_norms(nnx.merge(graphdef, params), b))
  # One example per refresh from a shuffled pass over the pool (official: a RandomSampler loader, batch 1).
  order = np.random.default_rng(seed).permutation(len(pool))
  extras = {"probs": jnp.full((num_layers,), 1.0 / num_layers), "layers": jnp.ones((num_layers,))}

  def before_step(step, state):
    extras = dict(state.extras)
    if step % reweight_every == 0:
      i = order[(step // reweight_every) % len(order)]
      one = {k: getattr(pool, k)[i : i + 1] for k in ("tokens", "attention_mask", "loss_mask")}
      extras["probs"] = jnp.asarray(layer_probabilities(jax.device_get(norms_of(state.params, one))), jnp.float32)
    if step % resample_every == 0:
      mask = select_layers(np.random.default_rng((seed, step)), np.asarray(extras["probs"]), layers)
      extras["layers"] = jnp.asarray(mask)
    return state.replace(extras=extras)

  return MethodState(extras, before_step=before_step)


def harmful_pool(env: Env) -> list[sft.Example]:
  """tvaccine.harmful_source (official: the first --prompt_data_size 200 unsafe rows of the alignment
  file), disjoint from the attack's pool (checked)."""
  return disjoint_harmful_set(env, "tvaccine")


def align(env: Env) -> StageSpec:
  tc = env.c.tvaccine
  pool = env.tokenize(harmful_pool(env))

  def setup(model):
    args = (model.cfg.num_layers, tc.layers, tc.resample_every, tc.reweight_every, env.c.seed)
    return tvaccine_state(split_model(model)[0], pool, *args)

  return dataclasses.replace(aligned_stage(env, "aligned_tvaccine", tvaccine_loss(tc.rho)), setup=setup)


def _validate(c):
  tc = c.tvaccine
  check(tc.rho >= 0, "tvaccine.rho", tc.rho, "must be >= 0")
  check(tc.layers >= 1, "tvaccine.layers", tc.layers, "must be >= 1")
  check(
    tc.resample_every >= 1 and tc.reweight_every >= 1,
    "tvaccine.resample_every/reweight_every",
    (tc.resample_every, tc.reweight_every),
    "must be >= 1",
  )
  check(bool(tc.harmful_source), "tvaccine.harmful_source", tc.harmful_source, "must name a source")


TVACCINE = register(
  Defence(
    "tvaccine",
    "perturbation-aware alignment on sampled safety-critical layers, then SFT on the user data",
    finetune=user_sft("tvaccine"),
    align=align,
    section="tvaccine",
    # script/alignment/T-Vaccine.sh and README (`bash T-Vaccine.sh 3`): rho 3, 8 layers, resampled every
    # 20 steps, probabilities every 200 steps from 200 harmful examples (here rows 500-699 of the world's
    # pool, disjoint from the attack's rows 0-499).
    defaults={
      "rho": 3.0,
      "layers": 8,
      "resample_every": 20,
      "reweight_every": 200,
      "harmful_source": "world:harmful_pool[500:700]",
    },
    validate=_validate,
    source="Liu et al., arXiv 2410.09760 (2024); Lslland/T-Vaccine",
  )
)
