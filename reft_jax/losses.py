"""Losses as small pure functions of arrays. Each returns a *sum* and a *count* so that gradient
accumulation and data-parallel sharding give exactly the per-token mean of one big batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def next_token_targets(tokens_BT, loss_mask_BT):
  """Logits at t predict token t+1: targets and weights aligned with logits[:, :-1]."""
  return tokens_BT[:, 1:], loss_mask_BT[:, 1:].astype(jnp.float32)


def masked_cross_entropy(logits_BTV, targets_BT, weights_BT):
  """(sum of token CE weighted by mask, number of weighted tokens)."""
  logp = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets_BT[..., None], axis=-1)[..., 0]
  return jnp.sum(nll * weights_BT), jnp.sum(weights_BT)


def lm_loss(model, batch, ctx=None):
  """Causal LM loss on response tokens only: returns (sum, count, aux metrics)."""
  logits = model(batch["tokens"], batch["attention_mask"])
  targets, weights = next_token_targets(batch["tokens"], batch["loss_mask"])
  total, count = masked_cross_entropy(logits[:, :-1], targets, weights)
  return total, count, {}


def refusal_regularizer(cos_B, is_harmful_B):
  """mean_H (1 - cos) + mean_B (1 + cos): pushes harmful prompts' features onto R, harmless ones
  onto -R. A class absent from the batch contributes 0."""
  h = is_harmful_B.astype(jnp.float32)
  n_h, n_b = jnp.sum(h), jnp.sum(1 - h)
  harm = jnp.sum((1 - cos_B) * h) / jnp.maximum(n_h, 1)
  safe = jnp.sum((1 + cos_B) * (1 - h)) / jnp.maximum(n_b, 1)
  return harm + safe


def kl_teacher_student(teacher_logits_BTV, student_logits_BTV, weights_BT, temperature: float = 1.0):
  """(sum over weighted tokens of KL(softmax(z_T/T) || softmax(z_S/T)), number of tokens)."""
  log_t = jax.nn.log_softmax(teacher_logits_BTV.astype(jnp.float32) / temperature, axis=-1)
  log_s = jax.nn.log_softmax(student_logits_BTV.astype(jnp.float32) / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)
  return jnp.sum(kl * weights_BT), jnp.sum(weights_BT)


def kl_topk_student(topk_logits_BTK, topk_ids_BTK, student_logits_BTV, weights_BT,
                    temperature: float = 1.0):
  """KL with the teacher restricted to its (precomputed) top-k tokens, renormalised there."""
  log_t = jax.nn.log_softmax(topk_logits_BTK.astype(jnp.float32) / temperature, axis=-1)
  log_s = jax.nn.log_softmax(student_logits_BTV.astype(jnp.float32) / temperature, axis=-1)
  log_s_k = jnp.take_along_axis(log_s, topk_ids_BTK, axis=-1)
  kl = jnp.sum(jnp.exp(log_t) * (log_t - log_s_k), axis=-1)
  return jnp.sum(kl * weights_BT), jnp.sum(weights_BT)
