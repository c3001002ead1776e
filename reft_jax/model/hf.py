"""Hugging Face checkpoints <-> our model: a per-family name map plus one reshape rule.

HF linear weights are [out, in]; ours are [*in_shape, *out_shape] (e.g. q: [embed, heads, head_dim]),
so ours = hf.T.reshape(in_shape + out_shape) and back. Per-layer tensors are stacked on axis 0.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from reft_jax import distributed as dist
from reft_jax import sharding as shd
from reft_jax.model.config import ModelConfig, from_hf_config, to_hf_config
from reft_jax.model.transformer import RunOptions, Transformer, abstract_model

log = logging.getLogger(__name__)

# our path under blocks -> HF name under model.layers.{i}
_LAYER_NAMES = {
  ("attn", "q", "kernel"): "self_attn.q_proj.weight",
  ("attn", "k", "kernel"): "self_attn.k_proj.weight",
  ("attn", "v", "kernel"): "self_attn.v_proj.weight",
  ("attn", "o", "kernel"): "self_attn.o_proj.weight",
  ("attn", "q", "bias"): "self_attn.q_proj.bias",
  ("attn", "k", "bias"): "self_attn.k_proj.bias",
  ("attn", "v", "bias"): "self_attn.v_proj.bias",
  ("mlp", "gate", "kernel"): "mlp.gate_proj.weight",
  ("mlp", "up", "kernel"): "mlp.up_proj.weight",
  ("mlp", "down", "kernel"): "mlp.down_proj.weight",
  ("attn", "q_norm", "scale"): "self_attn.q_norm.weight",  # Qwen3, Gemma 3 (QK-norm)
  ("attn", "k_norm", "scale"): "self_attn.k_norm.weight",
  ("attn_norm", "scale"): "input_layernorm.weight",
  ("post_attn_norm", "scale"): "post_attention_layernorm.weight",
  ("post_mlp_norm", "scale"): "post_feedforward_layernorm.weight",
}
_GLOBAL_NAMES = {
  ("embed",): "model.embed_tokens.weight",
  ("final_norm", "scale"): "model.norm.weight",
  ("lm_head", "kernel"): "lm_head.weight",
}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_module_name(sub: tuple[str, ...]) -> str:
  """HF module (no .weight) of a block sub-path, e.g. ('attn', 'q') -> 'self_attn.q_proj'."""
  return _LAYER_NAMES[(*sub, "kernel")].rsplit(".", 1)[0]


def _layer_name(cfg: ModelConfig, sub: tuple[str, ...]) -> str:
  if sub == ("mlp_norm", "scale"):  # Gemma 2/3 have a post-attention norm, so the pre-MLP norm is renamed
    return "pre_feedforward_layernorm.weight" if cfg.sandwich_norms else "post_attention_layernorm.weight"
  return _LAYER_NAMES[sub]


def _n_in(path: tuple[str, ...]) -> int:
  """Number of leading (input) dims of our kernel: o contracts (heads, head_dim)."""
  return 2 if path[-2] == "o" else 1


def to_hf_layout(path, ours: np.ndarray) -> np.ndarray:
  if path[-1] != "kernel":
    return ours.reshape(-1) if path[-1] == "bias" else ours
  n = _n_in(path)
  return ours.reshape(math.prod(ours.shape[:n]), -1).T


def hf_shape(path, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The HF tensor shape of one (per-layer) parameter of ours, without touching data."""
  if path[-1] == "kernel":
    n = _n_in(path)
    return (math.prod(shape[n:]), math.prod(shape[:n]))
  return (math.prod(shape),) if path[-1] == "bias" else tuple(shape)


def from_hf_layout(path, hf: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  if path[-1] == "kernel":
    hf = hf.T
  return hf.reshape(shape)


def _flat_params(state: nnx.State) -> Iterator[tuple[tuple[str, ...], nnx.Variable]]:
  for path, var in state.flat_state():
    yield tuple(str(p) for p in path), var


class _Reader:
  """Lazy access to the tensors of one or many *.safetensors files in a directory."""

  def __init__(self, path: str):
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
      raise FileNotFoundError(f"{path}: no *.safetensors files found")
    self.where: dict[str, str] = {}
    for f in files:
      with _open(f) as h:
        for k in h.keys():
          self.where[k] = f
    self._handles: dict[str, object] = {}

  def get(self, name: str) -> np.ndarray:
    f = self.where[name]
    if f not in self._handles:
      self._handles[f] = _open(f)
    try:
      return self._handles[f].get_tensor(name)
    except Exception as e:  # safetensors' own error type: a file cut short after its header was read
      raise ValueError(f"{f}: tensor {name!r} cannot be read ({e}); re-download or re-export the model") from None

  def shape(self, name: str) -> tuple[int, ...]:
    with _open(self.where[name]) as h:
      return tuple(h.get_slice(name).get_shape())


def _open(path: str):
  """safe_open, with one line naming the file when it is not a whole .safetensors file (truncated, empty or
  something else)."""
  try:
    return safe_open(path, framework="numpy")
  except Exception as e:  # SafetensorError is not an OSError/ValueError
    raise ValueError(f"{path}: not a readable .safetensors file ({e}); re-download or re-export the model") from None


def resolve_checkpoint(path: str) -> str:
  """A local directory as is; otherwise a hub repo id, downloaded (weights, config, tokenizer)."""
  path = os.path.expanduser(path)
  if os.path.isdir(path) or path.startswith((".", "/")):
    return path
  from huggingface_hub import snapshot_download

  try:
    return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"])
  except Exception as e:  # offline, gated or unknown repo: say which
    raise FileNotFoundError(
      f"model {path!r}: not a local directory and the hub download failed ({type(e).__name__}: {e})"
    ) from None


def read_hf_config(path: str) -> ModelConfig:
  cfg_file = os.path.join(path, "config.json")
  if not os.path.exists(cfg_file):
    raise FileNotFoundError(f"{cfg_file}: not found (a Hugging Face model directory needs config.json)")
  with open(cfg_file, encoding="utf-8") as f:
    try:
      hf = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{cfg_file}: not valid JSON ({e})") from None
  return from_hf_config(hf, source=cfg_file)


def load_hf(
  path: str,
  dtype: str = "float32",
  mesh=None,
  *,
  options: RunOptions | None = None,
  rules=None,
  seed: int = 0,
  config: ModelConfig | None = None,
  other_tensors: tuple[str, ...] = (),
) -> Transformer:
  """Loads a local HF checkpoint directory; each array goes straight to its target sharding.

  With a mesh, every device receives only its own slice (`jax.make_array_from_callback`), so this
  works unchanged across the processes of a pod. LoRA adapters (options.lora) start freshly
  initialised.
  """
  path = resolve_checkpoint(path)
  cfg = config or read_hf_config(path)
  options = options or RunOptions(dtype=dtype, param_dtype=dtype)
  graphdef, abs_state = nnx.split(abstract_model(cfg, options))
  reader = _Reader(path)
  expected = set()
  values = {}
  for p, var in _flat_params(abs_state):
    if isinstance(var, nnx.LoRAParam):
      continue
    shape, want = var.value.shape, var.value.dtype
    axes = var.get_metadata()["logical_axes"]
    sharding = shd.NamedSharding(mesh, shd.logical_to_spec(axes, shape, mesh, rules)) if mesh else None
    if p[0] == "blocks":
      names = [f"model.layers.{i}.{_layer_name(cfg, p[1:])}" for i in range(cfg.num_layers)]
    else:
      names = [_GLOBAL_NAMES[p]]
    expected.update(names)
    for n in names:
      if n not in reader.where:
        raise ValueError(f"{path}: tensor {n!r} is missing from the checkpoint (needed for {'.'.join(p)})")
      per_layer = shape[1:] if p[0] == "blocks" else shape
      got = reader.shape(n)
      want_hf = hf_shape(p, per_layer)
      if got != want_hf:  # exact: a transposed [in, out] tensor has the right size but not layout
        raise ValueError(
          f"{path}: tensor {n!r} has shape {got}, expected {want_hf} for {cfg.family} config ({'.'.join(p)})"
        )

    full = None

    def load(index, p=p, names=names, shape=shape, want=want):
      # Every device's callback slices one host copy of the (stacked) tensor, built once.
      nonlocal full
      if full is None:
        if p[0] == "blocks":
          full = np.stack([from_hf_layout(p, reader.get(n), shape[1:]) for n in names])
        else:
          full = from_hf_layout(p, reader.get(names[0]), shape)
        full = full.astype(want)
      return full[index]

    if sharding is not None:
      values[p] = jax.make_array_from_callback(shape, sharding, load)
    else:
      values[p] = jnp.asarray(load(()))
    del full
  extra = [
    k
    for k in reader.where
    if k not in expected
    and k not in other_tensors
    and not k.endswith(_IGNORED_SUFFIXES)
    and not (cfg.tie_embeddings and k == "lm_head.weight")
  ]
  if extra:
    log.warning("%s: ignoring %d tensors not used by the %s model, e.g. %s", path, len(extra), cfg.family, extra[:3])
  if options.lora is not None:
    values.update(_fresh_lora(cfg, options, mesh, rules, seed))
  return nnx.merge(graphdef, traverse_util.unflatten_dict(values))


def load_score_model(path: str, dtype: str = "float32", mesh=None, rules=None):
  """A `*ForSequenceClassification` checkpoint (backbone + `score` head, e.g. a moderation model):
  returns (backbone model, score weight [hidden, num_labels])."""
  path = resolve_checkpoint(path)
  reader = _Reader(path)
  if "score.weight" not in reader.where:
    raise ValueError(f"{path}: tensor 'score.weight' is missing: not a sequence-classification checkpoint")
  # No LM head in such checkpoints: build the backbone with tied embeddings (the head is unused).
  model = load_hf(
    path,
    dtype,
    mesh,
    rules=rules,
    other_tensors=("score.weight",),
    config=read_hf_config(path).replace(tie_embeddings=True),
  )
  return model, jnp.asarray(reader.get("score.weight").T, jnp.dtype(dtype))


def _fresh_lora(cfg, options, mesh, rules, seed) -> dict:
  """LoRA parameters from the model's own initialiser; base weights are never materialised (the
  jitted init returns only LoRA leaves, so XLA drops the rest)."""

  def init():
    return nnx.to_pure_dict(nnx.state(Transformer(cfg, options, rngs=nnx.Rngs(params=seed)), nnx.LoRAParam))

  out_sh = None
  if mesh is not None:
    abstract = nnx.state(abstract_model(cfg, options), nnx.LoRAParam)
    out_sh = shd.state_shardings(abstract, mesh, rules)
  return traverse_util.flatten_dict(jax.jit(init, out_shardings=out_sh)())


def _host(x) -> np.ndarray:
  return dist.to_host(x)


def hf_state_dict(model: Transformer, dtype=None) -> dict[str, np.ndarray]:
  """Our weights (LoRA merged in) under HF names, as host numpy arrays."""
  from reft_jax.model.lora import merge_lora

  if model.options.lora is not None:
    model = merge_lora(model)
  cfg = model.cfg
  out = {}
  for p, var in _flat_params(nnx.state(model, nnx.Param)):
    arr = _host(var.value)
    if dtype is not None:
      arr = arr.astype(dtype)
    if p[0] == "blocks":
      for i in range(cfg.num_layers):
        out[f"model.layers.{i}.{_layer_name(cfg, p[1:])}"] = np.ascontiguousarray(to_hf_layout(p, arr[i]))
    else:
      out[_GLOBAL_NAMES[p]] = np.ascontiguousarray(to_hf_layout(p, arr))
  return out


def save_hf(model: Transformer, path: str, tokenizer=None, dtype: str | None = None) -> str:
  """Writes config.json + model.safetensors (+ tokenizer) that transformers' from_pretrained reads.

  A LoRA model is saved with its adapters merged into the weights (see save_peft_adapter for the
  adapter alone). Only process 0 writes; every process takes part in gathering sharded arrays.
  """
  np_dtype = None if dtype is None else jnp.dtype(dtype)
  tensors = hf_state_dict(model, np_dtype)
  if dist.is_primary():
    os.makedirs(path, exist_ok=True)
    hf = to_hf_config(model.cfg)
    hf["torch_dtype"] = hf["dtype"] = str(np_dtype or model.options.param_dtype)
    tmp = os.path.join(path, "model.safetensors.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(path, "model.safetensors"))  # never leave a half-written file
    with open(os.path.join(path, "config.json"), "w") as f:
      json.dump(hf, f, indent=2)
    if tokenizer is not None:
      tokenizer.save_pretrained(path)
  dist.barrier("save_hf")  # no process reads the export before it is complete
  return path


_TARGET_PARENT = {"q": "attn", "k": "attn", "v": "attn", "o": "attn", "gate": "mlp", "up": "mlp", "down": "mlp"}


def save_peft_adapter(model: Transformer, path: str, base_model_name_or_path: str = "") -> str:
  """Writes adapter_config.json + adapter_model.safetensors as PEFT's LoraConfig expects."""
  lora = model.options.lora
  if lora is None:
    raise ValueError("save_peft_adapter: the model has no LoRA adapters (options.lora is None)")
  tensors = {}
  for p, var in nnx.state(model, nnx.LoRAParam).flat_state():
    p = tuple(str(k) for k in p)
    arr = _host(var.value)  # [L, *in, r] or [L, r, *out]
    module = hf_module_name(p[1:-1])
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
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "r": lora.rank,
      "lora_alpha": lora.alpha,
      "lora_dropout": 0.0,
      "bias": "none",
      "fan_in_fan_out": False,
      "inference_mode": True,
      "target_modules": sorted({hf_module_name((_TARGET_PARENT[t], t)).split(".")[-1] for t in lora.targets}),
      "base_model_name_or_path": base_model_name_or_path,
    }
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
      json.dump(config, f, indent=2)
  dist.barrier("save_peft_adapter")
  return path
