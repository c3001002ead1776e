"""The field's defences as loss functions over the shared train step (METHODS.md §2-5, §8).

Alignment stage (harmful prompt -> refusal data, before the user's data is seen):
  vaccine  two passes: the gradient w.r.t. every block's attention output, then the loss with the
           attention outputs perturbed by rho * g / ||g|| (constants) — Huang et al., NeurIPS 2024
  booster  f(w) + lam [h(w) - h(w - alpha grad h / ||grad h||)], h = harmful loss, the shift and its
           norm over the trained parameters only — Huang et al., ICLR 2025
Fine-tuning stage (on the user's data):
  lisa     alternate K_a alignment and K_f user steps (alignment first; both scaled down in their ratio
           when the run is short, `lisa_cycle`), each with (rho/2)||w - w~||^2 over the trained parameters
           to the weights the other state ended with (off for the first 10% of steps) — Huang et al.,
           NeurIPS 2024
  mimic    safety data rewritten into the user data's format, mixed in (data only; see data/attacks.py)
  smart    CE + lam * symKL(f(x), f(x + delta)), delta one projected ascent step on the input embeddings,
           + mu * symKL(f(x; w), f(x; w~)), w~ a momentum copy of the weights — Jiang et al., ACL 2020 (§8)

Each is `loss(model, batch, ctx) -> (sum, count, aux)` like losses.lm_loss, so `sum / count` is the
per-token objective and the shared step handles sharding, accumulation and checkpoints.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx, traverse_util

from reft_jax import losses
from reft_jax.optim import TRAINABLE, trainable_labels

# Added to a gradient norm before dividing by it, as the official Vaccine/Booster trainers do.
NORM_EPS = 1e-7


def _ce(model, part, **forward_kw):
  logits, _ = model.forward(part["tokens"], part["attention_mask"], **forward_kw)
  t, w = losses.next_token_targets(part["tokens"], part["loss_mask"])
  return losses.masked_cross_entropy(logits[:, :-1], t, w)


def vaccine_loss(rho: float):
  def loss(model, batch, ctx=None):
    cfg = model.cfg
    b, t = batch["tokens"].shape
    zeros = jnp.zeros((cfg.num_layers, b, t, cfg.hidden_size), jnp.float32)

    def perturbed_mean(delta):
      s, n = _ce(model, batch, attn_delta_LBTD=delta)
      return s / jnp.maximum(n, 1)

    # Pass 1: the gradient w.r.t. all attention outputs (one norm over all layers).
    g = jax.grad(perturbed_mean)(zeros)
    norm = jnp.sqrt(jnp.sum(g * g))
    eps = jax.lax.stop_gradient(rho * g / (norm + NORM_EPS))
    # Pass 2: the loss under the perturbation; its parameter gradient is the update.
    total, count = _ce(model, batch, attn_delta_LBTD=eps)
    return total, count, {"attn_grad_norm": norm}

  return loss


def booster_loss(lam: float, alpha: float, mode: str = "full", regex: str = ""):
  """batch = {"align": harmful prompt -> refusal (and harmless -> helpful), "harmful": harmful
  prompt -> harmful answer}. Gradient: grad f + lam (grad h(w) - grad h(w')), w' = w - alpha g_h/|g_h|.

  As in the official BoosterAlignmentTrainer, g_h, its norm and the shift cover only the parameters
  being trained (`mode`/`regex` as train.mode/trainable_regex): in LoRA mode the frozen base weights
  stay where they are in w'."""

  def loss(model, batch, ctx=None):
    f_sum, f_n = _ce(model, batch["align"])
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    part = trainable_part(params, trainable_labels(params, mode, regex))

    def h_mean(p):
      s, n = _ce(nnx.merge(graphdef, _overlay(params, p)), batch["harmful"])
      return s / jnp.maximum(n, 1)

    h_now, g_h = jax.lax.stop_gradient(jax.value_and_grad(h_mean)(part))
    g_norm = optax.global_norm(g_h)
    # w' as a function of w with a constant shift, so this term's gradient is grad h(w').
    shifted = jax.tree.map(lambda p, g: p - (alpha / (g_norm + NORM_EPS)) * g.astype(p.dtype), part, g_h)
    h_after = h_mean(shifted)
    # grad h(w) is g_h, already computed: a term with h(w)'s value and g_h as its gradient spares a
    # third harmful forward/backward pass.
    h_lin = h_now + sum(jnp.vdot(g.astype(jnp.float32), (p - jax.lax.stop_gradient(p)).astype(jnp.float32))
                        for g, p in zip(jax.tree.leaves(g_h), jax.tree.leaves(part)))
    f_n = jnp.maximum(f_n, 1)
    total = f_sum + lam * (h_lin - h_after) * f_n
    return total, f_n, {"harmful_loss": h_now, "harmful_loss_after_step": h_after,
                        "harmful_grad_norm": g_norm}

  return loss


def lisa_loss(rho: float):
  """batch = {"user", "align"}; ctx.extras: "align_phase" (1 = alignment state), "prox_on", and
  "anchor" (the weights the other state ended with, for the parameters being trained)."""

  def loss(model, batch, ctx):
    phase = ctx.extras["align_phase"]
    # Only the active state's batch is computed (lax.cond runs one branch).
    total, count = jax.lax.cond(phase > 0, lambda: _ce(model, batch["align"]),
                                lambda: _ce(model, batch["user"]))
    count = jnp.maximum(count, 1)
    params = nnx.to_pure_dict(nnx.state(model))
    anchor = ctx.extras["anchor"]
    sq = jax.tree.map(lambda p, a: jnp.sum(jnp.square(p.astype(jnp.float32) - a)), _subset(params, anchor),
                      anchor)
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


def lisa_state(params: dict, labels: dict, k_align: int, k_user: int, prox_after: float):
  """(extras, before_step) for lisa_loss, as the official LisaTrainer: entering a state (and at step
  0) snapshots the trained parameters, i.e. the weights the other state ended with, as the proximal
  anchor; the proximal term is on for steps > prox_after (official: steps > 10% of the run)."""
  part = lambda p: jax.tree.map(lambda x: jnp.array(x, jnp.float32), trainable_part(p, labels))  # a copy
  phase_of = lisa_schedule(k_align, k_user)
  extras = {"anchor": part(params), "align_phase": jnp.asarray(phase_of(0), jnp.int32),
            "prox_on": jnp.asarray(0.0, jnp.float32)}

  def before_step(step, state):
    phase = phase_of(step)
    extras = dict(state.extras)
    if step == 0 or phase != int(extras["align_phase"]):
      extras["anchor"] = part(state.params)
    extras["align_phase"] = jnp.asarray(phase, jnp.int32)
    extras["prox_on"] = jnp.asarray(float(step > prox_after), jnp.float32)
    return state.replace(extras=extras)

  return extras, before_step


# ---------------------------------------------------------------- SMART

def sym_kl(logits_p_BTV, logits_q_BTV, weights_BT):
  """(sum over weighted positions of KL(p||q) + KL(q||p), in float32; differentiable in both)."""
  log_p = jax.nn.log_softmax(logits_p_BTV.astype(jnp.float32), axis=-1)
  log_q = jax.nn.log_softmax(logits_q_BTV.astype(jnp.float32), axis=-1)
  per_token = jnp.sum((jnp.exp(log_p) - jnp.exp(log_q)) * (log_p - log_q), axis=-1)
  return jnp.sum(per_token * weights_BT)


def smart_delta(model, batch, clean_logits, key, eps: float, sigma: float, eta: float):
  """The input-embedding perturbation (Algorithm 1, T=1): delta0 ~ N(0, sigma^2), then
  delta = clip(delta0 + eta g / ||g||_inf, -eps, eps), g = d symKL(f(x), f(x + delta0)) / d delta0 with
  f(x) a constant and the infinity norm per example. A constant: no gradient flows through it."""
  tokens, mask = batch["tokens"], batch["attention_mask"]
  _, w = losses.next_token_targets(tokens, batch["loss_mask"])
  clean = jax.lax.stop_gradient(clean_logits)
  noise = sigma * jax.random.normal(key, (*tokens.shape, model.cfg.hidden_size), jnp.float32)

  def divergence(delta):
    logits, _ = model.forward(tokens, mask, embed_delta_BTD=delta)
    return sym_kl(clean, logits[:, :-1], w)

  g = jax.grad(divergence)(noise)
  g_inf = jnp.max(jnp.abs(g), axis=(1, 2), keepdims=True)
  delta = jnp.clip(noise + eta * g / (g_inf + 1e-12), -eps, eps)
  return jax.lax.stop_gradient(delta)


def smart_loss(lam: float, eps: float, sigma: float, eta: float, mu: float):
  """CE + lam * adversarial symKL + mu * proximal symKL, each a mean over the response tokens.
  ctx.extras: "smart_key" (raw PRNG key for the start noise) and "smart_momentum" (w~, the parameters
  being trained; the rest are shared with the model)."""

  def loss(model, batch, ctx):
    tokens, mask = batch["tokens"], batch["attention_mask"]
    targets, w = losses.next_token_targets(tokens, batch["loss_mask"])
    logits, _ = model.forward(tokens, mask)
    logits = logits[:, :-1]
    total, count = losses.masked_cross_entropy(logits, targets, w)
    n = jnp.maximum(count, 1)
    delta = smart_delta(model, batch, logits, ctx.extras["smart_key"], eps, sigma, eta)
    adv_logits, _ = model.forward(tokens, mask, embed_delta_BTD=delta)
    # As in the paper's l_s, both distributions get gradients (the clean one is not a fixed target).
    adv = sym_kl(logits, adv_logits[:, :-1], w) / n
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    tilde, _ = nnx.merge(graphdef, _overlay(params, ctx.extras["smart_momentum"])).forward(tokens, mask)
    prox = sym_kl(logits, jax.lax.stop_gradient(tilde[:, :-1]), w) / n
    return total + (lam * adv + mu * prox) * n, count, {"smart_adv": adv, "smart_prox": prox}

  return loss


def trainable_part(params: dict, labels: dict) -> dict:
  """The entries of `params` labelled trainable (optim.trainable_labels), as a nested dict."""
  flat, flat_l = traverse_util.flatten_dict(params), traverse_util.flatten_dict(labels)
  return traverse_util.unflatten_dict({k: v for k, v in flat.items() if flat_l[k] == TRAINABLE})


def _overlay(params: dict, part: dict) -> dict:
  """`params` with the entries at `part`'s paths replaced by part's (cast to the parameter's dtype)."""
  flat = traverse_util.flatten_dict(params)
  flat.update({k: v.astype(flat[k].dtype) for k, v in traverse_util.flatten_dict(part).items()})
  return traverse_util.unflatten_dict(flat)


def smart_momentum(momentum: dict, params: dict, beta: float) -> dict:
  """w~_t = (1 - beta) w_t + beta w~_{t-1}, in float32."""
  return jax.tree.map(lambda m, p: (1 - beta) * p.astype(jnp.float32) + beta * m, momentum, params)


def smart_state(params: dict, labels: dict, beta: float, seed: int):
  """(extras, before_step) for smart_loss: w~ starts at the initial weights and, before every later
  step, moves toward the weights the previous step left; each step draws its own start noise."""
  part = lambda p: jax.tree.map(lambda x: jnp.array(x, jnp.float32), trainable_part(p, labels))  # a copy
  key = jax.random.PRNGKey(seed)
  extras = {"smart_momentum": part(params), "smart_key": key}
  update = jax.jit(lambda m, p: smart_momentum(m, part(p), beta), donate_argnums=0)

  def before_step(step, state):
    extras = dict(state.extras)
    if step > 0:
      extras["smart_momentum"] = update(extras["smart_momentum"], state.params)
    extras["smart_key"] = jax.random.fold_in(key, step)
    return state.replace(extras=extras)

  return extras, before_step
