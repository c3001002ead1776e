"""Flax NNX decoder for the Llama (2, 3.x), Mistral, Qwen2, Qwen3, Gemma 2 and Gemma 3 families.

Every parameter carries `logical_axes` metadata (see reft_jax/sharding.py for the mesh rules). The
per-layer parameters are stored stacked with a leading "layers" axis, in one layout whether the
forward runs the layers under `jax.lax.scan` (fast compile) or as an unrolled Python loop.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from reft_jax import sharding as shd
from reft_jax.model.config import ModelConfig
from reft_jax.model.kernels import dense
from reft_jax.model.layers import (  # noqa: F401  (the model's vocabulary, re-exported)
  ATTENTION,
  LOGITS_AXES,
  LORA_TARGETS,
  REMAT_POLICIES,
  RESIDUAL_AXES,
  MLP,
  Attention,
  Linear,
  LoraConfig,
  RMSNorm,
  RunOptions,
  _param,
  apply_rope,
  rope_frequencies,
)


class Block(nnx.Module):
  """One decoder layer (parameters stacked over `stack` layers)."""

  def __init__(
    self,
    cfg: ModelConfig,
    *,
    rngs,
    stack=(),
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    lora=None,
    attention="einsum",
    fused=False,
  ):
    kw = dict(rngs=rngs, stack=stack, dtype=dtype, param_dtype=param_dtype, lora=lora, fused=fused)
    norm = dict(rngs=rngs, stack=stack, eps=cfg.rms_norm_eps, plus_one=cfg.norm_plus_one, param_dtype=param_dtype)
    self.attn_norm = RMSNorm(cfg.hidden_size, **norm)
    self.attn = Attention(cfg, **kw, impl=attention)
    self.mlp_norm = RMSNorm(cfg.hidden_size, **norm)
    self.mlp = MLP(cfg, **kw)
    self.sandwich = cfg.sandwich_norms
    if self.sandwich:
      self.post_attn_norm = RMSNorm(cfg.hidden_size, **norm)
      self.post_mlp_norm = RMSNorm(cfg.hidden_size, **norm)

  def __call__(
    self, x, positions, mask, cache=None, cache_index=None, attn_delta=None, segments=None, is_sliding=False
  ):
    h, cache = self.attn(self.attn_norm(x), positions, mask, cache, cache_index, segments, is_sliding)
    if attn_delta is not None:  # the "attn_out" intervention site (before Gemma-2's post-norm)
      h = h + attn_delta.astype(h.dtype)
    h = self.post_attn_norm(h) if self.sandwich else h
    x = x + h
    h = self.mlp(self.mlp_norm(x))
    return x + (self.post_mlp_norm(h) if self.sandwich else h), cache


# Where Transformer.forward's interventions add their deltas (see forward).
INTERVENTION_SITES = ("embed", "attn_out")


def positions_from_mask(attention_mask_BT):
  """Token positions that skip padding (left or right): 0, 1, 2, ... over real tokens."""
  return jnp.maximum(jnp.cumsum(attention_mask_BT, axis=-1) - 1, 0).astype(jnp.int32)


class Transformer(nnx.Module):
  """Decoder LM. `model(tokens, attention_mask)` returns logits [B, T, V]."""

  def __init__(self, cfg: ModelConfig, options: RunOptions = RunOptions(), *, rngs: nnx.Rngs):
    self.cfg, self.options = cfg, options
    dtype, pdtype = jnp.dtype(options.dtype), jnp.dtype(options.param_dtype)
    self.dtype = dtype
    self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pdtype)
    self.blocks = Block(
      cfg,
      rngs=rngs,
      stack=(cfg.num_layers,),
      dtype=dtype,
      param_dtype=pdtype,
      lora=options.lora,
      attention=options.attention,
      fused=options.fuse_projections,
    )
    self.final_norm = RMSNorm(
      cfg.hidden_size, rngs=rngs, eps=cfg.rms_norm_eps, plus_one=cfg.norm_plus_one, param_dtype=pdtype
    )
    self.lm_head = (
      None
      if cfg.tie_embeddings
      else Linear(
        (cfg.hidden_size,), (cfg.vocab_size,), ("embed",), ("vocab",), rngs=rngs, dtype=dtype, param_dtype=pdtype
      )
    )

  def __call__(self, tokens_BT, attention_mask_BT=None, positions_BT=None):
    logits, _ = self.forward(tokens_BT, attention_mask_BT, positions_BT)
    return logits

  def forward(
    self,
    tokens_BT,
    attention_mask_BT=None,
    positions_BT=None,
    *,
    hidden_layers: tuple[int, ...] = (),
    stop_after: int | None = None,
    interventions: Mapping[str, jax.Array] | None = None,
  ):
    """Returns (logits or None, {l: residual stream after l blocks [B,T,D]}).

    hidden_layers (the read sites) use transformers' indexing: 0 = embeddings, l = output of block l
    (pre final norm). With stop_after=l only the first l blocks run and no logits are computed.
    interventions (the write sites, INTERVENTION_SITES) are deltas added to the stream, so their
    gradient is the gradient w.r.t. that activation: "embed" [B,T,D] to the embedded tokens (after any
    embedding scale), "attn_out" [L,B,T,D] to every block's attention output before the residual add
    (before Gemma-2's post-attention norm). The model knows sites, not the methods that use them.
    """
    interventions = {k: v for k, v in (interventions or {}).items() if v is not None}
    unknown = set(interventions) - set(INTERVENTION_SITES)
    if unknown:
      raise ValueError(f"interventions {sorted(unknown)}: the sites are {INTERVENTION_SITES}")
    b, t = tokens_BT.shape
    if attention_mask_BT is None:
      attention_mask_BT = jnp.ones((b, t), jnp.int32)
    if positions_BT is None:
      positions_BT = positions_from_mask(attention_mask_BT)
    x = self._embed(tokens_BT)
    if "embed" in interventions:
      x = x + interventions["embed"].astype(x.dtype)
    x, hidden, _ = self._blocks(
      x,
      positions_BT,
      attention_mask_BT,
      jnp.arange(t),
      hidden_layers=hidden_layers,
      stop_after=stop_after,
      attn_delta=interventions.get("attn_out"),
    )
    return (None if stop_after is not None else self.head(x)), hidden

  def forward_cached(self, tokens_BT, positions_BT, kv_mask_BS, cache, cache_index, *, layers=None, last_only=False):
    """One prefill or decode step against a KV cache (see init_cache): the tokens occupy slots
    [cache_index, cache_index + T); kv_mask_BS marks the slots that hold real tokens.
    Returns (logits [B,T,V], or [B,1,V] for the last token with last_only, updated cache).
    layers: the blocks' per-layer states (layer_states) for a per-layer cache (init_cache(per_layer=True))."""
    slots = cache_index + jnp.arange(tokens_BT.shape[1])
    x, _, cache = self._blocks(
      self._embed(tokens_BT), positions_BT, kv_mask_BS, slots, cache=cache, cache_index=cache_index, layers=layers
    )
    return self.head(x[:, -1:] if last_only else x), cache

  def init_cache(self, batch: int, length: int, dtype=None, per_layer: bool = False) -> dict:
    """Zeroed KV cache {k, v}: [layers, batch, kv_heads, length, head_dim], or with per_layer a tuple of
    one [batch, kv_heads, length, head_dim] array per layer."""
    cfg = self.cfg
    shape, dtype = (batch, cfg.num_kv_heads, length, cfg.head_dim), dtype or self.dtype
    if per_layer:
      return {name: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)) for name in ("k", "v")}
    return {name: jnp.zeros((cfg.num_layers, *shape), dtype) for name in ("k", "v")}

  def layer_states(self) -> tuple:
    """The blocks' parameters cut into one state per layer. Decoding on XLA:CPU against these (and a
    per-layer cache) reads each weight where it lies: slicing the stacked layers inside the decode loop
    copies every weight and the whole cache on each token (~45% of a SmolLM2 decode step, measured)."""
    state = nnx.state(self.blocks)
    return tuple(jax.tree.map(lambda p: p[i], state) for i in range(self.cfg.num_layers))

  def _embed(self, tokens_BT):
    x = jnp.take(self.embed[...], tokens_BT, axis=0).astype(self.dtype)
    # Looked up in the table's layout (D split as "embed", the batch over the remaining axes), then moved
    # to the residual's: an all-to-all, whose transpose keeps the table's gradient a local scatter (else
    # XLA gathers the whole batch's cotangent when both data and fsdp are > 1).
    x = shd.constrain(x, ("batch", None, "embed"), claim_order=(2, 0, 1))
    if self.cfg.scale_embeddings:
      x = x * jnp.asarray(math.sqrt(self.cfg.hidden_size), self.dtype)
    return shd.constrain(x, RESIDUAL_AXES)

  def head(self, x):
    """Final norm + output projection (+ soft-cap): the residual stream [B, T, D] -> logits [B, T, V]."""
    return self.cap_logits(self.head_projection(x))

  def head_projection(self, x):
    """Final norm + output projection, before the soft-cap: [B, T, D] -> [B, T, V]."""
    x = self.final_norm(x)
    logits = dense(x, self.embed[...].astype(self.dtype).T) if self.lm_head is None else self.lm_head(x)
    return shd.constrain(logits, LOGITS_AXES)

  def cap_logits(self, logits):
    """The final logit soft-cap (Gemma 2), or the logits unchanged."""
    cap = self.cfg.final_logit_softcap
    return jnp.tanh(logits / cap) * cap if cap else logits

  def _blocks(
    self,
    x,
    positions_BT,
    kv_mask_BS,
    query_slots_T,
    *,
    hidden_layers=(),
    stop_after=None,
    cache=None,
    cache_index=None,
    attn_delta=None,
    layers=None,
  ):
    """Runs blocks [0, stop_after) over x; queries sit at query_slots_T, keys at slots 0..S-1.
    With per-layer states (`layers`) the blocks run unrolled on them and the cache is per layer."""
    cfg = self.cfg
    L = cfg.num_layers
    stop = L if stop_after is None else stop_after
    if not 0 <= stop <= L or any(not 0 <= l <= stop for l in hidden_layers):
      raise ValueError(
        f"hidden_layers={hidden_layers} / stop_after={stop_after} must lie in "
        f"[0, {L}] with every hidden layer <= stop_after"
      )
    key_slots = jnp.arange(kv_mask_BS.shape[1])
    delta_TS = query_slots_T[:, None] - key_slots[None, :]
    full_BTS = (delta_TS >= 0)[None] & (kv_mask_BS[:, None, :] > 0)
    windows = np.asarray(cfg.windows)
    sliding_BTS = full_BTS & (delta_TS < int(windows.max()))[None] if windows.any() else full_BTS

    graphdef, block_state = nnx.split(self.blocks)
    segments = kv_mask_BS if cache is None else None  # without a cache, keys are the queries' tokens

    def block_fn(state, x, is_sliding, layer_cache, delta):
      # without windows the mask is one for every layer: a loop invariant of lax.scan, not a per-layer array
      mask = jnp.where(is_sliding, sliding_BTS, full_BTS) if windows.any() else full_BTS
      x, c = nnx.merge(graphdef, state)(x, positions_BT, mask, layer_cache, cache_index, delta, segments, is_sliding)
      return shd.constrain(x, RESIDUAL_AXES), c

    if self.options.remat != "none":
      block_fn = jax.checkpoint(block_fn, policy=REMAT_POLICIES[self.options.remat])

    hidden = {0: x} if 0 in hidden_layers else {}
    new_k, new_v = [], []
    bounds = sorted({l for l in hidden_layers if l > 0} | {stop})
    start = 0
    for end in bounds:
      if end == start:
        continue
      if self.options.scan_layers and layers is None:
        seg = jax.tree.map(lambda p: p[start:end], block_state)
        seg_cache = None if cache is None else (cache["k"][start:end], cache["v"][start:end])
        seg_delta = None if attn_delta is None else attn_delta[start:end]

        def body(h, xs):
          h, c = block_fn(xs[0], h, xs[1], xs[2], xs[3])
          return h, c

        x, seg_out = jax.lax.scan(body, x, (seg, jnp.asarray(windows[start:end] > 0), seg_cache, seg_delta))
        if cache is not None:
          new_k.append(seg_out[0])
          new_v.append(seg_out[1])
      else:
        for i in range(start, end):
          layer_cache = None if cache is None else (cache["k"][i], cache["v"][i])
          delta = None if attn_delta is None else attn_delta[i]
          state = layers[i] if layers is not None else jax.tree.map(lambda p: p[i], block_state)
          x, c = block_fn(state, x, bool(windows[i]), layer_cache, delta)
          if cache is not None:
            new_k.append(c[0] if layers is not None else c[0][None])
            new_v.append(c[1] if layers is not None else c[1][None])
      hidden[end] = x
      start = end
    hidden = {l: hidden[l] for l in hidden_layers}
    if cache is not None:
      join = tuple if layers is not None else jnp.concatenate
      cache = {"k": join(new_k), "v": join(new_v)}
    return x, hidden, cache


def init_model(cfg: ModelConfig, options: RunOptions = RunOptions(), seed: int = 0) -> Transformer:
  return Transformer(cfg, options, rngs=nnx.Rngs(params=seed))


def abstract_model(cfg: ModelConfig, options: RunOptions = RunOptions()) -> Transformer:
  """The model with ShapeDtypeStruct leaves: no memory allocated (jax.eval_shape)."""
  return nnx.eval_shape(lambda: Transformer(cfg, options, rngs=nnx.Rngs(params=0)))
