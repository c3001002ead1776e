"""The Flax decoder on its own: layer scan, remat, dtypes, abstract presets, padding, config checks."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from reft_jax.model import (
  PRESETS,
  LoraConfig,
  ModelConfig,
  RunOptions,
  abstract_model,
  from_hf_config,
  init_model,
  to_hf_config,
)

# Gemma2-style so that one model exercises sandwich norms, softcaps and mixed sliding/full layers.
CFG = ModelConfig(
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
  attn_logit_softcap=20.0,
  final_logit_softcap=10.0,
  sliding_window=3,
  layer_types=("sliding", "full", "sliding"),
)
LLAMA = ModelConfig(
  vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8
)


def randomized(cfg, options=RunOptions(), seed=0):
  """init_model with O(1) activations (the default init's std=0.02 makes logits nearly zero)."""
  model = init_model(cfg, options, seed=seed)
  rng = np.random.RandomState(seed)
  for path, var in nnx.state(model, nnx.Param).flat_state():
    shape = var.value.shape
    if path[-1] == "kernel":
      new = rng.randn(*shape) / math.sqrt(cfg.hidden_size)
    elif path[-1] == "embed":
      new = rng.randn(*shape)
    else:  # norm scales, biases
      new = np.asarray(var.value) + 0.1 * rng.randn(*shape)
    var.value = jnp.asarray(new, var.value.dtype)
  return model


def with_options(model, options, cfg=None):
  """The same parameters under other RunOptions (scan, remat, dtype) or a compatible config."""
  graphdef, _ = nnx.split(abstract_model(cfg or model.cfg, options))
  return nnx.merge(graphdef, nnx.state(model))


@pytest.fixture(scope="module")
def model():
  return randomized(CFG)


@pytest.fixture(scope="module")
def data():
  rng = np.random.RandomState(1)
  ids = jnp.asarray(rng.randint(0, CFG.vocab_size, (2, 8)))
  mask = jnp.asarray(np.array([[1] * 8, [0, 0] + [1] * 6]))
  return ids, mask


def test_logits_are_not_trivial(model, data):
  logits = model(*data)
  assert logits.shape == (2, 8, CFG.vocab_size) and bool(jnp.isfinite(logits).all())
  assert float(logits.std()) > 0.5


def test_scan_matches_unrolled(model, data):
  ref = model(*data)
  scanned = with_options(model, RunOptions(scan_layers=True))
  np.testing.assert_allclose(np.asarray(scanned(*data)), np.asarray(ref), atol=1e-5)
  _, h_ref = model.forward(*data, hidden_layers=(0, 2))
  _, h = scanned.forward(*data, hidden_layers=(0, 2))
  for layer in (0, 2):
    np.testing.assert_allclose(np.asarray(h[layer]), np.asarray(h_ref[layer]), atol=1e-5)


def logits_loss_grad(model, ids, mask):
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)

  def loss(params):
    logits = nnx.merge(graphdef, params)(ids, mask)
    logp = jax.nn.log_softmax(logits[:, :-1])
    nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    return (nll * mask[:, 1:]).sum() / mask[:, 1:].sum(), logits

  (loss, logits), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return logits, loss, grad


@pytest.mark.parametrize("scan", [False, True])
def test_remat_policies_match(model, data, scan):
  ref_logits, ref_loss, ref_grad = logits_loss_grad(with_options(model, RunOptions(scan_layers=scan)), *data)
  assert float(jnp.abs(ref_grad["blocks"]["mlp"]["up"]["kernel"]).max()) > 0
  for remat in ("full", "dots"):
    m = with_options(model, RunOptions(scan_layers=scan, remat=remat))
    logits, loss, grad = logits_loss_grad(m, *data)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=1e-5)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5), grad, ref_grad)


QWEN = dataclasses.replace(LLAMA, family="qwen2", qkv_bias=True)


@pytest.mark.parametrize("targets", [("q", "k", "v", "o", "gate", "up", "down"), ("q", "v"), ()])
@pytest.mark.parametrize("cfg", [CFG, QWEN], ids=["gemma2", "qwen2_bias"])
def test_fused_projections_match_one_matmul_each(cfg, targets, data):
  """q/k/v and gate/up as one matmul (model.fuse_projections): the logits, the loss and every gradient
  (LoRA's A and B with all, some or no projections adapted; Qwen2's q/k/v biases) as one by one."""
  lora = LoraConfig(rank=2, alpha=4.0, targets=targets) if targets else None
  unfused = randomized(cfg, RunOptions(lora=lora))
  rng = np.random.RandomState(2)
  for _, var in nnx.state(unfused, nnx.LoRAParam).flat_state():  # B = 0 at init: give the adapters a value
    var.value = jnp.asarray(0.3 * rng.randn(*var.value.shape), var.value.dtype)
  fused = with_options(unfused, RunOptions(lora=lora, fuse_projections=True))
  assert fused.blocks.attn.fused and not unfused.blocks.attn.fused
  ref_logits, ref_loss, ref_grad = logits_loss_grad(unfused, *data)
  logits, loss, grad = logits_loss_grad(fused, *data)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=1e-5)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5), grad, ref_grad)
  if targets:
    assert float(jnp.abs(grad["blocks"]["attn"]["q"]["lora_b"]).max()) > 0


def test_bf16_compute_keeps_fp32_params(model, data):
  bf16 = with_options(model, RunOptions(dtype="bfloat16"))
  logits = bf16(*data)
  assert logits.dtype == jnp.bfloat16
  assert {v.dtype for v in jax.tree.leaves(nnx.state(bf16, nnx.Param))} == {jnp.dtype("float32")}
  ref = np.asarray(model(*data))
  diff = np.abs(np.asarray(logits, np.float32) - ref)
  assert diff.max() <= 0.05 * np.abs(ref).max(), (diff.max(), np.abs(ref).max())
  assert diff.max() > 0  # really computed in bfloat16


def test_bf16_params():
  model = init_model(LLAMA, RunOptions(dtype="bfloat16", param_dtype="bfloat16"))
  dtypes = {v.dtype for v in jax.tree.leaves(nnx.state(model, nnx.Param))}
  assert dtypes == {jnp.dtype("bfloat16")}
  assert model(jnp.zeros((1, 4), jnp.int32)).dtype == jnp.bfloat16


# ---------------------------------------------------------------- padding


@pytest.mark.parametrize("cfg", [CFG, LLAMA], ids=["gemma2", "llama"])
def test_padding_does_not_change_real_tokens(cfg):
  model = randomized(cfg, seed=2)
  ids = jnp.asarray(np.random.RandomState(3).randint(0, cfg.vocab_size, (1, 6)))
  ref = np.asarray(model(ids))
  pad = jnp.zeros((1, 3), ids.dtype)
  ones, zeros = jnp.ones((1, 6), jnp.int32), jnp.zeros((1, 3), jnp.int32)
  right = model(jnp.concatenate([ids, pad], 1), jnp.concatenate([ones, zeros], 1))
  np.testing.assert_allclose(np.asarray(right[:, :6]), ref, atol=1e-5)
  left = model(jnp.concatenate([pad, ids], 1), jnp.concatenate([zeros, ones], 1))
  np.testing.assert_allclose(np.asarray(left[:, 3:]), ref, atol=1e-5)
  assert bool(jnp.isfinite(left).all())  # fully masked padding rows give no NaNs


def test_sliding_window_limits_context():
  model = randomized(CFG, seed=4)
  ids = np.random.RandomState(5).randint(0, CFG.vocab_size, (1, 8))
  changed = ids.copy()
  changed[0, 0] = (ids[0, 0] + 1) % CFG.vocab_size
  a, b = np.asarray(model(jnp.asarray(ids))), np.asarray(model(jnp.asarray(changed)))
  assert np.abs(a[0, -1] - b[0, -1]).max() > 1e-4  # the full layer still sees token 0
  all_sliding = with_options(model, RunOptions(), CFG.replace(layer_types=("sliding",) * 3))
  a, b = np.asarray(all_sliding(jnp.asarray(ids))), np.asarray(all_sliding(jnp.asarray(changed)))
  # 3 sliding layers of window 3 reach back at most 6 tokens: position 7 cannot see token 0.
  np.testing.assert_allclose(a[0, 7], b[0, 7], atol=1e-6)
  assert np.abs(a[0, 6] - b[0, 6]).max() > 1e-4


# ---------------------------------------------------------------- abstract presets


@pytest.mark.parametrize("name, expected", [("llama2_7b", 6.74e9), ("gemma2_9b", 9.24e9), ("qwen2_7b", 7.62e9)])
def test_abstract_presets(name, expected):
  cfg = PRESETS[name]
  model = abstract_model(cfg, RunOptions(scan_layers=True, lora=LoraConfig(rank=4)))
  base = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))  # LoRAParam is a Param subclass
  leaves = jax.tree.leaves(nnx.state(model, base))
  assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  count = sum(math.prod(x.shape) for x in leaves)
  assert abs(count - expected) <= 0.01 * expected, count
  assert count == cfg.num_params()
  assert model.blocks.mlp.gate.kernel.value.shape == (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size)
  variables = list(nnx.state(model, nnx.Variable).flat_state())
  assert any(isinstance(v, nnx.LoRAParam) for _, v in variables)
  for path, var in variables:
    axes = var.get_metadata().get("logical_axes")
    assert isinstance(axes, tuple) and len(axes) == len(var.value.shape), (path, axes)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_config_round_trip(name):
  cfg = PRESETS[name]
  assert from_hf_config(to_hf_config(cfg)) == cfg


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
  "kw, field",
  [
    (dict(num_heads=4, num_kv_heads=3), "num_kv_heads"),
    (dict(num_layers=2, layer_types=("full",)), "layer_types"),
    (dict(num_layers=2, layer_types=("full", "local")), "layer_types"),
    (dict(num_layers=2, layer_types=("full", "sliding")), "sliding_window"),
    (dict(family="gpt2"), "family"),
    (dict(activation="relu"), "activation"),
    (dict(hidden_size=0), "hidden_size"),
  ],
)
def test_model_config_errors_name_the_field(kw, field):
  with pytest.raises(ValueError, match=f"{field}="):
    ModelConfig(**kw)


@pytest.mark.parametrize(
  "make, field",
  [
    (lambda: RunOptions(remat="some"), "remat"),
    (lambda: RunOptions(dtype="float64"), "dtype"),
    (lambda: LoraConfig(rank=0), "rank"),
    (lambda: LoraConfig(targets=("q", "qkv")), "targets"),
    (lambda: from_hf_config({"model_type": "mistral_x"}), "model_type"),
    (lambda: from_hf_config({"model_type": "llama"}), "num_attention_heads"),
  ],
)
def test_option_errors_name_the_field(make, field):
  with pytest.raises(ValueError, match=field):
    make()


def test_attention_output_perturbation_enters_before_gemma2s_post_attention_norm():
  """Vaccine hooks the attention module's output, which on Gemma-2 is *before* post_attention_layernorm
  (git-disl/Booster trainer.py): a huge perturbation is then normalised away instead of flooding the
  residual stream."""
  model = randomized(CFG)
  tokens = jnp.asarray(np.arange(12).reshape(2, 6) % CFG.vocab_size, jnp.int32)
  mask = jnp.ones_like(tokens)
  huge = jnp.full((CFG.num_layers, 2, 6, CFG.hidden_size), 1e4, jnp.float32)
  _, hidden = model.forward(tokens, mask, hidden_layers=(1,), interventions={"attn_out": huge})
  _, clean = model.forward(tokens, mask, hidden_layers=(1,))
  assert float(jnp.abs(hidden[1]).max()) < 100 * float(jnp.abs(clean[1]).max())
