"""The field's defences as loss functions over the shared train step (METHODS.md §2-5).

Alignment stage (harmful prompt -> refusal data, before the user's data is seen):
  vaccine  two passes: the gradient w.r.t. every block's attention output, then the loss with the
           attention outputs perturbed by rho * g / ||g|| (constants) — Huang et al., NeurIPS 2024
  booster  f(w) + lam [h(w) - h(w - alpha grad h / ||grad h||)], h = harmful loss — Huang et al., ICLR 2025
Fine-tuning stage (on the user's data):
  lisa     alternate K_a alignment and K_f user steps, each with (rho/2)||w - w~||^2 to the weights the
           other state ended with (off for the first 10% of steps) — Huang et al., NeurIPS 2024
  mimic    safety data rewritten into the user data's format, mixed in (data only; see data/attacks.py)

Each is `loss(model, batch, ctx) -> (sum, count, aux)` like losses.lm_loss, so `sum / count` is the
per-token objective and the shared step handles sharding, accumulation and checkpoints.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from reft_jax import losses


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
