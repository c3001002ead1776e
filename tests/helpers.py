"""Shared test helpers: a tiny offline config and direct access to one training stage."""

from __future__ import annotations

import importlib.util
import os
import sys

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_module(path: str, name: str):
  """A module of the repository that is not in a package (configs/, benchmarks/), by its path under ROOT."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
  mod = importlib.util.module_from_spec(spec)
  sys.modules[name] = mod  # as an import would (dataclasses look their module up there)
  spec.loader.exec_module(mod)
  return mod


def load_config_module():
  return load_module("configs/default.py", "default_config")


def tiny_config(**overrides):
  """The `tiny` preset, shrunk for tests; overrides as dotted keys: tiny_config(**{'train.lr': 1})."""
  c = load_config_module().get_config("tiny")
  c.train.update(num_steps=6, batch_size=8, warmup_steps=1, schedule="constant")
  c.data.update(seq_len=32, builtin_examples=64)
  c.checkpoint.update(every_steps=0, async_save=False)
  c.log.update(progress=False, tensorboard=False)
  from reft_jax.config import with_updates

  return with_updates(c, **overrides)


def mesh_of(data=1, fsdp=1, tensor=1):
  from reft_jax.sharding import make_mesh

  n = data * fsdp * tensor
  return make_mesh(data, fsdp, tensor, devices=jax.devices()[:n])


# Defences with their own harmful set, disjoint from the attack's pool (their <name>.harmful_source).
HARMFUL_SET_DEFENCES = ("booster", "tvaccine", "panacea", "antidote")


def small_world_flags(**sizes) -> list[str]:
  """--config.world.* flags for a safety world small enough for end-to-end CLI tests."""
  base = dict(
    n_alignment=40,
    n_probe=16,
    n_harmful_pool=20,
    n_eval_harmful=8,
    n_eval_harmless=8,
    n_task_train=60,
    n_task_test=8,
    n_pretrain=64,
  )
  merged = {**base, **sizes}
  half = merged["n_harmful_pool"] // 2  # the attack's and Booster's disjoint halves of the pool
  return [f"--config.world.{k}={v}" for k, v in merged.items()] + [
    f"--config.data.harmful_source=world:harmful_pool[0:{half}]",
    *[f"--config.{d}.harmful_source=world:harmful_pool[{half}:{2 * half}]" for d in HARMFUL_SET_DEFENCES],
  ]


def perturbed_torch_model(cls, config, seed: int = 0):
  """A random transformers model whose norms and biases are not at their init (so they matter)."""
  import torch

  torch.manual_seed(seed)
  model = cls(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or "bias" in name:
        p.add_(torch.randn_like(p) * 0.1)
  model.config._attn_implementation = "eager"
  return model


def saved_hf_models(families, make_hf_model, tmp_path_factory) -> dict:
  """family -> (torch model, its save_pretrained dir, our model loaded from that dir)."""
  import reft_jax

  out = {}
  for family in families:
    torch_model = make_hf_model(family)
    path = str(tmp_path_factory.mktemp(f"hf_{family}"))
    torch_model.save_pretrained(path)
    out[family] = (torch_model, path, reft_jax.load_hf(path))
  return out
