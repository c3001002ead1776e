"""Losses as small pure functions of arrays. Each returns a *sum* and a *count* so that gradient
accumulation and data-parallel sharding give exactly the per-token mean of one big batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def next_token_targets(tokens_BT, loss_mask_BT):
  """Logits at t predict token t+1: targets and weights aligned with logits[:, :-1]."""
  return tokens_BT[:, 1:], loss_mask_BT[:, 1:].astype(jnp.float32)


@jax.custom_vjp
def token_nll(logits_BTV, targets_BT):
  """-log softmax(logits)[target] per token (float32 logits). Its gradient, softmax - one_hot, is one
  elementwise pass over the logits (autodiff's take_along_axis scatters into a zeroed [B, T, V])."""
  return _token_nll_fwd(logits_BTV, targets_BT)[0]


def _token_nll_fwd(logits_BTV, targets_BT):
  lse = jax.nn.logsumexp(logits_BTV, axis=-1)
  picked = jnp.take_along_axis(logits_BTV, targets_BT[..., None], -1)[..., 0]
  return lse - picked, (logits_BTV, lse, targets_BT)


def _token_nll_bwd(res, g_BT):
  logits, lse, targets = res
  one_hot = jax.lax.broadcasted_iota(targets.dtype, logits.shape, logits.ndim - 1) == targets[..., None]
  return (jnp.exp(logits - lse[..., None]) - one_hot) * g_BT[..., None], None


token_nll.defvjp(_token_nll_fwd, _token_nll_bwd)


def masked_cross_entropy(logits_BTV, targets_BT, weights_BT):
  """(sum of token CE weighted by mask, number of weighted tokens)."""
  nll = token_nll(logits_BTV.astype(jnp.float32), targets_BT)
  return jnp.sum(nll * weights_BT), jnp.sum(weights_BT)


def batch_cross_entropy(model, batch, interventions=None):
  """(CE sum, count) of one tokenized batch part, with optional forward interventions (model sites).
  The head runs on the positions that predict a token only (no [B, T, V] slice and pad)."""
  logits = shifted_logits(model, batch["tokens"], batch["attention_mask"], interventions)
  targets, weights = next_token_targets(batch["tokens"], batch["loss_mask"])
  return masked_cross_entropy(logits, targets, weights)


def lm_loss(model, batch, ctx=None):
  """Causal LM loss on response tokens only: returns (sum, count, aux metrics)."""
  total, count = batch_cross_entropy(model, batch)
  return total, count, {}


def refusal_regularizer(cos_B, is_harmful_B):
  """mean_H (1 - cos) + mean_B (1 + cos): pushes harmful prompts' features onto R, harmless ones
  onto -R. A class absent from the batch contributes 0."""
  h = is_harmful_B.astype(jnp.float32)
  n_h, n_b = jnp.sum(h), jnp.sum(1 - h)
  harm = jnp.sum((1 - cos_B) * h) / jnp.maximum(n_h, 1)
  safe = jnp.sum((1 + cos_B) * (1 - h)) / jnp.maximum(n_b, 1)
  return harm + safe


@jax.custom_vjp
def token_kl(teacher_logits_BTV, student_logits_BTV):
  """KL(softmax(teacher) || softmax(student)) per token (float32 logits), with its gradient written out:
  softmax(student) - softmax(teacher) for the student, one elementwise pass each (as token_nll)."""
  return _token_kl_fwd(teacher_logits_BTV, student_logits_BTV)[0]


def _token_kl_fwd(t, s):
  log_t, log_s = jax.nn.log_softmax(t, axis=-1), jax.nn.log_softmax(s, axis=-1)
  kl = jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)
  return kl, (log_t, log_s, kl)


def _token_kl_bwd(res, g_BT):
  log_t, log_s, kl = res
  p_t, g = jnp.exp(log_t), g_BT[..., None]
  return p_t * (log_t - log_s - kl[..., None]) * g, (jnp.exp(log_s) - p_t) * g


token_kl.defvjp(_token_kl_fwd, _token_kl_bwd)


def kl_teacher_student(teacher_logits_BTV, student_logits_BTV, weights_BT, temperature: float = 1.0):
  """(sum over weighted tokens of KL(softmax(z_T/T) || softmax(z_S/T)), number of tokens)."""
  kl = token_kl(
    teacher_logits_BTV.astype(jnp.float32) / temperature, student_logits_BTV.astype(jnp.float32) / temperature
  )
  return jnp.sum(kl * weights_BT), jnp.sum(weights_BT)


def kl_topk_student(topk_logits_BTK, topk_ids_BTK, student_logits_BTV, weights_BT, temperature: float = 1.0):
  """KL with the teacher restricted to its (precomputed) top-k tokens, renormalised there."""
  log_t = jax.nn.log_softmax(topk_logits_BTK.astype(jnp.float32) / temperature, axis=-1)
  log_s = jax.nn.log_softmax(student_logits_BTV.astype(jnp.float32) / temperature, axis=-1)
  log_s_k = jnp.take_along_axis(log_s, topk_ids_BTK, axis=-1)
  kl = jnp.sum(jnp.exp(log_t) * (log_t - log_s_k), axis=-1)
  return jnp.sum(kl * weights_BT), jnp.sum(weights_BT)


# ---------------------------------------------------------------- chunked (fused) head + loss
#
# With a 32k+ vocabulary the [B, T, V] float32 logits, their log-softmax and their gradient dominate a
# step's memory traffic. The chunked losses below run the head and the loss over `chunk` positions at a
# time and take each chunk's gradient (w.r.t. the head and the hidden states) right after its forward,
# so no [B, T, V] array is ever live and nothing is recomputed in the backward pass.


def final_hidden(model, tokens_BT, mask_BT, interventions=None):
  """The residual stream after the last block (before the final norm): [B, T, D]."""
  n = model.cfg.num_layers
  return model.forward(tokens_BT, mask_BT, hidden_layers=(n,), stop_after=n, interventions=interventions)[1][n]


def shifted_logits(model, tokens_BT, mask_BT, interventions=None):
  """Logits at the positions that predict a next token, [B, T-1, V] (aligned with next_token_targets),
  with the head run on those positions only."""
  return model.head(final_hidden(model, tokens_BT, mask_BT, interventions)[:, :-1])


def head_of(model):
  """The model's head as pure functions: (project(head_params, rest, x) -> logits before the soft-cap,
  cap(logits) -> logits, head_params, rest); head_params (final norm + output matrix) get gradients, rest is
  the remaining state, unused."""
  from flax import nnx

  out = "embed" if model.lm_head is None else "lm_head"
  graphdef, head, rest = nnx.split(model, nnx.Any(nnx.PathContains("final_norm"), nnx.PathContains(out)), ...)
  return (lambda h, r, x: nnx.merge(graphdef, h, r).head_projection(x)), model.cap_logits, head, rest


def _to_chunks(x, chunk: int):
  """[B, T, ...] -> [ceil(T / chunk), B, chunk, ...], zero-padded (padded weights are 0)."""
  b, t = x.shape[:2]
  n = -(-t // chunk)
  x = jnp.pad(x, [(0, 0), (0, n * chunk - t)] + [(0, 0)] * (x.ndim - 2))
  return jnp.swapaxes(x.reshape(b, n, chunk, *x.shape[2:]), 0, 1)


def _from_chunks(x, t: int):
  x = jnp.swapaxes(x, 0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :t]


def _defer_projection_grad() -> bool:
  """On CPU the chunks are for cache locality, not memory: the head projection's backward then runs once
  over all positions after the chunks (a [positions, V] x [V, D] matmul runs 1.5x faster than 16-position
  pieces on XLA:CPU, README "Speed"), at the cost of the logits' gradient for the whole batch."""
  return jax.default_backend() == "cpu"


def fused_chunked_sum(project, logit_loss, chunk: int):
  """f(params, hidden_BTD, consts, xs_BT) = sum over sequence chunks c of
  logit_loss(project(params, consts, hidden[:, c]), consts, *[x[:, c] for x in xs_BT]) (a scalar each).

  Differentiable in params and hidden only; consts and xs get no gradient. The forward pass of a
  differentiated call already computes each chunk's gradients (a fused loss, as in Liger kernels); with
  _defer_projection_grad, each chunk's logits' gradient, and the projection's backward after the loop.
  """

  def run(params, hidden, consts, xs, with_grad: bool):
    t, hidden_c = hidden.shape[1], _to_chunks(hidden, chunk)
    chunks = (hidden_c, tuple(_to_chunks(x, chunk) for x in xs))
    one = lambda p, h, c_xs: logit_loss(project(p, consts, h), consts, *c_xs)
    defer = with_grad and _defer_projection_grad()

    def body(carry, c):
      h, c_xs = c
      if not with_grad:
        return carry + one(params, h, c_xs), None
      if defer:
        val, g_logits = jax.value_and_grad(logit_loss)(project(params, consts, h), consts, *c_xs)
        return carry + val, g_logits
      val, (g_p, g_h) = jax.value_and_grad(one, argnums=(0, 1))(params, h, c_xs)
      total, acc = carry
      return (total + val, jax.tree.map(jnp.add, acc, g_p)), g_h.astype(hidden.dtype)

    zero = jnp.zeros((), jnp.float32)
    if not with_grad:
      return jax.lax.scan(body, zero, chunks)[0]
    if defer:  # the projection's forward output is unused here: XLA drops it, only its backward runs
      total, g_logits = jax.lax.scan(body, zero, chunks)
      rows = lambda x: x.reshape(-1, *x.shape[2:])  # [n, B, chunk, ...] -> [n * B, chunk, ...], no copy
      g_p, g_h = jax.vjp(lambda p, h: project(p, consts, h), params, rows(hidden_c))[1](rows(g_logits))
      return total, g_p, _from_chunks(g_h.reshape(hidden_c.shape), t)
    acc0 = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (total, g_p), g_h = jax.lax.scan(body, (zero, acc0), chunks)
    g_p = jax.tree.map(lambda g, p: g.astype(p.dtype), g_p, params)
    return total, g_p, _from_chunks(g_h, t)

  @jax.custom_vjp
  def f(params, hidden, consts, xs):
    return run(params, hidden, consts, xs, False)

  def fwd(params, hidden, consts, xs):
    total, g_p, g_h = run(params, hidden, consts, xs, True)
    return total, (g_p, g_h)

  def bwd(res, ct):
    g_p, g_h = res
    return (jax.tree.map(lambda g: (g * ct).astype(g.dtype), g_p), (g_h * ct).astype(g_h.dtype), None, None)

  f.defvjp(fwd, bwd)
  return f


def chunked_cross_entropy(model, hidden_BTD, targets_BT, weights_BT, chunk: int):
  """masked_cross_entropy(model.head(hidden), targets, weights), `chunk` positions at a time."""
  project, cap, head, rest = head_of(model)

  def loss(logits, rest, t, w):
    return masked_cross_entropy(cap(logits), t, w)[0]

  total = fused_chunked_sum(project, loss, chunk)(head, hidden_BTD, rest, (targets_BT, weights_BT))
  return total, jnp.sum(weights_BT)


def chunked_kl_teacher_student(
  teacher, teacher_hidden_BTD, student, student_hidden_BTD, weights_BT, temperature: float = 1.0, chunk: int = 128
):
  """kl_teacher_student on the two models' heads, `chunk` positions at a time; the teacher's logits are
  computed once per chunk and never differentiated."""
  t_project, t_cap, t_head, t_rest = head_of(teacher)
  s_project, s_cap, s_head, s_rest = head_of(student)

  def loss(logits, consts, ht, w):
    t_logits = jax.lax.stop_gradient(t_cap(t_project(consts[0], consts[1], ht)))
    return kl_teacher_student(t_logits, s_cap(logits), w, temperature)[0]

  consts = jax.lax.stop_gradient((t_head, t_rest)) + (s_rest,)
  total = fused_chunked_sum(lambda p, consts, h: s_project(p, consts[2], h), loss, chunk)(
    s_head, student_hidden_BTD, consts, (jax.lax.stop_gradient(teacher_hidden_BTD), weights_BT)
  )
  return total, jnp.sum(weights_BT)


def chunked_kl_topk_student(
  topk_logits_BTK, topk_ids_BTK, student, student_hidden_BTD, weights_BT, temperature: float = 1.0, chunk: int = 128
):
  """kl_topk_student on the student's head, `chunk` positions at a time."""
  project, cap, head, rest = head_of(student)

  def loss(logits, rest, vals, ids, w):
    return kl_topk_student(vals, ids, cap(logits), w, temperature)[0]

  total = fused_chunked_sum(project, loss, chunk)(
    head, student_hidden_BTD, rest, (topk_logits_BTK, topk_ids_BTK, weights_BT)
  )
  return total, jnp.sum(weights_BT)


# train.loss_chunk=-1 (the default): the fused head from this vocabulary size on, with the chunk that measured
# fastest on CPU (16 positions: README, "Speed") and a wider one for accelerators' matmul units.
AUTO_CHUNK_MIN_VOCAB = 16384


def resolve_chunk(chunk: int, vocab_size: int, on_cpu: bool | None = None) -> int:
  """train.loss_chunk as used: > 0 positions per chunk, 0 unchunked, -1 (auto) one of the two by vocabulary.
  on_cpu: the platform it runs on (None: this process's default backend)."""
  if chunk >= 0:
    return chunk
  if vocab_size < AUTO_CHUNK_MIN_VOCAB:
    return 0
  return 16 if (jax.default_backend() == "cpu" if on_cpu is None else on_cpu) else 256


def make_lm_loss(chunk: int = 0):
  """lm_loss, or with chunk > 0 the same loss through the chunked head (no [B, T, V] logits); chunk=-1
  decides by the model's vocabulary (resolve_chunk)."""
  if chunk == 0:
    return lm_loss

  def loss(model, batch, ctx=None):
    n = resolve_chunk(chunk, model.cfg.vocab_size)
    if n == 0:
      return lm_loss(model, batch, ctx)
    hidden = final_hidden(model, batch["tokens"], batch["attention_mask"])
    targets, weights = next_token_targets(batch["tokens"], batch["loss_mask"])
    total, count = chunked_cross_entropy(model, hidden[:, :-1], targets, weights, n)
    return total, count, {}

  return loss
