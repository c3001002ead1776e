"""The field's defences as loss functions over the shared train step (METHODS.md §2-5, §8).

Alignment stage (harmful prompt -> refusal data, before the user's data is seen):
  vaccine  two passes: the gradient w.r.t. every block's attention output, then the loss with the
           attention outputs perturbed by rho * g / ||g|| (constants) — Huang et al., NeurIPS 2024
  booster  f(w) + lam [h(w) - h(w - alpha grad h / ||grad h||)], h = harmful loss — Huang et al., ICLR 2025
Fine-tuning stage (on the user's data):
  lisa     alternate K_a alignment and K_f user steps, each with (rho/2)||w - w~||^2 to the weights the
           other state ended with (off for the first 10% of steps) — Huang et al., NeurIPS 2024
  mimic    safety data rewritten into the user data's format, mixed in (data only; see data/attacks.py)
  smart    CE + lam * symKL(f(x), f(x + delta)), delta one projected ascent step on the input embeddings,
           + mu * symKL(f(x; w), f(x; w~)), w~ a momentum copy of the weights — Jiang et al., ACL 2020 (§8)

Each is `loss(model, batch, ctx) -> (sum, count, aux)` like losses.lm_loss, so `sum / count` is the
per-token objective and the shared step handles sharding, accumulation and checkpoints.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx, traverse_util

from reft_jax import losses
from reft_jax.optim import TRAINABLE


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
    eps = jax.lax.stop_gradient(rho * g / (norm + 1e-12))
    # Pass 2: the loss under the perturbation; its parameter gradient is the update.
    total, count = _ce(model, batch, attn_delta_LBTD=eps)
    return total, count, {"attn_grad_norm": norm}

  return loss


def booster_loss(lam: float, alpha: float):
  """batch = {"align": harmful prompt -> refusal (and harmless -> helpful), "harmful": harmful
  prompt -> harmful answer}. Gradient: grad f + lam (grad h(w) - grad h(w')), w' = w - alpha g_h/|g_h|."""

  def loss(model, batch, ctx=None):
    f_sum, f_n = _ce(model, batch["align"])
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)

    def h_mean(p):
      s, n = _ce(nnx.merge(graphdef, p), batch["harmful"])
      return s / jnp.maximum(n, 1)

    g_h = jax.lax.stop_gradient(jax.grad(h_mean)(params))
    g_norm = optax.global_norm(g_h)
    step = jax.tree.map(lambda g: -alpha * g / (g_norm + 1e-12), g_h)
    h_now = h_mean(params)
    # The shift is a constant, so this term's gradient is grad h(w').
    h_after = h_mean(jax.tree.map(jnp.add, params, step))
    f_n = jnp.maximum(f_n, 1)
    total = f_sum + lam * (h_now - h_after) * f_n
    return total, f_n, {"harmful_loss": h_now, "harmful_loss_after_step": h_after}

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
  """Step -> 1 in the alignment state, 0 in the user state: K_a alignment steps, then K_f user steps."""
  period = k_align + k_user

  def phase(step: int) -> int:
    return int(period > 0 and step % period < k_align)

  return phase


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
