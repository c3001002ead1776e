"""LoRA adapters: a fresh adapter is a no-op, merging is exact, and PEFT reads our adapter files."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx

import reft_jax
from reft_jax import LoraConfig, RunOptions, merge_lora, save_peft_adapter
from reft_jax import sharding as shd

LORA = LoraConfig(rank=4, alpha=8, targets=("q", "k", "v", "o", "gate", "up", "down"))
VOCAB, T = 128, 9


def load_torch(path):
  model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
  model.config._attn_implementation = "eager"
  return model


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
  """A tiny random Llama checkpoint written by transformers."""
  config = transformers.LlamaConfig(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=64,
    initializer_range=0.15,
  )
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(torch.randn_like(p) * 0.1)
  path = str(tmp_path_factory.mktemp("llama"))
  model.save_pretrained(path)
  return path


def randomize_lora(model, seed=0, scale=0.2):
  """Sets every LoRA A and B to random nonzero values (B starts at zero)."""
  rng = np.random.RandomState(seed)
  lora = nnx.state(model, nnx.LoRAParam)
  nnx.update(model, jax.tree.map(lambda x: jnp.asarray(scale * rng.randn(*x.shape), x.dtype), lora))


@pytest.fixture(scope="module")
def fresh_model(base_dir):
  """Loaded with freshly initialised adapters; tests must not modify it."""
  return reft_jax.load_hf(base_dir, options=RunOptions(lora=LORA))


@pytest.fixture(scope="module")
def lora_model(fresh_model):
  model = nnx.clone(fresh_model)
  randomize_lora(model)
  return model


@pytest.fixture(scope="module")
def data():
  ids = np.random.RandomState(0).randint(0, VOCAB, (2, T))
  mask = np.ones((2, T), np.int64)
  mask[1, 6:] = 0
  return ids, mask


def torch_logits(model, ids, mask):
  with torch.no_grad():
    return model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def max_diff(a, b, mask):
  return float(np.abs(np.asarray(a) - np.asarray(b))[mask > 0].max())


def test_fresh_adapter_is_a_no_op(base_dir, fresh_model, data):
  ids, mask = data
  base, fresh = reft_jax.load_hf(base_dir), fresh_model
  lora = nnx.state(fresh, nnx.LoRAParam)
  flat = dict(lora.flat_state())
  assert len(flat) == 2 * len(LORA.targets)
  for path, var in flat.items():
    if path[-1] == "lora_b":
      assert not np.asarray(var.value).any(), path
    else:
      assert np.asarray(var.value).std() > 0, path
  assert fresh.blocks.attn.q.lora_a.value.shape == (2, 64, 4)
  assert fresh.blocks.attn.o.lora_a.value.shape == (2, 4, 16, 4)
  np.testing.assert_array_equal(np.asarray(fresh(ids, mask)), np.asarray(base(ids, mask)))


def test_merge_lora_matches_adapter(base_dir, lora_model, data):
  ids, mask = data
  ours = np.asarray(lora_model(ids, mask))
  base = reft_jax.load_hf(base_dir)
  assert max_diff(ours, base(ids, mask), mask) > 1e-2  # the adapter does something

  merged = merge_lora(lora_model)
  assert merged.options.lora is None
  assert not jax.tree.leaves(nnx.state(merged, nnx.LoRAParam))
  assert merged.blocks.attn.q.lora_a is None
  np.testing.assert_allclose(np.asarray(merged(ids, mask)), ours, atol=1e-5)
  # the input model is unchanged and merging a plain model is the identity
  assert jax.tree.leaves(nnx.state(lora_model, nnx.LoRAParam))
  assert merge_lora(base) is base


def test_peft_loads_our_adapter(base_dir, lora_model, data, tmp_path):
  ids, mask = data
  out = save_peft_adapter(lora_model, str(tmp_path / "adapter"), base_model_name_or_path=base_dir)
  with open(os.path.join(out, "adapter_config.json")) as f:
    config = json.load(f)
  assert config["r"] == 4 and config["lora_alpha"] == 8
  assert sorted(config["target_modules"]) == sorted(
    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
  )

  peft_model = peft.PeftModel.from_pretrained(load_torch(base_dir), out).eval()
  ref = torch_logits(peft_model, ids, mask)
  assert max_diff(ref, torch_logits(load_torch(base_dir), ids, mask), mask) > 1e-2
  assert max_diff(lora_model(ids, mask), ref, mask) <= 1e-4


def test_peft_subset_of_targets(base_dir, data, tmp_path):
  ids, mask = data
  options = RunOptions(lora=LoraConfig(rank=2, alpha=3.0, targets=("v", "down")))
  model = reft_jax.load_hf(base_dir, options=options)
  randomize_lora(model, seed=1, scale=0.5)
  out = save_peft_adapter(model, str(tmp_path / "adapter"))
  peft_model = peft.PeftModel.from_pretrained(load_torch(base_dir), out).eval()
  assert max_diff(model(ids, mask), torch_logits(peft_model, ids, mask), mask) <= 1e-4


def test_save_hf_merges_adapter(lora_model, data, tmp_path):
  ids, mask = data
  out = reft_jax.save_hf(lora_model, str(tmp_path / "merged"))
  assert max_diff(lora_model(ids, mask), torch_logits(load_torch(out), ids, mask), mask) <= 1e-4


def test_save_peft_adapter_needs_lora(base_dir, tmp_path):
  with pytest.raises(ValueError, match="no LoRA"):
    save_peft_adapter(reft_jax.load_hf(base_dir), str(tmp_path / "adapter"))


def test_sharded_lora_load(base_dir, fresh_model):
  mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
  sharded = reft_jax.load_hf(base_dir, mesh=mesh, options=RunOptions(lora=LORA))
  plain = fresh_model
  a = sharded.blocks.mlp.gate.lora_a.value  # [layers, embed, lora]: embed on fsdp
  assert a.sharding.shard_shape(a.shape) == (2, 32, 4)
  for (path, x), (_, y) in zip(
    nnx.state(sharded, nnx.LoRAParam).flat_state(), nnx.state(plain, nnx.LoRAParam).flat_state(), strict=True
  ):
    np.testing.assert_allclose(np.asarray(x.value), np.asarray(y.value), atol=1e-6, err_msg=str(path))
  ids = jnp.asarray(np.random.RandomState(2).randint(0, VOCAB, (4, 5)))
  logits = nnx.jit(lambda m, x: m(x))(sharded, ids)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(plain(ids)), atol=1e-5)
