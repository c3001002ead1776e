"""Batched greedy / sampled decoding with a KV cache, jitted; prompts are left-padded."""

from __future__ import annotations

import functools
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from reft_jax.distributed import put, to_host
from reft_jax.model.transformer import Transformer, positions_from_mask


def per_layer_default() -> bool:
  """Decode against per-layer weights and cache (Transformer.layer_states) on XLA:CPU, where slicing the
  stacked layers inside the loop copies them on every token; elsewhere the stacked layout is kept (the
  per-layer cut holds a second copy of the weights for the call)."""
  return jax.default_backend() == "cpu"


NO_YNN_FUSIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}  # XLA's own multi-threaded dots instead


def decode_options_default() -> dict:
  """XLA compile options for the decode loop. On an x86 CPU without AVX-512 (a 2-core AMD EPYC), XLA's
  own dots decode SmolLM2 1.22x faster than YNNPACK's fusions at decode's few rows; on an AVX-512 Xeon
  YNNPACK is faster (1.31x), so it stays there and off x86 (README, generation: two machines measured).
  REFT_JAX_DECODE_YNN=1 / 0 forces it on / off. Both decode the same greedy text in tests/test_generate.py
  and in the benchmark's 32 SmolLM2 prompts."""
  if jax.default_backend() != "cpu":
    return {}
  forced = os.environ.get("REFT_JAX_DECODE_YNN", "")
  if forced in ("0", "1"):
    ynn = forced == "1"
  else:
    ynn = platform.machine().lower() not in ("x86_64", "amd64") or "avx512f" in _cpu_flags()
  return {} if ynn or not _xla_accepts(tuple(NO_YNN_FUSIONS.items())) else dict(NO_YNN_FUSIONS)


@functools.cache
def _cpu_flags() -> frozenset[str]:
  """The CPU's feature flags from /proc/cpuinfo, read once (generate asks on every batch); {"avx512f"}
  (keep XLA's defaults) where unreadable."""
  try:
    with open("/proc/cpuinfo") as f:
      flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), ["avx512f"])
  except OSError:
    flags = ["avx512f"]
  return frozenset(flags)


@functools.cache
def _xla_accepts(options: tuple) -> bool:
  """Whether this XLA knows these compile options (their names change between releases)."""
  try:
    jax.jit(lambda x: x + 1, compiler_options=dict(options))(jnp.zeros(()))
    return True
  except jax.errors.JaxRuntimeError:
    return False


def first_argmax(logits_BV):
  """jnp.argmax over the last axis (the first index of the maximum), as a max and a min over indices: two
  plain reductions that XLA:CPU vectorises, against argmax's (value, index) pair reduction, 3.7x slower
  over SmolLM2's 49k vocabulary at 16 rows (1.9 ms of a 62 ms decode step). A row without a maximum
  (NaN logits) gets the last index rather than an out-of-range one."""
  v = logits_BV.shape[-1]
  top = jnp.max(logits_BV, axis=-1, keepdims=True)
  first = jnp.min(jnp.where(logits_BV == top, jnp.arange(v, dtype=jnp.int32), v), axis=-1)
  return jnp.minimum(first, v - 1)


@functools.lru_cache(maxsize=32)
def _compiled(graphdef, max_new: int, eos_id: int, pad_id: int, temperature: float, per_layer: bool, options=()):
  def run(params, tokens_BP, mask_BP, rng, layers):
    model = nnx.merge(graphdef, params)
    b, p = tokens_BP.shape
    # Cut once before the loop (unless the caller did, see cut_layers): the loop then reads each layer's
    # weights and cache in place.
    if per_layer and layers is None:
      layers = model.layer_states()
    cache = model.init_cache(b, p + max_new, per_layer=per_layer)
    kv_mask = jnp.concatenate([mask_BP, jnp.zeros((b, max_new), mask_BP.dtype)], axis=1)
    step = functools.partial(model.forward_cached, layers=layers)
    # The prefill's logits only at the last prompt token (the head over every prompt token is wasted).
    logits, cache = step(tokens_BP, positions_from_mask(mask_BP), kv_mask, cache, 0, last_only=True)

    def pick(logits_BV, key):
      if temperature <= 0:
        return first_argmax(logits_BV)
      return jax.random.categorical(key, logits_BV.astype(jnp.float32) / temperature).astype(jnp.int32)

    rng, key = jax.random.split(rng)
    # Left padding puts every prompt's last real token in the last column.
    init = (
      jnp.int32(0),
      cache,
      kv_mask,
      pick(logits[:, -1], key),
      jnp.sum(mask_BP, axis=1),
      jnp.zeros((b,), bool),
      jnp.full((b, max_new), pad_id, jnp.int32),
      rng,
    )

    def cond(s):
      return (s[0] < max_new) & ~jnp.all(s[5])

    def body(s):
      i, cache, kv_mask, tok, pos, done, out, rng = s
      tok = jnp.where(done, pad_id, tok)
      out = out.at[:, i].set(tok)
      done = done | (tok == eos_id)
      kv_mask = kv_mask.at[:, p + i].set(1)
      logits, cache = step(tok[:, None], pos[:, None], kv_mask, cache, p + i)
      rng, key = jax.random.split(rng)
      return i + 1, cache, kv_mask, pick(logits[:, 0], key), pos + 1, done, out, rng

    return jax.lax.while_loop(cond, body, init)[6]

  return jax.jit(run, compiler_options=dict(options) or None)


def generate(
  model: Transformer,
  tokens_BP,
  mask_BP,
  *,
  max_new_tokens: int,
  eos_id: int,
  pad_id: int,
  temperature: float = 0.0,
  seed: int = 0,
  per_layer: bool | None = None,
  compiler_options: dict | None = None,
  layers: tuple | None = None,
) -> np.ndarray:
  """New tokens [B, max_new_tokens]; after EOS (included) every position holds pad_id.

  tokens_BP must be left-padded (see left_pad); a sharded model and batch stay sharded, and every
  process of a multi-process job gets all rows. per_layer: see per_layer_default, compiler_options: the
  decode loop's XLA options, see decode_options_default (None = those defaults). layers: the model's
  per-layer states from cut_layers, for callers that decode many batches (None: cut inside the call).
  """
  graphdef, params = nnx.split(model)
  per_layer = per_layer_default() if per_layer is None else bool(per_layer)
  if layers is not None and not per_layer:
    raise ValueError("generate: layers= (from cut_layers) is for the per-layer decode; per_layer=False was given")
  options = decode_options_default() if compiler_options is None else compiler_options
  options = tuple(sorted(options.items()))
  fn = _compiled(graphdef, int(max_new_tokens), int(eos_id), int(pad_id), float(temperature), per_layer, options)
  return to_host(
    fn(
      nnx.to_pure_dict(params),
      jnp.asarray(tokens_BP, jnp.int32),
      jnp.asarray(mask_BP, jnp.int32),
      jax.random.key(seed),
      layers,
    )
  )


def cut_layers(model: Transformer) -> tuple:
  """model.layer_states() as arrays of their own, for generate(layers=...): a caller that decodes many
  batches copies the weights out of the layer stack once (0.3 s per SmolLM2 batch on 2 CPU cores) instead
  of once per batch. The copy holds a second set of the blocks' weights while it lives."""
  graphdef, state = nnx.split(model)
  return _cut(graphdef, state)


@functools.partial(jax.jit, static_argnums=0)
def _cut(graphdef, state):
  return nnx.merge(graphdef, state).layer_states()


def left_pad(sequences: list[list[int]], pad_id: int, multiple: int = 8) -> tuple[np.ndarray, np.ndarray]:
  """Token lists -> (tokens, mask), left-padded to a common length rounded up to `multiple` (fewer
  distinct shapes, fewer compilations)."""
  width = max(len(s) for s in sequences)
  width = -(-width // multiple) * multiple
  tokens = np.full((len(sequences), width), pad_id, np.int32)
  mask = np.zeros((len(sequences), width), np.int32)
  for i, s in enumerate(sequences):
    if s:
      tokens[i, -len(s) :] = s
      mask[i, -len(s) :] = 1
  return tokens, mask


def prompt_width(longest: int) -> int:
  """The padded width of a prompt batch: the smallest of 16, 24, 32, 48, 64, 96, ... (2^k and 3 * 2^(k-1))
  that holds its longest prompt. A few compiled shapes for a whole evaluation, at most a third of a
  batch's prefill spent on padding (powers of two alone: up to half)."""
  if longest <= 16:
    return 16
  p = 1 << (longest - 1).bit_length()
  return 3 * p // 4 if longest <= 3 * p // 4 else p


def prompt_batches(encoded: list[list[int]], batch_size: int, pad_id: int):
  """(rows, tokens, mask) per batch: batches cut from the prompts sorted by length (less padding), each
  left-padded to prompt_width and filled up to batch_size rows with copies of its last prompt (fixed
  batch shapes); rows are the indices into `encoded` of the batch's real prompts."""
  order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
  for start in range(0, len(encoded), batch_size):
    rows = order[start : start + batch_size]
    chunk = [encoded[i] for i in rows]
    chunk = chunk + [chunk[-1]] * (batch_size - len(rows))
    yield rows, *left_pad(chunk, pad_id, multiple=prompt_width(max(map(len, chunk))))


def generate_texts(
  model: Transformer,
  tokenizer,
  prompts: list[str],
  *,
  max_new_tokens: int = 64,
  batch_size: int = 32,
  temperature: float = 0.0,
  seed: int = 0,
  mesh=None,
  progress: bool = False,
) -> list[str]:
  """Decodes answers to already-formatted prompt strings, batch by batch, in the prompts' order. Batches
  are cut from the prompts sorted by length (less padding, fewer prompt-width shapes); with a mesh the
  batch is sharded over its data axes (the last batch is padded to a full one, so shapes stay fixed)."""
  from tqdm.auto import tqdm

  from reft_jax import sharding as shd

  from reft_jax.data.sft import encode_prompt

  encoded = [encode_prompt(tokenizer, p) for p in prompts]
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
  out: list[str] = [""] * len(encoded)
  batches = prompt_batches(encoded, batch_size, pad)
  total = -(-len(encoded) // batch_size)
  layers = cut_layers(model) if per_layer_default() and total > 1 else None
  for n, (rows, tokens, mask) in enumerate(tqdm(batches, total=total, disable=not progress, desc="generate")):
    if mesh is not None:
      sh = shd.batch_sharding(mesh)
      tokens, mask = put(tokens, sh), put(mask, sh)
    new = generate(
      model,
      tokens,
      mask,
      max_new_tokens=max_new_tokens,
      eos_id=tokenizer.eos_token_id,
      pad_id=pad,
      temperature=temperature,
      seed=seed + n * batch_size,
      layers=layers,
    )
    for i, row in zip(rows, new):
      ids = [int(t) for t in row if t != pad]
      if ids and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]
      out[i] = tokenizer.decode(ids, skip_special_tokens=True).strip()
  return out
