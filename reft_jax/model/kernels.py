"""The model's functions with hand-written gradients: each gives autodiff's values and gradients (to float
rounding, tests/test_kernels.py) but keeps fewer or better-laid-out arrays for the backward pass. Under
lax.scan every array a layer keeps is stacked over the layers, zero-filled, written and read back, so on
XLA:CPU the residuals cost as much as some matmuls (README, "Speed")."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


def _contract(x, w, n_in):
  """x's last n_in axes against w's first, as one 2-D matmul over the flattened axes."""
  k = math.prod(w.shape[:n_in])
  lead = x.shape[: x.ndim - n_in]
  y = x.reshape(*lead, k) @ w.reshape(k, -1)
  return y.reshape(*lead, *w.shape[n_in:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dense(x, w, n_in: int = 1):
  """jnp.tensordot(x, w, n_in) (x's last n_in axes against w's first), with the weight gradient laid out
  for a fast matmul on CPU; the same values and gradients."""
  return _contract(x, w, n_in)


def _dense_fwd(x, w, n_in):
  # The residual is w as given, not reshaped: under lax.scan a layer's weight slice is then recognised as
  # the stacked parameter itself instead of being copied into a stacked residual of its own.
  return _contract(x, w, n_in), (x, w)


def _dense_bwd(n_in, res, g):
  x, w = res
  k = math.prod(w.shape[:n_in])
  x2, w2 = x.reshape(-1, k), w.reshape(k, -1)
  g2 = g.reshape(-1, w2.shape[1])
  dx = (g2 @ w2.T).reshape(x.shape)
  if jax.default_backend() != "cpu":
    return dx, (x2.T @ g2).astype(w.dtype).reshape(w.shape)
  # The weight gradient contracts the token axis, the leading one of both operands. Left to itself,
  # XLA:CPU transposes the larger operand and runs Eigen's slower dot; materialising the narrower one's
  # transpose behind a barrier keeps YNNPACK's plain matmul (README, "Speed"). LoRA's A: g is [tokens, r].
  if x2.shape[1] <= g2.shape[1]:
    dw = jax.lax.optimization_barrier(x2.T) @ g2
  else:
    dw = (jax.lax.optimization_barrier(g2.T) @ x2).T
  return dx, dw.astype(w.dtype).reshape(w.shape)


dense.defvjp(_dense_fwd, _dense_bwd)


ACTIVATION_FNS = {
  "silu": jax.nn.silu,
  "gelu": functools.partial(jax.nn.gelu, approximate=False),
  "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def gated(g, up, activation):
  """activation(g) * up, the gated MLP's hidden state. Its gradient keeps only g and up for the backward
  pass and recomputes the activation there: autodiff would also keep activation(g) and its derivative's
  pieces, each a [tokens, intermediate] array that lax.scan stacks over the layers (README, "Speed")."""
  return activation(g) * up


def _gated_fwd(g, up, activation):
  return activation(g) * up, (g, up)


def _gated_bwd(activation, res, dh):
  g, up = res
  a, activation_vjp = jax.vjp(activation, g)
  (dg,) = activation_vjp(dh * up)
  return dg, dh * a


gated.defvjp(_gated_fwd, _gated_bwd)


@jax.custom_vjp
def masked_softmax(scores, mask_BTS):
  """Softmax over the keys of scores [B, KV, G, T, S] where mask_BTS holds. A finite minimum (not -inf)
  keeps fully masked rows (padding queries) free of NaNs. The gradient keeps only the probabilities and
  the unbroadcast mask: autodiff kept the exponentials, their sums and the mask broadcast over the heads
  as well, each stacked over the layers under lax.scan (README, "Speed")."""
  return jax.nn.softmax(jnp.where(mask_BTS[:, None, None], scores, jnp.finfo(scores.dtype).min), axis=-1)


def _masked_softmax_fwd(scores, mask_BTS):
  probs = masked_softmax(scores, mask_BTS)
  return probs, (probs, mask_BTS)


def _masked_softmax_bwd(res, dprobs):
  probs, mask_BTS = res
  dscores = probs * (dprobs - jnp.sum(dprobs * probs, axis=-1, keepdims=True))
  return jnp.where(mask_BTS[:, None, None], dscores, 0.0), None


masked_softmax.defvjp(_masked_softmax_fwd, _masked_softmax_bwd)
