"""LoRA: merge adapters into the base weights, and export them in PEFT's adapter format."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from safetensors.numpy import save_file

from reft_jax import distributed as dist
from reft_jax.model import hf as hf_io
from reft_jax.model.transformer import Transformer, abstract_model

_TARGET_PARENT = {"q": "attn", "k": "attn", "v": "attn", "o": "attn",
                  "gate": "mlp", "up": "mlp", "down": "mlp"}


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
      delta = lora.scale * jnp.einsum("lir,lro->lio", a.reshape(a.shape[0], -1, a.shape[-1]),
                                      b.reshape(b.shape[0], b.shape[1], -1))
      v = (v.astype(jnp.float32) + delta.reshape(v.shape)).astype(v.dtype)
    merged[p] = v
  options = model.options.__class__(**{**model.options.__dict__, "lora": None})
  graphdef, _ = nnx.split(abstract_model(model.cfg, options))
  return nnx.merge(graphdef, traverse_util.unflatten_dict(merged))


def save_peft_adapter(model: Transformer, path: str, base_model_name_or_path: str = "") -> str:
  """Writes adapter_config.json + adapter_model.safetensors as PEFT's LoraConfig expects."""
  lora = model.options.lora
  if lora is None:
    raise ValueError("save_peft_adapter: the model has no LoRA adapters (options.lora is None)")
  tensors = {}
  for p, var in nnx.state(model, nnx.LoRAParam).flat_state():
    p = tuple(str(k) for k in p)
    arr = hf_io._host(var.value)  # [L, *in, r] or [L, r, *out]
    module = hf_io.hf_module_name(p[1:-1])
    for i in range(model.cfg.num_layers):
      x = arr[i]
      if p[-1] == "lora_a":  # PEFT lora_A.weight: [r, in]
        w, name = x.reshape(-1, x.shape[-1]).T, "lora_A"
      else:  # PEFT lora_B.weight: [out, r]
        w, name = x.reshape(x.shape[0], -1).T, "lora_B"
      tensors[f"base_model.model.model.layers.{i}.{module}.{name}.weight"] = np.ascontiguousarray(w)
  if dist.is_primary():
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "target_modules": sorted({hf_io.hf_module_name((_TARGET_PARENT[t], t)).split(".")[-1]
                                  for t in lora.targets}),
        "base_model_name_or_path": base_model_name_or_path,
    }
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
      json.dump(config, f, indent=2)
  dist.barrier("save_peft_adapter")
  return path
