"""KV-cache decoding equals a full recomputation, with left padding, EOS stopping and sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import mesh_of
from reft_jax.generate import generate, left_pad
from reft_jax.model import PRESETS, RunOptions, init_model
from reft_jax import sharding as shd

GEMMA_LIKE = PRESETS["tiny"].replace(
  family="gemma2",
  activation="gelu_pytorch_tanh",
  norm_plus_one=True,
  sandwich_norms=True,
  scale_embeddings=True,
  tie_embeddings=True,
  attn_logit_softcap=50.0,
  final_logit_softcap=30.0,
  sliding_window=5,
  layer_types=("sliding", "full"),
)


def _recompute(model, prompts, n_new):
  """Greedy decoding by re-running the full forward on the growing sequence (right-padded to one
  width, which a causal model ignores, so it compiles once)."""
  width = max(map(len, prompts)) + n_new
  forward = jax.jit(lambda t, m: model(t, m))
  outs = []
  for p in prompts:
    seq = list(p)
    for _ in range(n_new):
      tokens = np.zeros((1, width), np.int32)
      tokens[0, : len(seq)] = seq
      logits = forward(tokens, (np.arange(width) < len(seq))[None].astype(np.int32))
      seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    outs.append(seq[len(p) :])
  return np.asarray(outs)


@pytest.mark.parametrize("per_layer", [False, True])  # stacked layers / per-layer weights and cache
@pytest.mark.parametrize("cfg,scan", [(PRESETS["tiny"], False), (GEMMA_LIKE, True)])
def test_kv_cache_decode_equals_full_recompute(cfg, scan, per_layer):
  model = init_model(cfg, RunOptions(scan_layers=scan), seed=3)
  rng = np.random.default_rng(0)
  prompts = [list(rng.integers(3, cfg.vocab_size, size=n)) for n in (3, 9, 6)]
  tokens, mask = left_pad(prompts, pad_id=0)
  got = generate(model, tokens, mask, max_new_tokens=8, eos_id=-1, pad_id=0, per_layer=per_layer)
  np.testing.assert_array_equal(got, _recompute(model, prompts, 8))


def test_per_layer_decode_step_matches_stacked_logits():
  """One prefill + decode step: per-layer weights and cache give the stacked path's logits and cache."""
  model = init_model(GEMMA_LIKE, RunOptions(scan_layers=True), seed=5)
  tokens = jnp.asarray(np.random.default_rng(1).integers(3, GEMMA_LIKE.vocab_size, size=(2, 7)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(7), (2, 7))
  kv_mask = jnp.ones((2, 8), jnp.int32)
  out = {}
  for per_layer in (False, True):
    layers = model.layer_states() if per_layer else None
    cache = model.init_cache(2, 8, per_layer=per_layer)
    first, cache = model.forward_cached(tokens, positions, kv_mask, cache, 0, layers=layers, last_only=True)
    nxt = jnp.argmax(first[:, -1], -1)[:, None]
    second, cache = model.forward_cached(nxt, positions[:, -1:] + 1, kv_mask, cache, 7, layers=layers)
    out[per_layer] = (first, second, jnp.stack(cache["k"]))
  assert out[True][0].shape == (2, 1, GEMMA_LIKE.vocab_size)
  for a, b in zip(out[False], out[True]):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_generation_stops_at_eos_and_pads_after():
  model = init_model(PRESETS["tiny"], seed=3)
  prompts = [[5, 6, 7], [9, 10, 11, 12]]
  tokens, mask = left_pad(prompts, pad_id=0)
  free = generate(model, tokens, mask, max_new_tokens=6, eos_id=-1, pad_id=0)
  eos = int(free[0, 2])  # pretend row 0's third token is EOS
  got = generate(model, tokens, mask, max_new_tokens=6, eos_id=eos, pad_id=0)
  np.testing.assert_array_equal(got[0, :3], free[0, :3])
  assert (got[0, 3:] == 0).all()
  first = list(free[1]).index(eos) if eos in free[1] else 6
  np.testing.assert_array_equal(got[1, : first + 1], free[1, : first + 1])


def test_sharded_generation_matches_single_device():
  from reft_jax.model import abstract_model
  from flax import nnx

  model = init_model(PRESETS["tiny"], seed=4)
  mesh = mesh_of(data=2, fsdp=2, tensor=2)
  graphdef, state = nnx.split(model)
  shardings = shd.state_shardings(nnx.state(abstract_model(PRESETS["tiny"])), mesh)
  sharded = nnx.merge(graphdef, jax.device_put(nnx.to_pure_dict(state), shardings))
  prompts = [[5, 6, 7], [9, 10, 11, 12], [3], [4, 4, 4, 4, 4]]
  tokens, mask = left_pad(prompts, pad_id=0)
  want = generate(model, tokens, mask, max_new_tokens=5, eos_id=-1, pad_id=0)
  sh = shd.batch_sharding(mesh)
  got = generate(sharded, jax.device_put(tokens, sh), jax.device_put(mask, sh), max_new_tokens=5, eos_id=-1, pad_id=0)
  np.testing.assert_array_equal(got, want)
