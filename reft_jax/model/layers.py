"""The decoder's building blocks (Flax NNX): run options, LoRA-capable linear maps, RMSNorm, rotary
embeddings, attention (einsum / dpa / cudnn / splash) and the gated MLP. transformer.py stacks them."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from reft_jax.model.config import ModelConfig
from reft_jax.model.kernels import ACTIVATION_FNS, dense, gated, masked_softmax
from reft_jax.model.splash import splash_attention

REMAT_POLICIES: dict[str, Callable | None] = {
  "none": None,  # no rematerialisation
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.checkpoint_dots,
  "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# Each LoRA target's module under a decoder block (block params: blocks/<submodule>/<module>/kernel).
LORA_SITES = {t: ("attn" if t in ("q", "k", "v", "o") else "mlp", t) for t in LORA_TARGETS}
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
  # q/k/v and gate/up as one matmul each (fused_linear). Off: no gain measured on XLA:CPU (README "Speed"),
  # and under tensor parallelism the concatenated kernels would move between devices.
  fuse_projections: bool = False

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

  def __init__(
    self,
    in_shape,
    out_shape,
    in_axes,
    out_axes,
    *,
    rngs,
    stack=(),
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    bias=False,
    lora: LoraConfig | None = None,
  ):
    lead = ("layers",) * len(stack)
    self.n_in = len(in_shape)
    self.dtype = dtype
    self.kernel = _param(rngs, (*stack, *in_shape, *out_shape), (*lead, *in_axes, *out_axes), param_dtype)
    self.bias = (
      _param(rngs, (*stack, *out_shape), (*lead, *out_axes), param_dtype, value=np.zeros((*stack, *out_shape)))
      if bias
      else None
    )
    if lora is not None:
      fan_in = math.prod(in_shape)
      self.lora_scale = lora.scale
      # PEFT's init: A ~ kaiming-uniform, B = 0, so a fresh adapter changes nothing.
      bound = 1.0 / math.sqrt(fan_in)
      a = jax.random.uniform(rngs.params(), (*stack, *in_shape, lora.rank), jnp.float32, -bound, bound)
      self.lora_a = _param(rngs, a.shape, (*lead, *in_axes, "lora"), param_dtype, kind=nnx.LoRAParam, value=a)
      self.lora_b = _param(
        rngs,
        (*stack, lora.rank, *out_shape),
        (*lead, "lora", *out_axes),
        param_dtype,
        kind=nnx.LoRAParam,
        value=np.zeros((*stack, lora.rank, *out_shape)),
      )
    else:
      self.lora_a = self.lora_b = None

  def __call__(self, x):
    x = x.astype(self.dtype)
    y = dense(x, self.kernel[...].astype(self.dtype), self.n_in)
    if self.lora_a is not None:
      h = dense(x, self.lora_a[...].astype(self.dtype), self.n_in)
      y = y + self.lora_scale * dense(h, self.lora_b[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


def fused_linear(x, linears: tuple[Linear, ...]) -> list:
  """[lin(x) for lin in linears] for linear maps of one input (q/k/v, gate/up), as one matmul over their
  kernels side by side and, for those with LoRA, one over their A's and one over a block-diagonal of their
  scaled B's (zero columns for the others): a third of the matmuls (model.fuse_projections; no faster on
  XLA:CPU, README "Speed"). The same values up to float rounding (tests/test_model.py)."""
  if any(lin.n_in != 1 or lin.dtype != linears[0].dtype for lin in linears):
    return [lin(x) for lin in linears]
  dtype, lead = linears[0].dtype, x.shape[:-1]
  x = x.astype(dtype)
  kernels = [lin.kernel[...].astype(dtype) for lin in linears]
  shapes = [k.shape[1:] for k in kernels]
  widths = [math.prod(s) for s in shapes]
  y = dense(x, jnp.concatenate([k.reshape(k.shape[0], -1) for k in kernels], axis=1))
  if any(lin.lora_a is not None for lin in linears):
    # an unadapted map is a 0-row block: its columns of the block-diagonal B are zero
    a = [lin.lora_a[...] if lin.lora_a is not None else jnp.zeros((x.shape[-1], 0)) for lin in linears]
    b = [
      lin.lora_scale * lin.lora_b[...].reshape(-1, w) if lin.lora_a is not None else jnp.zeros((0, w))
      for lin, w in zip(linears, widths)
    ]
    a = jnp.concatenate(a, axis=1).astype(dtype)
    y = y + dense(dense(x, a), jax.scipy.linalg.block_diag(*b).astype(dtype))
  outs = jnp.split(y, np.cumsum(widths)[:-1], axis=-1)
  outs = [o.reshape(*lead, *s) for o, s in zip(outs, shapes)]
  return [o if lin.bias is None else o + lin.bias[...].astype(dtype) for o, lin in zip(outs, linears)]


class RMSNorm(nnx.Module):
  def __init__(self, dim, *, rngs, stack=(), eps=1e-6, plus_one=False, param_dtype=jnp.float32):
    init = np.zeros if plus_one else np.ones
    self.scale = _param(
      rngs, (*stack, dim), ("layers",) * len(stack) + ("norm",), param_dtype, value=init((*stack, dim))
    )
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
  factor, lo, hi, ctx = (
    s["factor"],
    s["low_freq_factor"],
    s["high_freq_factor"],
    s["original_max_position_embeddings"],
  )
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
  def __init__(self, cfg: ModelConfig, *, rngs, stack, dtype, param_dtype, lora, impl="einsum", fused=False):
    d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def lin(name, in_shape, out_shape, in_axes, out_axes, bias=False):
      return Linear(
        in_shape,
        out_shape,
        in_axes,
        out_axes,
        rngs=rngs,
        stack=stack,
        dtype=dtype,
        param_dtype=param_dtype,
        bias=bias,
        lora=lora if lora and name in lora.targets else None,
      )

    self.q = lin("q", (d,), (h, hd), ("embed",), ("heads", "kv"), cfg.qkv_bias)
    self.k = lin("k", (d,), (kv, hd), ("embed",), ("kv_heads", "kv"), cfg.qkv_bias)
    self.v = lin("v", (d,), (kv, hd), ("embed",), ("kv_heads", "kv"), cfg.qkv_bias)
    self.o = lin("o", (h, hd), (d,), ("heads", "kv"), ("embed",))
    if cfg.qk_norm:  # one scale over head_dim, shared by the heads (replicated like every norm scale)
      norm = dict(rngs=rngs, stack=stack, eps=cfg.rms_norm_eps, plus_one=cfg.norm_plus_one, param_dtype=param_dtype)
      self.q_norm, self.k_norm = RMSNorm(hd, **norm), RMSNorm(hd, **norm)
    else:
      self.q_norm = self.k_norm = None
    self.groups = h // kv
    self.scale = cfg.query_scale if cfg.query_scale is not None else hd**-0.5
    self.softcap = cfg.attn_logit_softcap
    # dot_product_attention has no logit soft-cap; splash has.
    self.impl = "einsum" if self.softcap and impl in ("dpa", "cudnn") else impl
    self.cfg = cfg  # static; rope frequencies are recomputed at trace time (a numpy constant)
    self.fused = fused

  def __call__(self, x_BTD, positions_BT, mask_BTS, cache=None, cache_index=None, segments_BT=None, is_sliding=False):
    """With cache=(k [B,KV,S,D], v), the new keys/values are written at slot cache_index and the
    queries attend over all S slots (mask_BTS covers slots); returns (out, updated cache).
    segments_BT (the padding mask) and is_sliding feed the splash kernel, which takes no dense mask."""
    inv_freq = rope_frequencies(self.cfg)
    if self.cfg.rope_local_theta is not None:  # Gemma 3: local layers rotate at their own base
      local = rope_frequencies(self.cfg, local=True)
      inv_freq = (
        (local if is_sliding else inv_freq) if isinstance(is_sliding, bool) else jnp.where(is_sliding, local, inv_freq)
      )  # scanned layers: a traced kind
    qkv = (self.q, self.k, self.v)
    q, k, v = fused_linear(x_BTD, qkv) if self.fused else [lin(x_BTD) for lin in qkv]
    if self.q_norm is not None:  # QK-norm comes before RoPE (Qwen3Attention, Gemma3Attention)
      q, k = self.q_norm(q), self.k_norm(k)
    q = apply_rope(q, positions_BT, inv_freq)
    k = apply_rope(k, positions_BT, inv_freq)
    if cache is not None:  # head-major [B, KV, S, D]: the attention dots read it without a transpose
      put = lambda c, new: jax.lax.dynamic_update_slice_in_dim(
        c, jnp.swapaxes(new, 1, 2).astype(c.dtype), cache_index, 2
      )
      cache = (put(cache[0], k), put(cache[1], v))
      k, v = cache
    impl = self.impl
    if impl == "splash" and cache is None:
      attend = lambda window: functools.partial(splash_attention, scale=self.scale, window=window, softcap=self.softcap)
      window = max(self.cfg.windows)
      if isinstance(is_sliding, bool) or not window:  # unrolled layers: the layer kind is static
        out = attend(window if window and is_sliding else 0)(q, k, v, segments_BT)
      else:  # scanned layers: both kernels are compiled, each layer runs one
        out = jax.lax.cond(is_sliding, attend(window), attend(0), q, k, v, segments_BT)
      return self.o(out), cache
    if impl == "splash":  # decoding against a KV cache: XLA attention
      impl = "einsum" if self.softcap else "dpa"
    if impl != "einsum":
      if cache is not None:
        k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
      # The mask already holds causality, padding and the sliding window; GQA is native.
      out = jax.nn.dot_product_attention(
        q.astype(k.dtype),
        k,
        v.astype(k.dtype),
        mask=mask_BTS[:, None],
        scale=self.scale,
        implementation="cudnn" if impl == "cudnn" else None,
      )
      return self.o(out), cache
    b, t = x_BTD.shape[:2]
    q = q.reshape(b, t, self.cfg.num_kv_heads, self.groups, self.cfg.head_dim)
    out = einsum_attention(q, k, v, mask_BTS, self.scale, self.softcap, head_major=cache is not None)
    return self.o(out.reshape(b, t, -1, self.cfg.head_dim)), cache


def einsum_attention(q_BTKGD, k, v, mask_BTS, scale, softcap=None, head_major=False):
  """Softmax attention with explicit scores: queries [B, T, KV, G, D] against keys / values [B, S, KV, D],
  or [B, KV, S, D] with head_major (the KV cache's layout); returns [B, T, KV, G, D].

  Head-major keys get head-major queries: both dots are then plain per-(batch, kv head) matmuls over
  [G*T, D] rows, which XLA:CPU hands to YNNPACK; with the queries in token-major order it ran probs.V as
  a batched Eigen dot, 2.2x slower over a SmolLM2 decode step's 30 layers (README, generation)."""
  q, q_spec, kv_spec = q_BTKGD, "btkgd", "bskd"
  if head_major:
    q, q_spec, kv_spec = jnp.transpose(q, (0, 2, 3, 1, 4)), "bkgtd", "bksd"
  scores = jnp.einsum(f"{q_spec},{kv_spec}->bkgts", q, k, preferred_element_type=jnp.float32) * scale
  if softcap:
    scores = jnp.tanh(scores / softcap) * softcap
  probs = masked_softmax(scores, mask_BTS).astype(v.dtype)
  out = jnp.einsum(f"bkgts,{kv_spec}->{q_spec}", probs, v)
  return jnp.transpose(out, (0, 3, 1, 2, 4)) if head_major else out


class MLP(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs, stack, dtype, param_dtype, lora, fused=False):
    d, f = cfg.hidden_size, cfg.intermediate_size

    def lin(name, i, o, ia, oa):
      return Linear(
        (i,),
        (o,),
        (ia,),
        (oa,),
        rngs=rngs,
        stack=stack,
        dtype=dtype,
        param_dtype=param_dtype,
        lora=lora if lora and name in lora.targets else None,
      )

    self.gate = lin("gate", d, f, "embed", "mlp")
    self.up = lin("up", d, f, "embed", "mlp")
    self.down = lin("down", f, d, "mlp", "embed")
    self.activation = cfg.activation
    self.fused = fused

  def __call__(self, x):
    g, up = fused_linear(x, (self.gate, self.up)) if self.fused else (self.gate(x), self.up(x))
    return self.down(gated(g, up, ACTIVATION_FNS[self.activation]))
