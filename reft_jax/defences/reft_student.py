"""ReFT's student step: CE on the kept user data + beta * KL(teacher || student) on the alignment data
(METHODS.md §1), optionally + lam * the refusal regularizer on the student's own features against the
teacher's frozen refusal direction (`reft.student_lam`; 0 = METHODS.md's student)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flax import nnx

from reft_jax import losses, refusal
from reft_jax.data import sft
from reft_jax.distributed import to_host


def student_loss(beta: float, temperature: float, topk: bool, chunk: int = 0, feature=None):
  """CE on the (filtered) user batch + beta * mean KL(teacher || student) on the alignment batch.
  chunk > 0: the heads, CE and KL run `chunk` positions at a time (losses.chunked_*), no [B, T, V];
  -1: by the vocabulary (losses.resolve_chunk).
  feature = (layer, R, lam): + lam * refusal_regularizer(cos(h_student^layer, R)) at the alignment prompts'
  last token, R the teacher's direction (a constant). Why: the student learns *when* to refuse from the
  teacher's outputs on a few hundred prompts only; the term hands it the teacher's boundary itself."""

  def loss(model, batch, ctx):
    u, a = batch["user"], batch["align"]
    t, w = losses.next_token_targets(u["tokens"], u["loss_mask"])
    _, wa = losses.next_token_targets(a["tokens"], a["loss_mask"])
    n_chunk = losses.resolve_chunk(chunk, model.cfg.vocab_size)
    n_layers = model.cfg.num_layers
    read = (n_layers, feature[0]) if feature else (n_layers,)
    hidden = model.forward(a["tokens"], a["attention_mask"], hidden_layers=read, stop_after=n_layers)[1]
    hs = hidden[n_layers][:, :-1]
    if n_chunk > 0:
      hu = losses.final_hidden(model, u["tokens"], u["attention_mask"])[:, :-1]
      ce, count = losses.chunked_cross_entropy(model, hu, t, w, n_chunk)
      if topk:
        kl, n = losses.chunked_kl_topk_student(
          a["topk_logits"][:, :-1], a["topk_ids"][:, :-1], model, hs, wa, temperature, n_chunk
        )
      else:
        ht = losses.final_hidden(ctx.frozen, a["tokens"], a["attention_mask"])[:, :-1]
        kl, n = losses.chunked_kl_teacher_student(ctx.frozen, ht, model, hs, wa, temperature, n_chunk)
    else:
      ce, count = losses.batch_cross_entropy(model, u)
      student = model.head(hs)
      if topk:
        kl, n = losses.kl_topk_student(a["topk_logits"][:, :-1], a["topk_ids"][:, :-1], student, wa, temperature)
      else:
        teacher = jax.lax.stop_gradient(losses.shifted_logits(ctx.frozen, a["tokens"], a["attention_mask"]))
        kl, n = losses.kl_teacher_student(teacher, student, wa, temperature)
    kl_mean = kl / jnp.maximum(n, 1)
    count = jnp.maximum(count, 1)
    aux = {"ce": ce / count, "kl": kl_mean}
    total = ce + beta * kl_mean * count
    if feature:
      layer, r, lam = feature
      h = jnp.take_along_axis(hidden[layer], a["last_prompt"][:, None, None], 1)[:, 0].astype(jnp.float32)
      aux["reg"] = losses.refusal_regularizer(refusal.cosine(h, jnp.asarray(r)), a["is_harmful"])
      total = total + lam * aux["reg"] * count
    return total, count, aux

  return loss


def teacher_topk(teacher, data: sft.TokenizedSet, k: int, batch_size: int = 32):
  """The teacher's top-k logits and token ids at every position, computed once: [N, T, k]."""
  graphdef, state = nnx.split(teacher)
  params = nnx.to_pure_dict(state)

  @jax.jit
  def run(params, tokens, mask):
    vals, ids = jax.lax.top_k(nnx.merge(graphdef, params)(tokens, mask), k)
    return vals.astype(jnp.float32), ids.astype(jnp.int32)

  vals, ids = [], []
  n = len(data)
  for start in range(0, n, batch_size):
    idx = np.arange(start, min(start + batch_size, n))
    idx = np.concatenate([idx, np.full(batch_size - len(idx), idx[-1])])
    v, i = run(params, data.tokens[idx], data.attention_mask[idx])
    keep = min(batch_size, n - start)
    vals.append(to_host(v)[:keep])
    ids.append(to_host(i)[:keep])
  return np.concatenate(vals), np.concatenate(ids)
