"""The refusal feature (METHODS.md §1): hidden state at layer l of the last prompt token, the
difference-of-means direction R = mean_harmful h - mean_harmless h, and cosine scores against R.

One jitted hidden-state projection serves the teacher's regularizer, the filter and analysis: the
forward stops after layer l, so scoring costs l/L of a forward pass.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from reft_jax import sharding as shd
from reft_jax.data import sft
from reft_jax.distributed import put, to_host


def last_prompt_features(model, tokens_BT, mask_BT, last_prompt_B, layer: int):
  """h^l at each example's last prompt token: [B, D] float32."""
  _, hidden = model.forward(tokens_BT, mask_BT, hidden_layers=(layer,), stop_after=layer)
  h = hidden[layer]
  return jnp.take_along_axis(h, last_prompt_B[:, None, None], axis=1)[:, 0].astype(jnp.float32)


def cosine(h_BD, r_D, eps: float = 1e-8):
  h_BD, r_D = h_BD.astype(jnp.float32), r_D.astype(jnp.float32)
  return (h_BD @ r_D) / (jnp.linalg.norm(h_BD, axis=-1) * jnp.linalg.norm(r_D) + eps)


def class_means(h_BD, is_harmful_B):
  """(sum of harmful features, count, sum of harmless features, count): sums, so that micro-batches
  and data-parallel shards combine exactly."""
  w = is_harmful_B.astype(jnp.float32)[:, None]
  return (jnp.sum(h_BD * w, 0), jnp.sum(w), jnp.sum(h_BD * (1 - w), 0), jnp.sum(1 - w))


def direction(h_harm_ND, h_safe_MD):
  return jnp.mean(h_harm_ND, axis=0) - jnp.mean(h_safe_MD, axis=0)


def last_prompt_features_layers(model, tokens_BT, mask_BT, last_prompt_B, layers: tuple[int, ...]):
  """[B, len(layers), D]: one forward (stopping at the deepest layer) for several layers."""
  _, hidden = model.forward(tokens_BT, mask_BT, hidden_layers=layers, stop_after=max(layers))
  return jnp.stack(
    [jnp.take_along_axis(hidden[l], last_prompt_B[:, None, None], axis=1)[:, 0] for l in layers], axis=1
  ).astype(jnp.float32)


@functools.lru_cache(maxsize=16)
def _features_fn(graphdef, layers, mesh=None):
  @jax.jit
  def run(params, tokens, mask, last):
    model = nnx.merge(graphdef, params)
    # On a mesh the activations keep the batch split (and attention kernels run per shard).
    with shd.activation_sharding(mesh) if mesh is not None else contextlib.nullcontext():
      if isinstance(layers, int):
        return last_prompt_features(model, tokens, mask, last, layers)
      return last_prompt_features_layers(model, tokens, mask, last, layers)

  return run


def prompt_features(
  model, data: sft.TokenizedSet, layer: int | tuple[int, ...], batch_size: int = 64, mesh=None
) -> np.ndarray:
  """h^l at the last prompt token of every example of `data`: [N, D], or [N, len(layer), D] for a
  tuple of layers (fixed-shape batches, one compile)."""
  graphdef, state = nnx.split(model)
  fn = _features_fn(graphdef, layer, mesh)
  params = nnx.to_pure_dict(state)
  n = len(data)
  width = int(data.attention_mask.sum(1).max())
  width = min(-(-width // 8) * 8, data.tokens.shape[1])
  out = []
  for start in range(0, n, batch_size):
    idx = np.arange(start, min(start + batch_size, n))
    idx = np.concatenate([idx, np.full(batch_size - len(idx), idx[-1])])  # fixed batch shape
    arrays = (data.tokens[idx, :width], data.attention_mask[idx, :width], np.minimum(data.last_prompt[idx], width - 1))
    if mesh is not None:
      arrays = tuple(put(a, shd.batch_sharding(mesh, ndim=a.ndim)) for a in arrays)
    out.append(to_host(fn(params, *arrays))[: min(batch_size, n - start)])  # all rows, every process
  return np.concatenate(out)


def tokenize_prompts(examples: list[sft.Example], tokenizer, seq_len: int, template: str) -> sft.TokenizedSet:
  """Prompts only (the response is dropped): what the filter sees of a user example."""
  import dataclasses

  bare = [dataclasses.replace(e, response="") for e in examples]
  return sft.tokenize(bare, tokenizer, seq_len, template)


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
  """Probability that a random positive scores above a random negative (ties count half)."""
  pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
  if len(pos) == 0 or len(neg) == 0:
    return float("nan")
  greater = (pos[:, None] > neg[None, :]).mean()
  ties = (pos[:, None] == neg[None, :]).mean()
  return float(greater + 0.5 * ties)
