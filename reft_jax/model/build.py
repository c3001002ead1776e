"""The config's model: its run options, mesh, a trainable build (HF checkpoint or random init) and a frozen
load for models that only run (teacher, filter, evaluation)."""

from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections
from flax import nnx

from reft_jax import sharding as shd
from reft_jax.config import ConfigError, check, csv_list
from reft_jax.model.presets import PRESETS
from reft_jax.model.hf import load_hf
from reft_jax.model.transformer import LoraConfig, RunOptions, Transformer, abstract_model


def model_dir(spec: str) -> str:
  """A HF model directory from `spec`: a .gguf file or "package:NAME" (converted once into a cache
  directory, process 0 first so that processes sharing its disk find it done), else `spec` itself."""
  if not (spec.startswith("package:") or spec.endswith(".gguf")):
    return spec
  from reft_jax import distributed as dist
  from reft_jax.model.gguf import converted_dir

  path = converted_dir(spec) if dist.is_primary() else ""
  dist.barrier("gguf")
  return path or converted_dir(spec)


def run_options(c: ml_collections.ConfigDict) -> RunOptions:
  lora = None
  if c.train.mode == "lora":
    lora = LoraConfig(rank=c.train.lora_rank, alpha=c.train.lora_alpha, targets=tuple(csv_list(c.train.lora_targets)))
  return RunOptions(
    dtype=c.model.dtype,
    param_dtype=c.model.param_dtype,
    scan_layers=c.model.scan_layers,
    remat=c.model.remat,
    lora=lora,
    attention=c.model.attention,
    fuse_projections=c.model.fuse_projections,
  )


def validate_model(c: ml_collections.ConfigDict) -> None:
  m = c.model
  check(
    bool(m.hf_path) or m.arch in PRESETS,
    "model.arch",
    m.arch,
    f"must be one of {tuple(PRESETS)} when model.hf_path is empty",
  )
  if m.hf_path.startswith((".", "/", "~")):  # a local path (anything else may be a hub name)
    check(os.path.isdir(os.path.expanduser(m.hf_path)), "model.hf_path", m.hf_path, "directory does not exist")
  try:
    run_options(c)
  except ValueError as e:
    raise ConfigError(f"config.model/train: {e}") from None


def setup_mesh(c: ml_collections.ConfigDict):
  return shd.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor), shd.parse_rules(c.mesh.rules)


def build_model(c: ml_collections.ConfigDict, mesh, rules, tokenizer=None) -> Transformer:
  """From a HF checkpoint (model.hf_path), or randomly initialised from `model.arch`, sharded."""
  options = run_options(c)
  if c.model.hf_path:
    model = load_hf(c.model.hf_path, mesh=mesh, options=options, rules=rules, seed=c.seed)
    if tokenizer is not None:
      check_vocab(len(tokenizer), model.cfg.vocab_size, c.model.tokenizer or c.model.hf_path, c.model.hf_path)
    return model
  cfg = PRESETS[c.model.arch]
  if tokenizer is not None:
    vocab = -(-len(tokenizer) // 8) * 8
    cfg = cfg.replace(
      vocab_size=vocab,
      bos_token_id=tokenizer.bos_token_id,
      eos_token_id=tokenizer.eos_token_id,
      pad_token_id=tokenizer.pad_token_id,
    )
  graphdef, abstract = nnx.split(abstract_model(cfg, options))
  shardings = shd.state_shardings(abstract, mesh, rules)

  def init():
    return nnx.to_pure_dict(nnx.state(Transformer(cfg, options, rngs=nnx.Rngs(params=c.seed))))

  return nnx.merge(graphdef, jax.jit(init, out_shardings=shardings)())


def check_vocab(tokens: int, rows: int, tokenizer: str, model: str) -> None:
  """A tokenizer with more tokens than the model has embedding rows does not belong to it (its extra ids
  would read past the table: NaN or garbage); fewer is normal (vocabularies are padded), so not an error."""
  if tokens > rows:
    raise ValueError(
      f"the tokenizer of {tokenizer} has {tokens} tokens but the model {model} has {rows} embedding rows: "
      "they do not belong together (set model.tokenizer to the model's own tokenizer, or leave it empty)"
    )


def load_frozen(c: ml_collections.ConfigDict, path: str, mesh, rules) -> Transformer:
  """A model that is only run, never trained (teacher, filter, evaluation, generation): weights kept in
  the compute dtype (a bf16 teacher: half the memory, no f32 master copy needed), layers scanned and
  attention as configured, no LoRA adapters."""
  options = dataclasses.replace(run_options(c), param_dtype=c.model.dtype, lora=None, remat="none")
  return load_hf(path, mesh=mesh, options=options, rules=rules)
