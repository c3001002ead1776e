"""Splash attention: the Pallas TPU flash-attention kernel that ships with JAX (what MaxText uses).

Used by `model.attention=splash` for the forward passes without a KV cache (training, the teacher, the
refusal-feature pass); generation falls back to XLA attention. Causality and the sliding window are the
kernel's static block-sparse masks; padding (left or right) becomes segment ids, so a real token attends
only to real tokens, as in the einsum path. On a backend other than TPU the kernel runs in Pallas'
interpreter, which is correct but slow: that is how the tests check it on CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jax.sharding import PartitionSpec as P

from reft_jax import sharding as shd

LANES = 128  # the kernel's key blocks are multiples of the TPU lane width


def _block(length: int) -> int:
  """The largest of MaxText's usual block sizes that divides the (lane-padded) length."""
  return next(b for b in (512, 256, 128) if length % b == 0)


def _kernel(length: int, heads: int, window: int, softcap: float | None, interpret: bool):
  """The kernel for one (padded length, heads, window). Made in every trace (it holds arrays, so a
  cached one would leak tracers); the costly part, the mask's block structure in numpy, is cached by
  the library."""
  if window:  # our sliding window lets a query see itself and the window-1 tokens before it
    mask = masks.LocalMask((length, length), window_size=(window - 1, 0), offset=0)
  else:
    mask = masks.CausalMask((length, length))
  b = _block(length)
  sizes = splash.BlockSizes(
    block_q=b,
    block_kv=b,
    block_kv_compute=b,
    block_q_dkv=b,
    block_kv_dkv=b,
    block_kv_dkv_compute=b,
    block_q_dq=b,
    block_kv_dq=b,
  )
  return splash.make_splash_mha(
    masks.MultiHeadMask([mask] * heads),
    block_sizes=sizes,
    head_shards=1,
    q_seq_shards=1,
    attn_logits_soft_cap=softcap,
    interpret=interpret,
  )


def splash_attention(
  q_BTHD, k_BTKD, v_BTKD, segments_BT, *, scale: float, window: int = 0, softcap: float | None = None
):
  """Causal (optionally sliding-window, soft-capped) GQA attention; returns [B, T, H, D].

  segments_BT: 1 for real tokens, 0 for padding. Padding queries attend to padding keys only; their
  outputs are meaningless, as in the other paths, and never read."""
  b, t, h, d = q_BTHD.shape
  length = -(-t // LANES) * LANES
  pad = [(0, 0), (0, length - t), (0, 0), (0, 0)]
  # [B, T, H, D] -> [B, H, T, D], padded to whole blocks; the tail is padding (segment 0).
  q, k, v = (jnp.pad(x, pad).transpose(0, 2, 1, 3) for x in (q_BTHD * scale, k_BTKD, v_BTKD))
  q = q.astype(k.dtype)
  segments = jnp.pad(segments_BT.astype(jnp.int32), [(0, 0), (0, length - t)])
  interpret = jax.default_backend() != "tpu"

  def attend(q, k, v, segments):  # on one device's shard: heads may be a slice of all heads
    kernel = _kernel(length, q.shape[1], int(window), softcap, interpret)
    per_example = lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(q=s, kv=s))
    return jax.vmap(per_example)(q, k, v, segments)

  mesh_rules = shd.active_mesh()
  if mesh_rules is None:
    out = attend(q, k, v, segments)
  else:
    # A Pallas call is opaque to the SPMD partitioner: run it per shard, batch over the data axes and
    # heads over the tensor axis when both the query and the KV heads divide it.
    mesh, rules = mesh_rules
    batch = shd.logical_to_spec(("batch",), (b,), mesh, rules)[0]
    heads = shd.logical_to_spec(("kv_heads",), (k.shape[1],), mesh, rules)[0]  # then H divides too
    spec = P(batch, heads, None, None)
    out = jax.shard_map(
      attend, mesh=mesh, in_specs=(spec, spec, spec, P(batch, None)), out_specs=spec, check_vma=False
    )(q, k, v, segments)
  return out.transpose(0, 2, 1, 3)[:, :t].astype(v_BTKD.dtype)
