"""RunOptions.attention: jax.nn.dot_product_attention ("dpa") matches the explicit einsum path."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from reft_jax.generate import generate
from reft_jax.model import ModelConfig, RunOptions, abstract_model, init_model
from reft_jax.pipelines.validate import validate as validate_config
from reft_jax.model import build as model_build

LLAMA_GQA = ModelConfig(
  vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8
)
# Gemma2-style sliding/full layers, without the attention soft-cap that dpa cannot express.
GEMMA_WINDOW = ModelConfig(
  family="gemma2",
  vocab_size=96,
  hidden_size=32,
  intermediate_size=64,
  num_layers=3,
  num_heads=4,
  num_kv_heads=2,
  head_dim=8,
  activation="gelu_pytorch_tanh",
  norm_plus_one=True,
  sandwich_norms=True,
  scale_embeddings=True,
  tie_embeddings=True,
  final_logit_softcap=10.0,
  query_scale=0.3,
  sliding_window=3,
  layer_types=("sliding", "full", "sliding"),
)
GEMMA_SOFTCAP = GEMMA_WINDOW.replace(attn_logit_softcap=20.0)


def randomized(cfg, seed=0):
  """O(1) weights, so that attention patterns (and any mismatch) are far from uniform."""
  model = init_model(cfg, seed=seed)
  rng = np.random.RandomState(seed)
  for _, var in nnx.state(model, nnx.Param).flat_state():
    scale = 1 / math.sqrt(cfg.hidden_size) if var.value.ndim > 2 else 1.0
    var.value = jnp.asarray(rng.randn(*var.value.shape) * scale, var.value.dtype)
  return model


def with_attention(model, attention, **kw):
  graphdef, _ = nnx.split(abstract_model(model.cfg, RunOptions(attention=attention, **kw)))
  return nnx.merge(graphdef, nnx.state(model))


def batch(cfg, seed=1):
  rng = np.random.RandomState(seed)
  tokens = jnp.asarray(rng.randint(0, cfg.vocab_size, (3, 9)), jnp.int32)
  # No padding, right padding, left padding.
  mask = jnp.asarray(np.array([[1] * 9, [1] * 6 + [0] * 3, [0] * 4 + [1] * 5]), jnp.int32)
  return tokens, mask


@pytest.mark.parametrize("cfg", [LLAMA_GQA, GEMMA_WINDOW], ids=["llama_gqa", "gemma2_window"])
@pytest.mark.parametrize("scan", [False, True])
def test_dpa_matches_einsum(cfg, scan):
  ref = randomized(cfg)
  tokens, mask = batch(cfg)
  want = with_attention(ref, "einsum", scan_layers=scan)(tokens, mask)
  got = with_attention(ref, "dpa", scan_layers=scan)(tokens, mask)
  assert with_attention(ref, "dpa").blocks.attn.impl == "dpa"
  real = np.asarray(mask, bool)  # padding queries attend uniformly in both paths; compare real tokens
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=1e-5, atol=1e-5)


def test_dpa_gradients_match_einsum():
  ref = randomized(LLAMA_GQA)
  tokens, mask = batch(LLAMA_GQA)

  def grads(attention):
    graphdef, params = nnx.split(with_attention(ref, attention))

    def loss(p):
      logits = nnx.merge(graphdef, p)(tokens, mask)
      return jnp.sum(jax.nn.log_softmax(logits)[..., 0] * mask)

    return jax.grad(loss)(params)

  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads("dpa"), grads("einsum"))


def test_softcap_falls_back_to_einsum():
  ref = randomized(GEMMA_SOFTCAP)
  tokens, mask = batch(GEMMA_SOFTCAP)
  dpa = with_attention(ref, "dpa")
  assert dpa.blocks.attn.impl == "einsum"
  np.testing.assert_array_equal(np.asarray(dpa(tokens, mask)), np.asarray(ref(tokens, mask)))


@pytest.mark.parametrize("cfg", [LLAMA_GQA, GEMMA_WINDOW], ids=["llama_gqa", "gemma2_window"])
def test_dpa_kv_cache_decoding_matches(cfg):
  ref = randomized(cfg)
  tokens, mask = batch(cfg)
  left = np.asarray(mask)[2:]  # a left-padded prompt next to an unpadded one
  prompts = jnp.concatenate([tokens[:1], tokens[2:]]), jnp.asarray(np.concatenate([np.ones_like(left), left]))
  out = {
    a: generate(with_attention(ref, a), *prompts, max_new_tokens=6, eos_id=-1, pad_id=0) for a in ("einsum", "dpa")
  }
  np.testing.assert_array_equal(out["dpa"], out["einsum"])


def test_attention_option_is_checked():
  with pytest.raises(ValueError, match="attention"):
    RunOptions(attention="flash")


def test_attention_config_reaches_the_model():
  from helpers import tiny_config

  from reft_jax import config as config_lib

  assert model_build.run_options(tiny_config(**{"model.attention": "dpa"})).attention == "dpa"
  with pytest.raises(config_lib.ConfigError, match="attention='flash'"):
    validate_config(tiny_config(**{"model.attention": "flash"}))
