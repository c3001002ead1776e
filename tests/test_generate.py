"""KV-cache decoding equals a full recomputation, with left padding, EOS stopping and sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import mesh_of
from reft_jax import generate as G
from reft_jax.generate import NO_YNN_FUSIONS, generate, left_pad
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


@pytest.mark.parametrize("options", [{}, NO_YNN_FUSIONS])  # YNNPACK's fusions / XLA's own dots
@pytest.mark.parametrize("per_layer", [False, True])  # stacked layers / per-layer weights and cache
@pytest.mark.parametrize("cfg,scan", [(PRESETS["tiny"], False), (GEMMA_LIKE, True)])
def test_kv_cache_decode_equals_full_recompute(cfg, scan, per_layer, options):
  model = init_model(cfg, RunOptions(scan_layers=scan), seed=3)
  rng = np.random.default_rng(0)
  prompts = [list(rng.integers(3, cfg.vocab_size, size=n)) for n in (3, 9, 6)]
  tokens, mask = left_pad(prompts, pad_id=0)
  kw = dict(per_layer=per_layer, compiler_options=options)
  got = generate(model, tokens, mask, max_new_tokens=8, eos_id=-1, pad_id=0, **kw)
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


def test_generate_texts_batches_prompts_by_length_and_answers_in_their_order(tmp_path, monkeypatch):
  """Batches are cut from the prompts sorted by length; each answer lands at its own prompt's index and
  equals the prompt's answer decoded alone."""
  from reft_jax.data.tokenizer import build_word_tokenizer

  tok = build_word_tokenizer(["a b c d e f g h i j k l m n o p q r s t"], str(tmp_path))
  model = init_model(PRESETS["tiny"].replace(vocab_size=len(tok)), RunOptions(), seed=0)
  prompts = ["a b c d e f g h", "a", "b c d e", "e f g h i j k l m n", "c d"]
  batch_lengths = []
  real_generate = G.generate

  def spy(model, tokens, mask, **kw):
    batch_lengths.append(sorted(int(n) for n in np.asarray(mask).sum(1)))
    return real_generate(model, tokens, mask, **kw)

  monkeypatch.setattr(G, "generate", spy)
  batched = G.generate_texts(model, tok, prompts, max_new_tokens=6, batch_size=2)
  lengths = [len(p.split()) + 1 for p in prompts]  # + BOS
  assert batch_lengths == [[2, 3], [5, 9], [11, 11]]  # sorted, the last batch padded with its last prompt
  assert sorted(lengths) == [2, 3, 5, 9, 11]
  alone = [G.generate_texts(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
  assert batched == alone and len(set(alone)) > 1


def test_prompt_widths_are_powers_of_two_and_their_three_quarters():
  widths = {n: G.prompt_width(n) for n in range(1, 400)}
  assert sorted(set(widths.values())) == [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]
  assert all(n <= w <= max(16, 1.5 * n) for n, w in widths.items())  # fits; at most a third is padding
  assert [widths[n] for n in (16, 17, 24, 25, 40, 48, 49, 65, 97)] == [16, 24, 24, 32, 48, 48, 64, 96, 128]


def test_prompt_batches_pad_every_batch_to_its_bucket():
  encoded = [[5] * n for n in (40, 3, 17, 70, 30)]
  got = list(G.prompt_batches(encoded, 2, pad_id=0))
  assert [rows for rows, _, _ in got] == [[1, 2], [4, 0], [3]]
  assert [t.shape for _, t, _ in got] == [(2, 24), (2, 48), (2, 96)]
  rows, tokens, mask = got[2]  # the last batch filled up with copies of its last prompt
  assert mask.sum(1).tolist() == [70, 70] and (tokens[:, :26] == 0).all() and (tokens[:, 26:] == 5).all()


def test_greedy_answers_do_not_depend_on_the_padded_width():
  """A prompt left-padded to 24 or to 64 columns decodes the same tokens (padding is masked out and
  positions come from the mask), so the width buckets change no answer."""
  model = init_model(PRESETS["tiny"], RunOptions(), seed=0)
  prompts = [[3, 9, 4, 7, 1, 8, 2, 6, 5, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [7, 7, 3]]
  outs = [
    generate(model, *left_pad(prompts, pad_id=0, multiple=w), max_new_tokens=8, eos_id=-1, pad_id=0) for w in (24, 64)
  ]
  np.testing.assert_array_equal(outs[0], outs[1])


def test_the_decode_loop_drops_ynnpack_fusions_only_on_x86_without_avx512(monkeypatch):
  """The measured choice (README, generation): XLA's own dots on an x86 CPU without AVX-512, YNNPACK's
  fusions on an AVX-512 one and off x86; REFT_JAX_DECODE_YNN forces either."""
  monkeypatch.delenv("REFT_JAX_DECODE_YNN", raising=False)
  monkeypatch.setattr(G.platform, "machine", lambda: "x86_64")
  monkeypatch.setattr(G, "_cpu_flags", lambda: {"avx2", "fma"})
  assert G.decode_options_default() == NO_YNN_FUSIONS
  monkeypatch.setattr(G, "_cpu_flags", lambda: {"avx2", "avx512f"})
  assert G.decode_options_default() == {}
  monkeypatch.setenv("REFT_JAX_DECODE_YNN", "0")
  assert G.decode_options_default() == NO_YNN_FUSIONS
  monkeypatch.setattr(G.platform, "machine", lambda: "aarch64")
  monkeypatch.setenv("REFT_JAX_DECODE_YNN", "1")
  assert G.decode_options_default() == {}
  monkeypatch.delenv("REFT_JAX_DECODE_YNN")
  assert G.decode_options_default() == {}
  assert not G._xla_accepts((("xla_cpu_no_such_option", ""),))  # a renamed option: XLA's defaults


def test_weights_cut_once_give_the_same_tokens_as_a_cut_per_call():
  """generate(layers=cut_layers(model)) (generate_texts' way over many batches) decodes what a call that
  cuts its own per-layer weights does; layers with the stacked decode are refused."""
  model = init_model(GEMMA_LIKE, RunOptions(scan_layers=True), seed=4)
  rng = np.random.default_rng(2)
  tokens, mask = left_pad([list(rng.integers(3, GEMMA_LIKE.vocab_size, size=n)) for n in (4, 7)], pad_id=0)
  kw = dict(max_new_tokens=6, eos_id=-1, pad_id=0, per_layer=True)
  layers = G.cut_layers(model)
  assert len(layers) == GEMMA_LIKE.num_layers
  np.testing.assert_array_equal(generate(model, tokens, mask, layers=layers, **kw), generate(model, tokens, mask, **kw))
  with pytest.raises(ValueError, match="per_layer=False"):
    generate(model, tokens, mask, **{**kw, "per_layer": False}, layers=layers)


@pytest.mark.parametrize("softcap", [None, 20.0])
def test_head_major_attention_equals_token_major(softcap):
  """einsum_attention on the KV cache's head-major keys ([B, KV, S, D], queries transposed to match)
  gives the token-major path's output, masked slots and soft-cap included."""
  from reft_jax.model.layers import einsum_attention

  rng = np.random.default_rng(3)
  b, t, kv, g, s, d = 2, 3, 2, 3, 7, 8
  q = jnp.asarray(rng.standard_normal((b, t, kv, g, d)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((b, s, kv, d)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((b, s, kv, d)), jnp.float32)
  mask = jnp.asarray(rng.random((b, t, s)) > 0.3)
  token_major = einsum_attention(q, k, v, mask, 0.3, softcap)
  head_major = einsum_attention(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask, 0.3, softcap, head_major=True)
  assert head_major.shape == (b, t, kv, g, d)
  np.testing.assert_allclose(np.asarray(head_major), np.asarray(token_major), atol=1e-6, rtol=1e-6)


def test_first_argmax_is_argmax_with_ties_to_the_first_index():
  rng = np.random.default_rng(4)
  logits = rng.standard_normal((5, 300)).astype(np.float32)
  logits[1, [7, 40, 299]] = 9.0  # a tie: the first index wins, as in jnp.argmax
  logits[2, :] = -1.0  # all equal
  logits[3, -1] = 50.0
  got = np.asarray(G.first_argmax(jnp.asarray(logits)))
  np.testing.assert_array_equal(got, np.asarray(jnp.argmax(jnp.asarray(logits), axis=-1)))
  assert got.dtype == np.int32 and got[1] == 7 and got[2] == 0
  assert int(G.first_argmax(jnp.full((1, 4), jnp.nan))[0]) == 3  # no maximum: a valid index still
