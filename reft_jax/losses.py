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
