"""Hugging Face checkpoints: logits parity with transformers, round trips, bad files, sharded load."""

import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from helpers import perturbed_torch_model, saved_hf_models

import reft_jax
from reft_jax import sharding as shd

FAMILIES = ("llama", "qwen2", "gemma2")
VOCAB, T = 128, 10


def make_hf_model(family: str, seed: int = 0):
  """A tiny random transformers model with non-trivial norms and biases (eager attention)."""
  common = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
    initializer_range=0.15,
  )  # O(1) logits, peaked attention
  if family == "llama":
    config = transformers.LlamaConfig(
      **common,
      rope_parameters=dict(
        rope_type="llama3",
        rope_theta=500000.0,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=16,
      ),
    )
    cls = transformers.LlamaForCausalLM
  elif family == "qwen2":
    del common["head_dim"]
    config = transformers.Qwen2Config(
      **common, tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=1e6)
    )
    cls = transformers.Qwen2ForCausalLM
  else:
    config = transformers.Gemma2Config(
      **common, sliding_window=4, query_pre_attn_scalar=24, attn_logit_softcapping=50.0, final_logit_softcapping=3.0
    )
    cls = transformers.Gemma2ForCausalLM
  return perturbed_torch_model(cls, config, seed)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  """family -> (torch model, checkpoint dir, our model loaded from it)."""
  return saved_hf_models(FAMILIES, make_hf_model, tmp_path_factory)


def batch(padding: str):
  ids = np.random.RandomState(0).randint(0, VOCAB, (2, T))
  mask = np.ones((2, T), np.int64)
  if padding == "right":
    mask[1, 6:] = 0
  else:
    mask[1, :4] = 0
  return ids, mask


def torch_logits(model, ids, mask, **kw):
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  with torch.no_grad():
    out = model(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions), **kw)
  return out if kw else out.logits.numpy()


def max_diff(a, b, mask):
  return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))[mask > 0].max())


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(hf_dirs, family, padding):
  torch_model, _, model = hf_dirs[family]
  ids, mask = batch(padding)
  ours = model(jnp.asarray(ids), jnp.asarray(mask))
  assert ours.dtype == jnp.float32 and ours.shape == (2, T, VOCAB)
  assert max_diff(ours, torch_logits(torch_model, ids, mask), mask) <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_save_hf_round_trip(hf_dirs, tmp_path, family):
  torch_model, _, model = hf_dirs[family]
  out = reft_jax.save_hf(model, str(tmp_path / "out"))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(reloaded) is type(torch_model)
  reloaded.config._attn_implementation = "eager"
  ids, mask = batch("right")
  ref = torch_logits(torch_model, ids, mask)
  assert max_diff(torch_logits(reloaded, ids, mask), ref, mask) <= 1e-5

  again = reft_jax.load_hf(out)
  assert again.cfg == model.cfg
  for (path, a), (_, b) in zip(nnx.state(model).flat_state(), nnx.state(again).flat_state(), strict=True):
    np.testing.assert_array_equal(np.asarray(a.value), np.asarray(b.value), err_msg=str(path))


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_states_match_transformers(hf_dirs, family):
  torch_model, _, model = hf_dirs[family]
  ids, mask = batch("left")
  L = model.cfg.num_layers
  ref = torch_logits(torch_model, ids, mask, output_hidden_states=True).hidden_states
  assert len(ref) == L + 1
  logits, hidden = model.forward(jnp.asarray(ids), jnp.asarray(mask), hidden_layers=(0, 1, 2))
  assert logits is not None and sorted(hidden) == [0, 1, 2]
  for layer in range(L):  # HF's last entry (index L) has the final norm applied
    assert max_diff(hidden[layer], ref[layer].numpy(), mask) <= 1e-4, layer

  none, early = model.forward(jnp.asarray(ids), jnp.asarray(mask), stop_after=1, hidden_layers=(1,))
  assert none is None and list(early) == [1]
  np.testing.assert_allclose(np.asarray(early[1]), np.asarray(hidden[1]), atol=1e-6)


def test_forward_rejects_hidden_layer_past_stop(hf_dirs):
  model = hf_dirs["llama"][2]
  with pytest.raises(ValueError, match="hidden_layers"):
    model.forward(jnp.zeros((1, 4), jnp.int32), stop_after=1, hidden_layers=(2,))


# ---------------------------------------------------------------- bad checkpoints


@pytest.fixture
def llama_copy(hf_dirs, tmp_path):
  """A writable copy of the llama checkpoint and its tensors."""
  path = str(tmp_path / "ckpt")
  shutil.copytree(hf_dirs["llama"][1], path)
  return path, load_file(os.path.join(path, "model.safetensors"))


def rewrite(path, tensors):
  save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def test_missing_tensor_is_named(llama_copy):
  path, tensors = llama_copy
  name = "model.layers.1.mlp.up_proj.weight"
  del tensors[name]
  rewrite(path, tensors)
  with pytest.raises(ValueError, match=re.escape(name)):
    reft_jax.load_hf(path)


@pytest.mark.parametrize(
  "name, shape",
  [
    ("model.layers.0.self_attn.k_proj.weight", (32, 60)),  # wrong size
    ("model.layers.2.mlp.gate_proj.weight", (64, 96)),  # transposed: same size, wrong layout
    ("model.embed_tokens.weight", (VOCAB, 32)),
  ],
)
def test_wrong_shape_is_named(llama_copy, name, shape):
  path, tensors = llama_copy
  tensors[name] = np.zeros(shape, np.float32)
  rewrite(path, tensors)
  with pytest.raises(ValueError, match=re.escape(name)):
    reft_jax.load_hf(path)


def test_unknown_model_type_is_named(llama_copy):
  path, _ = llama_copy
  cfg_file = os.path.join(path, "config.json")
  with open(cfg_file) as f:
    cfg = json.load(f)
  cfg["model_type"] = "mistral_x"
  with open(cfg_file, "w") as f:
    json.dump(cfg, f)
  with pytest.raises(ValueError, match="model_type=.mistral_x"):
    reft_jax.load_hf(path)


def test_missing_config_is_named(llama_copy):
  path, _ = llama_copy
  os.remove(os.path.join(path, "config.json"))
  with pytest.raises(FileNotFoundError, match=re.escape(os.path.join(path, "config.json"))):
    reft_jax.load_hf(path)


def test_missing_weights_file(llama_copy):
  path, _ = llama_copy
  os.remove(os.path.join(path, "model.safetensors"))
  with pytest.raises(FileNotFoundError, match="safetensors"):
    reft_jax.load_hf(path)


# ---------------------------------------------------------------- sharded load


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_sharded_load(hf_dirs, family):
  assert jax.device_count() == 8
  _, path, model = hf_dirs[family]
  mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
  sharded = reft_jax.load_hf(path, mesh=mesh)

  gate = sharded.blocks.mlp.gate.kernel[...]
  assert gate.shape == (3, 64, 96)
  assert gate.sharding.shard_shape(gate.shape) == (3, 32, 48)  # embed on fsdp, mlp on tensor
  for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(sharded)), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  (ids_r, mask_r), (ids_l, mask_l) = batch("right"), batch("left")
  ids, mask = np.concatenate([ids_r, ids_l]), np.concatenate([mask_r, mask_l])  # 4 = data x fsdp
  ids, mask = (jax.device_put(x, shd.batch_sharding(mesh)) for x in (ids, mask))
  logits = nnx.jit(lambda m, i, k: m(i, k))(sharded, ids, mask)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(model(ids, mask)), atol=1e-5)
