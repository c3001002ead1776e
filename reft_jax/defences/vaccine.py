"""Vaccine (Huang et al., NeurIPS 2024; git-disl/Vaccine trainer.py): perturbation-aware alignment.

Alignment stage, two passes per step: the gradient of the loss w.r.t. every block's attention output
(the model's "attn_out" intervention site), then the loss with the attention outputs perturbed by
rho * g / ||g|| (a constant; one norm over all layers). Fine-tuning: plain SFT from the vaccinated model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from reft_jax.config import check
from reft_jax.defences.registry import Defence, register
from reft_jax.defences.sft import aligned_stage, user_sft
from reft_jax.losses import batch_cross_entropy

# Added to a gradient norm before dividing by it, as the official Vaccine trainer does.
NORM_EPS = 1e-7


def vaccine_loss(rho: float):
  def loss(model, batch, ctx=None):
    cfg = model.cfg
    b, t = batch["tokens"].shape
    zeros = jnp.zeros((cfg.num_layers, b, t, cfg.hidden_size), jnp.float32)

    def perturbed_mean(delta):
      s, n = batch_cross_entropy(model, batch, {"attn_out": delta})
      return s / jnp.maximum(n, 1)

    # Pass 1: the gradient w.r.t. all attention outputs (one norm over all layers).
    g = jax.grad(perturbed_mean)(zeros)
    norm = jnp.sqrt(jnp.sum(g * g))
    eps = jax.lax.stop_gradient(rho * g / (norm + NORM_EPS))
    # Pass 2: the loss under the perturbation; its parameter gradient is the update.
    total, count = batch_cross_entropy(model, batch, {"attn_out": eps})
    return total, count, {"attn_grad_norm": norm}

  return loss


def _validate(c):
  check(c.vaccine.rho >= 0, "vaccine.rho", c.vaccine.rho, "must be >= 0")


VACCINE = register(
  Defence(
    "vaccine",
    "perturbation-aware alignment (attention outputs), then SFT on the user data",
    finetune=user_sft("vaccine"),
    align=lambda env: aligned_stage(env, "aligned_vaccine", vaccine_loss(env.c.vaccine.rho)),
    section="vaccine",
    defaults={"rho": 2.0},
    validate=_validate,
    source="Huang et al., NeurIPS 2024; git-disl/Vaccine",
  )
)
