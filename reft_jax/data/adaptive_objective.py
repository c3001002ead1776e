"""The adaptive attack's objective (data/adaptive.py): the filter's score of a prompt on the teacher, the
gradient similarity of an example's LM gradient on the base model, and the jitted kernels the GCG loop
calls — the one-hot token gradient of lam * filter + (1 - lam) * similarity, and the exact objective of a
batch of candidate prompts. Pure functions over (graphdef, params) pairs."""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from reft_jax import losses, refusal
from reft_jax.data import sft

QKV_KERNELS = r"attn/(q|k|v)/kernel$"  # Virus's LoRA targets (q_proj, k_proj, v_proj) as dense kernels
LORA_PARAMS = r"(lora_a|lora_b)$"


# ------------------------------------------------------------------------------------------ parameters


def flat_params(model) -> tuple[object, dict]:
  graphdef, state = nnx.split(model)
  return graphdef, traverse_util.flatten_dict(nnx.to_pure_dict(state), sep="/")


def trainable_names(model, regex: str = "") -> tuple[str, ...]:
  """The parameter paths whose LM gradient the similarity compares: `regex` (re.search on e.g.
  'blocks/attn/q/kernel'); "" = the LoRA adapters when the model has them (Virus: its trainable LoRA), else
  the q/k/v kernels (Virus's LoRA targets)."""
  _, flat = flat_params(model)
  if not regex:
    regex = LORA_PARAMS if any(re.search(LORA_PARAMS, k) for k in flat) else QKV_KERNELS
  names = tuple(sorted(k for k in flat if re.search(regex, k)))
  if not names:
    raise ValueError(f"adaptive trainable={regex!r} matches no parameter; paths look like {next(iter(flat))!r}")
  return names


def _tree_cos(a: dict, b: dict, eps: float = 1e-12):
  dot = sum(jnp.vdot(a[k].astype(jnp.float32), b[k].astype(jnp.float32)) for k in a)
  na = jnp.sqrt(sum(jnp.sum(jnp.square(a[k].astype(jnp.float32))) for k in a))
  nb = jnp.sqrt(sum(jnp.sum(jnp.square(b[k].astype(jnp.float32))) for k in b))
  return dot / (na * nb + eps)


# ------------------------------------------------------------------------------------- pure functions


def _teacher_cos(t_graph, t_params, tokens_BT, mask_BT, last_B, r_D, layer, delta_BTD=None):
  model = nnx.merge(t_graph, t_params)
  _, hidden = model.forward(
    tokens_BT, mask_BT, hidden_layers=(layer,), stop_after=layer, interventions={"embed": delta_BTD}
  )
  h = jnp.take_along_axis(hidden[layer], last_B[:, None, None], axis=1)[:, 0].astype(jnp.float32)
  return refusal.cosine(h, r_D)


def _example_loss(s_graph, train, frozen, tokens_T, mask_T, loss_T, delta_TD=None):
  """Mean response CE of one example (the student's loss), as a function of the trainable subset."""
  model = nnx.merge(s_graph, traverse_util.unflatten_dict({**frozen, **train}, sep="/"))
  batch = {"tokens": tokens_T[None], "attention_mask": mask_T[None], "loss_mask": loss_T[None]}
  total, count = losses.batch_cross_entropy(model, batch, None if delta_TD is None else {"embed": delta_TD[None]})
  return total / jnp.maximum(count, 1.0)


def _similarity_loss(s_graph, train, frozen, g0, tokens_T, mask_T, loss_T, delta_TD=None):
  g = jax.grad(lambda t: _example_loss(s_graph, t, frozen, tokens_T, mask_T, loss_T, delta_TD))(train)
  return 1.0 - _tree_cos(g, g0)


def _target_ce(g_graph, g_params, tokens_T, mask_T, loss_T, k: int, delta_TD=None):
  """GCG's target loss on a generating guard: mean CE of the first k response tokens (the harmful answer's
  opening, "Sure, here is ...") given the prompt. Lower: the guard starts answering instead of refusing,
  which is what a refusal-moderated upload checks (defences/guardrail.py, judge=refusal)."""
  first = loss_T * (jnp.cumsum(loss_T) <= k).astype(loss_T.dtype)
  model = nnx.merge(g_graph, g_params)
  batch = {"tokens": tokens_T[None], "attention_mask": mask_T[None], "loss_mask": first[None]}
  total, count = losses.batch_cross_entropy(model, batch, None if delta_TD is None else {"embed": delta_TD[None]})
  return total / jnp.maximum(count, 1.0)


def _filter_term(cos, threshold, hinge: bool):
  return jnp.maximum(cos - threshold, 0.0) if hinge else cos


def split_trainable(model, names) -> tuple[object, dict, dict]:
  graphdef, flat = flat_params(model)
  return graphdef, {k: v for k, v in flat.items() if k not in names}, {k: flat[k] for k in names}


@functools.partial(jax.jit, static_argnums=(0,))
def _lm_grad(s_graph, train, frozen, tokens_T, mask_T, loss_T):
  return jax.grad(lambda t: _example_loss(s_graph, t, frozen, tokens_T, mask_T, loss_T))(train)


@functools.partial(jax.jit, static_argnums=(0,))
def _similarity_losses(s_graph, train, frozen, g0, tokens_BT, mask_BT, loss_BT, delta_BTD):
  one = lambda t, m, lm, d: _similarity_loss(s_graph, train, frozen, g0, t, m, lm, d)
  return jax.vmap(one)(tokens_BT, mask_BT, loss_BT, delta_BTD)


_cos_jit = jax.jit(_teacher_cos, static_argnums=(0, 6))


def filter_loss(teacher, tokens_BT, mask_BT, last_B, r, layer: int, *, tau=None, margin: float = 0.0, embed_delta=None):
  """The attacker's guardrail term [B]: cos(h^layer at last_B, r) on the teacher (the filter's score; lower
  evades), or with tau given the hinge max(cos - (tau - margin), 0). embed_delta [B, T, D]: added to the
  input embeddings (its gradient is the embedding gradient)."""
  graphdef, state = nnx.split(teacher)
  args = tuple(jnp.asarray(a) for a in (tokens_BT, mask_BT, last_B))
  cos = _cos_jit(graphdef, nnx.to_pure_dict(state), *args, jnp.asarray(r, jnp.float32), layer, embed_delta)
  return cos if tau is None else _filter_term(cos, tau - margin, True)


def lm_gradient(student, tokens_T, mask_T, loss_mask_T, names: tuple[str, ...]) -> dict:
  """grad over the parameters `names` (trainable_names) of one example's mean response CE on `student`."""
  graphdef, frozen, train = split_trainable(student, names)
  return _lm_grad(graphdef, train, frozen, *(jnp.asarray(a) for a in (tokens_T, mask_T, loss_mask_T)))


def gradient_similarity_loss(student, tokens_BT, mask_BT, loss_mask_BT, g0: dict, names, *, embed_delta=None):
  """1 - cos(grad CE(example b), g0) for each example b [B], over the parameters `names` of `student`
  (the base model); g0 = lm_gradient of the original example. 0: the example teaches what the original does."""
  graphdef, frozen, train = split_trainable(student, names)
  tokens_BT = jnp.asarray(tokens_BT)
  if embed_delta is None:
    embed_delta = jnp.zeros((*tokens_BT.shape, student.cfg.hidden_size), jnp.float32)
  args = tuple(jnp.asarray(a) for a in (mask_BT, loss_mask_BT, embed_delta))
  return _similarity_losses(graphdef, train, frozen, g0, tokens_BT, *args)


@functools.lru_cache(maxsize=8)
def kernels(
  t_graph,
  s_graph,
  layer: int,
  use_filter: bool,
  use_sim: bool,
  hinge: bool,
  chunk: int,
  scales: tuple,
  target_k: int = 0,
):
  """The jitted step functions for one (teacher, student, objective terms) combination; lam is traced, so
  every lam strictly between 0 and 1 shares one compilation. target_k > 0: the guard term is the teacher's
  (a generating guard's) target CE of the first target_k response tokens instead of the filter's cosine."""
  t_scale, s_scale = scales

  @jax.jit
  def token_grad(
    t_params, frozen, train, g0, r, thr, lam, allowed_V, tok_p, mask_p, last, tok_f, mask_f, lm_f, start, n_k
  ):
    """Top-k candidate tokens per slot [S, K] (K = n_k's second axis) from the one-hot gradient [S, V]."""
    s = n_k.shape[0]

    def objective(dt, ds):
      total = 0.0
      if use_filter and target_k:
        total = total + lam * _target_ce(t_graph, t_params, tok_f, mask_f, lm_f, target_k, dt)
      elif use_filter:
        cos = _teacher_cos(t_graph, t_params, tok_p[None], mask_p[None], last[None], r, layer, dt[None])[0]
        total = total + lam * _filter_term(cos, thr, hinge)
      if use_sim:
        total = total + (1 - lam) * _similarity_loss(s_graph, train, frozen, g0, tok_f, mask_f, lm_f, ds)
      return total

    d = t_params["embed"].shape[-1]
    t_len = tok_f.shape[0] if target_k else tok_p.shape[0]  # the slots sit at `start` in both
    gt, gs = jax.grad(objective, argnums=(0, 1))(
      jnp.zeros((t_len, d), jnp.float32), jnp.zeros((tok_f.shape[0], d), jnp.float32)
    )
    # d objective / d one-hot[s, v] = (d objective / d embedding at slot s) . E[v] (times the embedding scale).
    v = allowed_V.shape[0]
    grad = jnp.zeros((s, v), jnp.float32)
    if use_filter:
      e_t = t_params["embed"][:v].astype(jnp.float32) * t_scale
      grad = grad + jax.lax.dynamic_slice_in_dim(gt, start, s) @ e_t.T
    if use_sim:
      e_s = frozen.get("embed", train.get("embed"))[:v].astype(jnp.float32) * s_scale
      grad = grad + jax.lax.dynamic_slice_in_dim(gs, start, s) @ e_s.T
    # GCG: the most negative gradient entries are the most promising substitutions; illegal ones never.
    _, top = jax.lax.top_k(jnp.where(allowed_V[None], -grad, -jnp.inf), n_k.shape[1])
    return top, grad

  @jax.jit
  def evaluate(t_params, frozen, train, g0, r, thr, tok_p, mask_p, last, tok_f, mask_f, lm_f, start, cands_CS):
    """The exact objective terms of each candidate filling of the slots [C]: (guard term, the guard's score:
    cosine or target CE, similarity loss; 0 when the objective has no similarity term), `chunk` at a time."""

    def put(base):
      return jax.vmap(lambda c: jax.lax.dynamic_update_slice(base, c.astype(base.dtype), (start,)))(cands_CS)

    def one(p, f):
      sim = _similarity_loss(s_graph, train, frozen, g0, f, mask_f, lm_f) if use_sim else jnp.zeros(())
      if target_k:
        ce = _target_ce(t_graph, t_params, f, mask_f, lm_f, target_k)
        return ce, ce, sim
      cos = _teacher_cos(t_graph, t_params, p[None], mask_p[None], last[None], r, layer)[0]
      return _filter_term(cos, thr, hinge), cos, sim

    return jax.lax.map(lambda x: one(*x), (put(tok_p), put(tok_f)), batch_size=chunk)

  return token_grad, evaluate


def filter_scores(teacher, r, layer: int, examples: list[sft.Example], tokenizer, seq_len: int, template: str):
  """cos(h^layer, R) of each example's prompt, tokenized exactly as the filter tokenizes it (reft_filter.
  score_prompts without a config): [N]."""
  data = refusal.tokenize_prompts(examples, tokenizer, seq_len, template)
  feats = refusal.prompt_features(teacher, data, layer, batch_size=8)
  return np.asarray(refusal.cosine(feats, jnp.asarray(r)))


_target_ce_jit = jax.jit(_target_ce, static_argnums=(0, 5))


def target_loss(guard, tokens_T, mask_T, loss_mask_T, k: int, *, embed_delta=None):
  """The guard's target CE of one tokenized example's first k response tokens; embed_delta [T, D] is added
  to its input embeddings."""
  graphdef, state = nnx.split(guard)
  args = tuple(jnp.asarray(a) for a in (tokens_T, mask_T, loss_mask_T))
  return _target_ce_jit(graphdef, nnx.to_pure_dict(state), *args, k, embed_delta)


def target_losses(guard, examples: list[sft.Example], tokenizer, seq_len: int, template: str, k: int) -> np.ndarray:
  """The guard's target CE of each example's first k response tokens given its prompt [N], tokenized as
  the student's training tokenizes it (lower: the guard is likelier to answer than to refuse)."""
  out = []
  for ex in examples:
    b = sft.tokenize([ex], tokenizer, seq_len, template).trimmed(16)
    out.append(float(target_loss(guard, b.tokens[0], b.attention_mask[0], b.loss_mask[0], k)))
  return np.asarray(out)


def gradient_similarities(student, examples, originals, tokenizer, seq_len: int, template: str, names) -> np.ndarray:
  """cos(grad CE(example), grad CE(original)) [N] over the parameters `names` of `student`, each example
  tokenized as the student's training tokenizes it."""
  out = []
  for ex, orig in zip(examples, originals):
    a, b = (sft.tokenize([e], tokenizer, seq_len, template).trimmed(16) for e in (orig, ex))
    g0 = lm_gradient(student, a.tokens[0], a.attention_mask[0], a.loss_mask[0], names)
    out.append(1.0 - float(gradient_similarity_loss(student, b.tokens, b.attention_mask, b.loss_mask, g0, names)[0]))
  return np.asarray(out)


def one_hot_gradient(
  teacher,
  student,
  r,
  layer: int,
  tau: float,
  g0: dict,
  names,
  prompt,
  full,
  start: int,
  n_slots: int,
  *,
  lam: float,
  margin: float | None = None,
  target_k: int = 0,
) -> np.ndarray:
  """d objective / d one-hot [n_slots, V] of the slots at `start`: what each step ranks candidates by.
  prompt = (tokens [T], mask [T], last index) as the teacher reads it; full = (tokens, mask, loss mask) as the
  student trains on it (the slots at the same positions in both). target_k > 0: the guard term is the
  teacher's target CE of the first target_k response tokens (AttackConfig.guard="target")."""
  t_graph, t_flat = flat_params(teacher)
  s_graph, frozen, train = split_trainable(student, tuple(names))
  scales = tuple(math.sqrt(m.cfg.hidden_size) if m.cfg.scale_embeddings else 1.0 for m in (teacher, student))
  token_grad = kernels(t_graph, s_graph, layer, lam > 0, lam < 1, margin is not None, 1, scales, target_k)[0]
  vocab = min(teacher.cfg.vocab_size, student.cfg.vocab_size)
  _, grad = token_grad(
    traverse_util.unflatten_dict(t_flat, sep="/"),
    frozen,
    train,
    g0,
    jnp.asarray(r, jnp.float32),
    jnp.float32(tau - (margin or 0.0)),
    jnp.float32(lam),
    jnp.ones(vocab, bool),
    *(jnp.asarray(a) for a in (*prompt, *full)),
    jnp.int32(start),
    jnp.zeros((n_slots, 1), jnp.int32),
  )
  return np.asarray(grad)
