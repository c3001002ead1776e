"""Post-hoc safety restoration (Yang et al., IEEE S&P 2025; METHODS.md §7).

Given the aligned weights theta_A and the fine-tuned theta_F: on the model truncated to its first
floor(2/3 L) blocks, d_h is the aligned model's mean last-prompt-token hidden state on harmful
prompts; each step takes the gradient of -cos(mean h(x; theta), d_h) and restores to theta_A the
`rate` share of edited weights with the largest |grad| among those where moving toward theta_A is a
descent direction. If the task metric then drops by more than `max_drop` points, restored weights
that hurt the task (restoring them raises the task loss to first order) are rolled back to theta_F,
`rollback_frac` of them at a time.

Selection is global over all edited weights (one sort): fine for the models this runs on here; a
7B-scale run would use per-array thresholds from a sampled quantile instead.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from reft_jax import losses, refusal


@dataclasses.dataclass(frozen=True)
class RestoreConfig:
  rate: float = 0.002  # share of edited weights restored per step
  steps: int = 20
  layer_fraction: float = 2 / 3
  max_drop: float = 5.0  # task metric points; rollback above this drop
  rollback_frac: float = 0.2
  max_rollbacks: int = 5


def _flat(model) -> tuple[nnx.GraphDef, dict]:
  graphdef, state = nnx.split(model)
  return graphdef, traverse_util.flatten_dict(nnx.to_pure_dict(state))


def _edited_mask(flat: dict, k: int) -> dict:
  """True on the entries of blocks [0, k) (block params are stacked on axis 0); nothing else."""
  out = {}
  for path, v in flat.items():
    m = np.zeros(v.shape, bool)
    if path[0] == "blocks":
      m[:k] = True
    out[path] = m
  return out


def _set(current: dict, restored: dict, where: list, picks, source: dict, is_restored: bool) -> None:
  """Copies source values into `current` at the picked positions of the concatenation of `where`
  ([(path, flat indices)]), and marks them restored (or not)."""
  offsets = np.cumsum([0] + [len(i) for _, i in where])
  for j in picks:
    a = np.searchsorted(offsets, j, side="right") - 1
    p, idx = where[a]
    at = np.unravel_index(idx[j - offsets[a]], current[p].shape)
    current[p][at] = np.asarray(source[p])[at]
    restored[p][at] = is_restored


def restore_safety(aligned, finetuned, harmful, cfg: RestoreConfig = RestoreConfig(), task_metric=None,
                   task_data: dict | None = None):
  """Returns (restored model, report). harmful: a prompts-only TokenizedSet (refusal.tokenize_prompts).
  task_metric(model) -> points (e.g. accuracy %) drives the rollback; task_data (a batch dict with
  tokens/attention_mask/loss_mask) gives the task gradient that picks what to roll back."""
  k = max(1, int(cfg.layer_fraction * aligned.cfg.num_layers))
  graphdef, flat_a = _flat(aligned)
  _, flat_f = _flat(finetuned)
  mask = _edited_mask(flat_a, k)
  n_edited = int(sum(m.sum() for m in mask.values()))
  d_h = refusal.prompt_features(aligned, harmful, k).mean(0)
  tokens, attn, last = (jnp.asarray(harmful.tokens), jnp.asarray(harmful.attention_mask),
                        jnp.asarray(harmful.last_prompt))

  @jax.jit
  def safety_grad(params):
    def loss(p):
      model = nnx.merge(graphdef, traverse_util.unflatten_dict(p))
      h = refusal.last_prompt_features(model, tokens, attn, last, k).mean(0)
      return -refusal.cosine(h[None], jnp.asarray(d_h))[0]
    return jax.value_and_grad(loss)(params)

  current = {p: np.array(v) for p, v in flat_f.items()}  # writable host copies
  restored = {p: np.zeros(v.shape, bool) for p, v in current.items()}
  history = []
  per_step = max(1, int(round(cfg.rate * n_edited)))
  for step in range(cfg.steps):
    value, grad = safety_grad({p: jnp.asarray(v) for p, v in current.items()})
    # Moving toward theta_A is a descent direction where grad . (theta_A - theta) < 0.
    scores, descent, where = [], [], []
    for p in current:
      m = mask[p] & ~restored[p] & (flat_a[p] != current[p])
      if not m.any():
        continue
      g = np.asarray(grad[p])[m]
      delta = np.asarray(flat_a[p])[m] - current[p][m]
      scores.append(np.abs(g))
      descent.append(g * delta < 0)
      where.append((p, np.flatnonzero(m)))
    if not scores:
      break
    s, d = np.concatenate(scores), np.concatenate(descent)
    # Descent-direction weights first (largest |grad| first), then the rest: rate 1 restores all.
    order = np.lexsort((-s, ~d))[:per_step]
    _set(current, restored, where, order, flat_a, True)
    n_restored = int(sum(r.sum() for r in restored.values()))
    history.append({"step": step, "neg_cos": float(value), "restored": n_restored})

  def model_of(flat):
    return nnx.merge(graphdef, traverse_util.unflatten_dict({p: jnp.asarray(v) for p, v in flat.items()}))

  report = {"edited_layers": k, "edited_weights": n_edited, "history": history, "rollbacks": 0}
  if task_metric is not None:
    before = task_metric(finetuned)
    after = task_metric(model_of(current))
    report.update(task_before=before, task_after=after)
    while before - after > cfg.max_drop and report["rollbacks"] < cfg.max_rollbacks and task_data:
      # Roll back the restored weights whose restoration raised the task loss most (to first order,
      # g . (theta_A - theta_F) > 0).
      def task_loss(p):
        model = nnx.merge(graphdef, traverse_util.unflatten_dict(p))
        logits = model(task_data["tokens"], task_data["attention_mask"])
        t, w = losses.next_token_targets(task_data["tokens"], task_data["loss_mask"])
        s, n = losses.masked_cross_entropy(logits[:, :-1], t, w)
        return s / n
      g = jax.grad(task_loss)({p: jnp.asarray(v) for p, v in current.items()})
      harm = {p: (np.asarray(g[p]) * (np.asarray(flat_a[p]) - np.asarray(flat_f[p]))) for p in current}
      cand = [(p, np.flatnonzero(restored[p].ravel() & (harm[p].ravel() > 0))) for p in current]
      vals = np.concatenate([harm[p].ravel()[i] for p, i in cand])
      n_back = int(np.ceil(cfg.rollback_frac * sum(r.sum() for r in restored.values())))
      if not len(vals):
        break
      _set(current, restored, cand, np.argsort(-vals)[:n_back], flat_f, False)
      report["rollbacks"] += 1
      after = task_metric(model_of(current))
      report["task_after"] = after
  report["restored_weights"] = int(sum(r.sum() for r in restored.values()))
  return model_of(current), report
