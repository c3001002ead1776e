"""Optimizer: schedule, clipping, weight decay, and trainable/frozen groups via optax.multi_transform.

Frozen parameters go through `optax.set_to_zero()`: they keep no optimizer state, and since their
update no longer depends on their gradient, XLA removes that gradient's computation from the step.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, traverse_util

TRAINABLE, FROZEN = "trainable", "frozen"
MODES = ("full", "lora", "regex")


def path_str(path: tuple) -> str:
  return "/".join(str(p) for p in path)


def trainable_labels(params: dict, mode: str, regex: str = "") -> dict:
  """A pytree like params with 'trainable'/'frozen' leaves.

  full: everything; lora: only LoRA adapters; regex: parameters whose path (e.g.
  'blocks/mlp/up/kernel') matches `regex` (re.search).
  """
  if mode not in MODES:
    raise ValueError(f"train.mode={mode!r} must be one of {MODES}")
  if mode == "regex":
    try:
      pattern = re.compile(regex)
    except re.error as e:
      raise ValueError(f"train.trainable_regex={regex!r} is not a valid regex: {e}") from None
  flat = traverse_util.flatten_dict(params)

  def label(path):
    if mode == "full":
      return TRAINABLE
    if mode == "lora":
      return TRAINABLE if path[-1] in ("lora_a", "lora_b") else FROZEN
    return TRAINABLE if pattern.search(path_str(path)) else FROZEN

  labels = {p: label(p) for p in flat}
  if TRAINABLE not in labels.values():
    what = {
      "lora": "no LoRA parameters (set train.lora_rank and targets)",
      "regex": f"train.trainable_regex={regex!r} matches no parameter",
    }.get(mode, "none")
    raise ValueError(f"nothing to train: {what}; parameter paths look like {path_str(next(iter(flat)))!r}")
  return traverse_util.unflatten_dict(labels)


def make_schedule(lr: float, num_steps: int, warmup_steps: int = 0, kind: str = "cosine"):
  warmup_steps = min(warmup_steps, max(num_steps - 1, 0))
  if kind == "constant":
    main = optax.constant_schedule(lr)
  elif kind == "linear":
    main = optax.linear_schedule(lr, 0.0, max(num_steps - warmup_steps, 1))
  elif kind == "cosine":
    main = optax.cosine_decay_schedule(lr, max(num_steps - warmup_steps, 1))
  else:
    raise ValueError(f"train.schedule={kind!r} must be constant, linear or cosine")
  if warmup_steps <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), main], [warmup_steps])


def _decay_mask(params):
  # No weight decay on norms, biases and embeddings' norm-like vectors (standard practice).
  return jax.tree_util.tree_map_with_path(lambda p, x: x.ndim >= 2 and str(p[-1].key) != "bias", params)


def make_optimizer(
  params: dict,
  *,
  lr: float,
  num_steps: int,
  warmup_steps: int = 0,
  schedule: str = "cosine",
  weight_decay: float = 0.0,
  grad_clip: float = 1.0,
  b1: float = 0.9,
  b2: float = 0.999,
  mode: str = "full",
  trainable_regex: str = "",
) -> tuple[optax.GradientTransformation, Any, dict]:
  """Returns (optimizer, learning-rate schedule, labels)."""
  sched = make_schedule(lr, num_steps, warmup_steps, schedule)
  parts = []
  if grad_clip and grad_clip > 0:
    parts.append(optax.clip_by_global_norm(grad_clip))
  parts.append(optax.adamw(sched, b1=b1, b2=b2, weight_decay=weight_decay, mask=_decay_mask))
  labels = trainable_labels(params, mode, trainable_regex)
  tx = optax.multi_transform({TRAINABLE: optax.chain(*parts), FROZEN: optax.set_to_zero()}, labels)
  return tx, sched, labels


def trainable_part(params: dict, labels: dict) -> dict:
  """The entries of `params` labelled trainable (trainable_labels), as a nested dict."""
  flat, flat_l = traverse_util.flatten_dict(params), traverse_util.flatten_dict(labels)
  return traverse_util.unflatten_dict({k: v for k, v in flat.items() if flat_l[k] == TRAINABLE})


def overlay(params: dict, part: dict) -> dict:
  """`params` with the entries at `part`'s paths replaced by part's (cast to the parameter's dtype)."""
  flat = traverse_util.flatten_dict(params)
  flat.update({k: v.astype(flat[k].dtype) for k, v in traverse_util.flatten_dict(part).items()})
  return traverse_util.unflatten_dict(flat)


def trainable_copy(params: dict, labels: dict) -> dict:
  """A float32 copy (new buffers, never aliased) of the trainable entries: a method's weight snapshot."""
  return jax.tree.map(lambda x: jnp.array(x, jnp.float32), trainable_part(params, labels))


def trainable_view(model, mode: str, regex: str = ""):
  """(the trained part of the model's params, with_part(p) -> the model with p in its place): a loss as a
  function of the trained weights alone (Booster's and Panacea's shifted weights, LoRA only under LoRA)."""
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  part = trainable_part(params, trainable_labels(params, mode, regex))
  return part, lambda p: nnx.merge(graphdef, overlay(params, p))
