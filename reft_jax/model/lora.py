"""LoRA: merge adapters into the base weights (their PEFT export is model/hf.py:save_peft_adapter)."""

from __future__ import annotations


import jax.numpy as jnp
from flax import nnx, traverse_util

from reft_jax.model.transformer import Transformer, abstract_model


def merge_lora(model: Transformer) -> Transformer:
  """A model without adapters whose kernels are W + (alpha/r) A B; the input is left unchanged."""
  lora = model.options.lora
  if lora is None:
    return model
  flat = {tuple(str(k) for k in p): v.value for p, v in nnx.state(model).flat_state()}
  merged = {}
  for p, v in flat.items():
    if p[-1] in ("lora_a", "lora_b"):
      continue
    if p[-1] == "kernel" and p[:-1] + ("lora_a",) in flat:
      a, b = flat[p[:-1] + ("lora_a",)], flat[p[:-1] + ("lora_b",)]
      delta = lora.scale * jnp.einsum(
        "lir,lro->lio", a.reshape(a.shape[0], -1, a.shape[-1]), b.reshape(b.shape[0], b.shape[1], -1)
      )
      v = (v.astype(jnp.float32) + delta.reshape(v.shape)).astype(v.dtype)
    merged[p] = v
  options = model.options.__class__(**{**model.options.__dict__, "lora": None})
  graphdef, _ = nnx.split(abstract_model(model.cfg, options))
  return nnx.merge(graphdef, traverse_util.unflatten_dict(merged))
