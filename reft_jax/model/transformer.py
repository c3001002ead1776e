"""Flax NNX decoder for the Llama (2, 3.x), Mistral, Qwen2, Qwen3, Gemma 2 and Gemma 3 families.

Every parameter carries `logical_axes` metadata (see reft_jax/sharding.py for the mesh rules). The
per-layer parameters are stored stacked with a leading "layers" axis, in one layout whether the
forward runs the layers under `jax.lax.scan` (fast compile) or as an unrolled Python loop.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from reft_jax import sharding as shd
from reft_jax.model.config import ModelConfig
from reft_jax.model.splash import splash_attention

REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,  # no rematerialisation
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# einsum: explicit scores + softmax (every feature); dpa: jax.nn.dot_product_attention, XLA picks the
# implementation; cudnn: its cuDNN flash kernel (GPU, bf16/fp16); splash: the Pallas TPU kernel
# (model/splash.py) for passes without a KV cache, XLA attention with one. The dpa paths fall back to
# einsum where they cannot express the model (attention logit soft-capping).
ATTENTION = ("einsum", "dpa", "cudnn", "splash")
# Logical axes of the activations pinned with shd.constrain (a no-op unless a mesh is active): the batch
# stays split over the data-parallel axes, so XLA gathers weights, not activations.
RESIDUAL_AXES = ("batch", None, None)  # [B, T, D]
LOGITS_AXES = ("batch", None, "vocab")  # [B, T, V]


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] = ("q", "v")

  def __post_init__(self):
    if self.rank <= 0:
      raise ValueError(f"lora.rank={self.rank} must be positive")
    bad = [t for t in self.targets if t not in LORA_TARGETS]
    if bad or not self.targets:
      raise ValueError(f"lora.targets={self.targets!r}: each must be one of {LORA_TARGETS}")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class RunOptions:
  """How the model computes, as opposed to what it is (ModelConfig)."""

  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  scan_layers: bool = False
  remat: str = "none"
  lora: LoraConfig | None = None
  attention: str = "einsum"

  def __post_init__(self):
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r} is not one of {tuple(REMAT_POLICIES)}")
    if self.attention not in ATTENTION:
      raise ValueError(f"attention={self.attention!r} is not one of {ATTENTION}")
    for f in ("dtype", "param_dtype"):
      if getattr(self, f) not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"{f}={getattr(self, f)!r} must be float32, bfloat16 or float16")


def _param(rngs: nnx.Rngs, shape, axes, dtype, std=0.02, kind=nnx.Param, value=None):
  if value is None:
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
  return kind(jnp.asarray(value, dtype), logical_axes=tuple(axes))


class Linear(nnx.Module):
  """y = x . W (+ b) (+ LoRA), W of shape stack + in_shape + out_shape, contracting in_shape."""

  def __init__(self, in_shape, out_shape, in_axes, out_axes, *, rngs, stack=(), dtype=jnp.float32,
               param_dtype=jnp.float32, bias=False, lora: LoraConfig | None = None):
    lead = ("layers",) * len(stack)
    self.n_in = len(in_shape)
    self.dtype = dtype
    self.kernel = _param(rngs, (*stack, *in_shape, *out_shape), (*lead, *in_axes, *out_axes),
                         param_dtype)
    self.bias = (_param(rngs, (*stack, *out_shape), (*lead, *out_axes), param_dtype,
                        value=np.zeros((*stack, *out_shape))) if bias else None)
    if lora is not None:
      fan_in = math.prod(in_shape)
      self.lora_scale = lora.scale
      # PEFT's init: A ~ kaiming-uniform, B = 0, so a fresh adapter changes nothing.
      bound = 1.0 / math.sqrt(fan_in)
      a = jax.random.uniform(rngs.params(), (*stack, *in_shape, lora.rank), jnp.float32, -bound, bound)
      self.lora_a = _param(rngs, a.shape, (*lead, *in_axes, "lora"), param_dtype, kind=nnx.LoRAParam,
                           value=a)
      self.lora_b = _param(rngs, (*stack, lora.rank, *out_shape), (*lead, "lora", *out_axes),
                           param_dtype, kind=nnx.LoRAParam, value=np.zeros((*stack, lora.rank,
                                                                            *out_shape)))
    else:
      self.lora_a = self.lora_b = None

  def __call__(self, x):
    x = x.astype(self.dtype)
    y = jnp.tensordot(x, self.kernel[...].astype(self.dtype), axes=self.n_in)
    if self.lora_a is not None:
      h = jnp.tensordot(x, self.lora_a[...].astype(self.dtype), axes=self.n_in)
      y = y + self.lora_scale * jnp.tensordot(h, self.lora_b[...].astype(self.dtype), axes=1)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class RMSNorm(nnx.Module):
  def __init__(self, dim, *, rngs, stack=(), eps=1e-6, plus_one=False, param_dtype=jnp.float32):
    init = np.zeros if plus_one else np.ones
    self.scale = _param(rngs, (*stack, dim), ("layers",) * len(stack) + ("norm",), param_dtype,
                        value=init((*stack, dim)))
    self.eps, self.plus_one = eps, plus_one

  def __call__(self, x):
    dtype = x.dtype
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    w = self.scale[...].astype(jnp.float32)
    return (x * (1.0 + w if self.plus_one else w)).astype(dtype)


def rope_frequencies(cfg: ModelConfig, local: bool = False) -> np.ndarray:
  """Inverse frequencies [head_dim/2], with Llama-3 or linear scaling when configured (as transformers'
  _compute_llama3_parameters / _compute_linear_scaling_rope_parameters do). local=True: the sliding
  layers' frequencies where they have their own base (Gemma 3: rope_local_theta, never scaled)."""
  dim = cfg.head_dim
  local = local and cfg.rope_local_theta is not None
  theta = cfg.rope_local_theta if local else cfg.rope_theta
  inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
  if not cfg.rope_scaling or local:
    return inv_freq
  s = dict(cfg.rope_scaling)
  if len(s) == 1:  # linear: positions / factor, i.e. every frequency / factor
    return (inv_freq / np.float32(s["factor"])).astype(np.float32)
  factor, lo, hi, ctx = (s["factor"], s["low_freq_factor"], s["high_freq_factor"],
                         s["original_max_position_embeddings"])
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > ctx / lo, inv_freq / factor, inv_freq)
  smooth = (ctx / wavelen - lo) / (hi - lo)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < ctx / hi) & ~(wavelen > ctx / lo)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x_BTHD, positions_BT, inv_freq):
  angles = positions_BT[..., None].astype(jnp.float32) * inv_freq  # B,T,D/2
  cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x_BTHD.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTHD.dtype)


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs, stack, dtype, param_dtype, lora, impl="einsum"):
    d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def lin(name, in_shape, out_shape, in_axes, out_axes, bias=False):
      return Linear(in_shape, out_shape, in_axes, out_axes, rngs=rngs, stack=stack, dtype=dtype,
                    param_dtype=param_dtype, bias=bias,
                    lora=lora if lora and name in lora.targets else None)

    self.q = lin("q", (d,), (h, hd), ("embed",), ("heads", "kv"), cfg.qkv_bias)
    self.k = lin("k", (d,), (kv, hd), ("embed",), ("kv_heads", "kv"), cfg.qkv_bias)
    self.v = lin("v", (d,), (kv, hd), ("embed",), ("kv_heads", "kv"), cfg.qkv_bias)
    self.o = lin("o", (h, hd), (d,), ("heads", "kv"), ("embed",))
    if cfg.qk_norm:  # one scale over head_dim, shared by the heads (replicated like every norm scale)
      norm = dict(rngs=rngs, stack=stack, eps=cfg.rms_norm_eps, plus_one=cfg.norm_plus_one,
                  param_dtype=param_dtype)
      self.q_norm, self.k_norm = RMSNorm(hd, **norm), RMSNorm(hd, **norm)
    else:
      self.q_norm = self.k_norm = None
    self.groups = h // kv
    self.scale = cfg.query_scale if cfg.query_scale is not None else hd ** -0.5
    self.softcap = cfg.attn_logit_softcap
    # dot_product_attention has no logit soft-cap; splash has.
    self.impl = "einsum" if self.softcap and impl in ("dpa", "cudnn") else impl
    self.cfg = cfg  # static; rope frequencies are recomputed at trace time (a numpy constant)

  def __call__(self, x_BTD, positions_BT, mask_BTS, cache=None, cache_index=None, segments_BT=None,
               is_sliding=False):
    """With cache=(k [B,S,KV,D], v), the new keys/values are written at slot cache_index and the
    queries attend over all S slots (mask_BTS covers slots); returns (out, updated cache).
    segments_BT (the padding mask) and is_sliding feed the splash kernel, which takes no dense mask."""
    inv_freq = rope_frequencies(self.cfg)
    if self.cfg.rope_local_theta is not None:  # Gemma 3: local layers rotate at their own base
      local = rope_frequencies(self.cfg, local=True)
      inv_freq = ((local if is_sliding else inv_freq) if isinstance(is_sliding, bool)
                  else jnp.where(is_sliding, local, inv_freq))  # scanned layers: a traced kind
    q, k = self.q(x_BTD), self.k(x_BTD)
    if self.q_norm is not None:  # QK-norm comes before RoPE (Qwen3Attention, Gemma3Attention)
      q, k = self.q_norm(q), self.k_norm(k)
    q = apply_rope(q, positions_BT, inv_freq)
    k = apply_rope(k, positions_BT, inv_freq)
    v = self.v(x_BTD)
    if cache is not None:
      k = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), cache_index, axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), cache_index, axis=1)
      cache = (k, v)
    impl = self.impl
    if impl == "splash" and cache is None:
      attend = lambda window: functools.partial(splash_attention, scale=self.scale, window=window,
                                                softcap=self.softcap)
      window = max(self.cfg.windows)
      if isinstance(is_sliding, bool) or not window:  # unrolled layers: the layer kind is static
        out = attend(window if window and is_sliding else 0)(q, k, v, segments_BT)
      else:  # scanned layers: both kernels are compiled, each layer runs one
        out = jax.lax.cond(is_sliding, attend(window), attend(0), q, k, v, segments_BT)
      return self.o(out), cache
    if impl == "splash":  # decoding against a KV cache: XLA attention
      impl = "einsum" if self.softcap else "dpa"
    if impl != "einsum":
      # The mask already holds causality, padding and the sliding window; GQA is native.
      out = jax.nn.dot_product_attention(q.astype(k.dtype), k, v.astype(k.dtype), mask=mask_BTS[:, None],
                                         scale=self.scale,
                                         implementation="cudnn" if impl == "cudnn" else None)
      return self.o(out), cache
    b, t = x_BTD.shape[:2]
    kv, hd = k.shape[2:]
    q = q.reshape(b, t, kv, self.groups, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * self.scale
    if self.softcap:
      scores = jnp.tanh(scores / self.softcap) * self.softcap
    # A finite minimum (not -inf) keeps fully masked rows (padding queries) free of NaNs.
    scores = jnp.where(mask_BTS[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, kv * self.groups, hd)
    return self.o(out), cache


class MLP(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs, stack, dtype, param_dtype, lora):
    d, f = cfg.hidden_size, cfg.intermediate_size

    def lin(name, i, o, ia, oa):
      return Linear((i,), (o,), (ia,), (oa,), rngs=rngs, stack=stack, dtype=dtype,
                    param_dtype=param_dtype, lora=lora if lora and name in lora.targets else None)

    self.gate = lin("gate", d, f, "embed", "mlp")
    self.up = lin("up", d, f, "embed", "mlp")
    self.down = lin("down", f, d, "mlp", "embed")
    self.activation = cfg.activation

  def __call__(self, x):
    g = self.gate(x)
    if self.activation == "silu":
      g = jax.nn.silu(g)
    else:
      g = jax.nn.gelu(g, approximate=self.activation == "gelu_pytorch_tanh")
    return self.down(g * self.up(x))


class Block(nnx.Module):
  """One decoder layer (parameters stacked over `stack` layers)."""

  def __init__(self, cfg: ModelConfig, *, rngs, stack=(), dtype=jnp.float32,
               param_dtype=jnp.float32, lora=None, attention="einsum"):
    kw = dict(rngs=rngs, stack=stack, dtype=dtype, param_dtype=param_dtype, lora=lora)
    norm = dict(rngs=rngs, stack=stack, eps=cfg.rms_norm_eps, plus_one=cfg.norm_plus_one,
                param_dtype=param_dtype)
    self.attn_norm = RMSNorm(cfg.hidden_size, **norm)
    self.attn = Attention(cfg, **kw, impl=attention)
    self.mlp_norm = RMSNorm(cfg.hidden_size, **norm)
    self.mlp = MLP(cfg, **kw)
    self.sandwich = cfg.sandwich_norms
    if self.sandwich:
      self.post_attn_norm = RMSNorm(cfg.hidden_size, **norm)
      self.post_mlp_norm = RMSNorm(cfg.hidden_size, **norm)

  def __call__(self, x, positions, mask, cache=None, cache_index=None, attn_delta=None, segments=None,
               is_sliding=False):
    h, cache = self.attn(self.attn_norm(x), positions, mask, cache, cache_index, segments, is_sliding)
    if attn_delta is not None:  # Vaccine perturbs the attention module's output (before Gemma-2's post-norm)
      h = h + attn_delta.astype(h.dtype)
    h = self.post_attn_norm(h) if self.sandwich else h
    x = x + h
    h = self.mlp(self.mlp_norm(x))
    return x + (self.post_mlp_norm(h) if self.sandwich else h), cache


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
    self.blocks = Block(cfg, rngs=rngs, stack=(cfg.num_layers,), dtype=dtype, param_dtype=pdtype,
                        lora=options.lora, attention=options.attention)
    self.final_norm = RMSNorm(cfg.hidden_size, rngs=rngs, eps=cfg.rms_norm_eps,
                              plus_one=cfg.norm_plus_one, param_dtype=pdtype)
    self.lm_head = None if cfg.tie_embeddings else Linear(
        (cfg.hidden_size,), (cfg.vocab_size,), ("embed",), ("vocab",), rngs=rngs, dtype=dtype,
        param_dtype=pdtype)

  def __call__(self, tokens_BT, attention_mask_BT=None, positions_BT=None):
    logits, _ = self.forward(tokens_BT, attention_mask_BT, positions_BT)
    return logits

  def forward(self, tokens_BT, attention_mask_BT=None, positions_BT=None, *,
              hidden_layers: tuple[int, ...] = (), stop_after: int | None = None, attn_delta_LBTD=None,
              embed_delta_BTD=None):
    """Returns (logits or None, {l: residual stream after l blocks [B,T,D]}).

    hidden_layers use transformers' indexing: 0 = embeddings, l = output of block l (pre final
    norm). With stop_after=l only the first l blocks run and no logits are computed.
    attn_delta_LBTD is added to every block's attention output before the residual add; its
    gradient is the gradient w.r.t. the attention outputs. embed_delta_BTD is added to the embedded
    tokens (after any embedding scale), the input perturbation of SMART.
    """
    b, t = tokens_BT.shape
    if attention_mask_BT is None:
      attention_mask_BT = jnp.ones((b, t), jnp.int32)
    if positions_BT is None:
      positions_BT = positions_from_mask(attention_mask_BT)
    x = self._embed(tokens_BT)
    if embed_delta_BTD is not None:
      x = x + embed_delta_BTD.astype(x.dtype)
    x, hidden, _ = self._blocks(x, positions_BT, attention_mask_BT, jnp.arange(t),
                                hidden_layers=hidden_layers, stop_after=stop_after,
                                attn_delta=attn_delta_LBTD)
    return (None if stop_after is not None else self.head(x)), hidden

  def forward_cached(self, tokens_BT, positions_BT, kv_mask_BS, cache, cache_index):
    """One prefill or decode step against a KV cache (see init_cache): the tokens occupy slots
    [cache_index, cache_index + T); kv_mask_BS marks the slots that hold real tokens.
    Returns (logits [B,T,V], updated cache)."""
    slots = cache_index + jnp.arange(tokens_BT.shape[1])
    x, _, cache = self._blocks(self._embed(tokens_BT), positions_BT, kv_mask_BS, slots,
                               cache=cache, cache_index=cache_index)
    return self.head(x), cache

  def init_cache(self, batch: int, length: int, dtype=None) -> dict:
    """Zeroed KV cache {k, v}: [layers, batch, length, kv_heads, head_dim]."""
    cfg = self.cfg
    shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype or self.dtype), "v": jnp.zeros(shape, dtype or self.dtype)}

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
    x = self.final_norm(x)
    if self.lm_head is None:
      logits = jnp.einsum("btd,vd->btv", x, self.embed[...].astype(self.dtype))
    else:
      logits = self.lm_head(x)
    cap = self.cfg.final_logit_softcap
    return shd.constrain(jnp.tanh(logits / cap) * cap if cap else logits, LOGITS_AXES)

  def _blocks(self, x, positions_BT, kv_mask_BS, query_slots_T, *, hidden_layers=(), stop_after=None,
              cache=None, cache_index=None, attn_delta=None):
    """Runs blocks [0, stop_after) over x; queries sit at query_slots_T, keys at slots 0..S-1."""
    cfg = self.cfg
    L = cfg.num_layers
    stop = L if stop_after is None else stop_after
    if not 0 <= stop <= L or any(not 0 <= l <= stop for l in hidden_layers):
      raise ValueError(f"hidden_layers={hidden_layers} / stop_after={stop_after} must lie in "
                       f"[0, {L}] with every hidden layer <= stop_after")
    key_slots = jnp.arange(kv_mask_BS.shape[1])
    delta_TS = query_slots_T[:, None] - key_slots[None, :]
    full_BTS = (delta_TS >= 0)[None] & (kv_mask_BS[:, None, :] > 0)
    windows = np.asarray(cfg.windows)
    sliding_BTS = full_BTS & (delta_TS < int(windows.max()))[None] if windows.any() else full_BTS

    graphdef, block_state = nnx.split(self.blocks)
    segments = kv_mask_BS if cache is None else None  # without a cache, keys are the queries' tokens

    def block_fn(state, x, is_sliding, layer_cache, delta):
      mask = jnp.where(is_sliding, sliding_BTS, full_BTS)
      x, c = nnx.merge(graphdef, state)(x, positions_BT, mask, layer_cache, cache_index, delta,
                                        segments, is_sliding)
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
      if self.options.scan_layers:
        seg = jax.tree.map(lambda p: p[start:end], block_state)
        seg_cache = None if cache is None else (cache["k"][start:end], cache["v"][start:end])
        seg_delta = None if attn_delta is None else attn_delta[start:end]

        def body(h, xs):
          h, c = block_fn(xs[0], h, xs[1], xs[2], xs[3])
          return h, c

        x, seg_out = jax.lax.scan(body, x, (seg, jnp.asarray(windows[start:end] > 0), seg_cache,
                                            seg_delta))
        if cache is not None:
          new_k.append(seg_out[0])
          new_v.append(seg_out[1])
      else:
        for i in range(start, end):
          layer_cache = None if cache is None else (cache["k"][i], cache["v"][i])
          delta = None if attn_delta is None else attn_delta[i]
          x, c = block_fn(jax.tree.map(lambda p: p[i], block_state), x, bool(windows[i]), layer_cache,
                          delta)
          if cache is not None:
            new_k.append(c[0][None])
            new_v.append(c[1][None])
      hidden[end] = x
      start = end
    hidden = {l: hidden[l] for l in hidden_layers}
    if cache is not None:
      cache = {"k": jnp.concatenate(new_k), "v": jnp.concatenate(new_v)}
    return x, hidden, cache


def init_model(cfg: ModelConfig, options: RunOptions = RunOptions(), seed: int = 0) -> Transformer:
  return Transformer(cfg, options, rngs=nnx.Rngs(params=seed))


def abstract_model(cfg: ModelConfig, options: RunOptions = RunOptions()) -> Transformer:
  """The model with ShapeDtypeStruct leaves: no memory allocated (jax.eval_shape)."""
  return nnx.eval_shape(lambda: Transformer(cfg, options, rngs=nnx.Rngs(params=0)))
