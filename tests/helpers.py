"""Shared test helpers: a tiny offline config and direct access to one training stage."""

from __future__ import annotations

import importlib.util
import os

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config_module():
  spec = importlib.util.spec_from_file_location("default_config",
                                                os.path.join(ROOT, "configs", "default.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def tiny_config(**overrides):
  """The `tiny` preset, shrunk for tests; overrides as dotted keys: tiny_config(**{'train.lr': 1})."""
  c = load_config_module().get_config("tiny")
  c.train.update(num_steps=6, batch_size=8, warmup_steps=1, schedule="constant")
  c.data.update(seq_len=32, builtin_examples=64)
  c.checkpoint.update(every_steps=0, async_save=False)
  c.log.update(progress=False, tensorboard=False)
  from reft_jax.methods.suite import with_updates

  return with_updates(c, **overrides)


def mesh_of(data=1, fsdp=1, tensor=1):
  from reft_jax.sharding import make_mesh

  n = data * fsdp * tensor
  return make_mesh(data, fsdp, tensor, devices=jax.devices()[:n])
