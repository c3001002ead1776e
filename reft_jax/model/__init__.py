from reft_jax.model.config import ModelConfig, from_hf_config, to_hf_config
from reft_jax.model.presets import PRESETS
from reft_jax.model.hf import load_hf, read_hf_config, save_hf
from reft_jax.model.gguf import load_gguf as load_gguf  # re-export
from reft_jax.model.hf import save_peft_adapter
from reft_jax.model.lora import merge_lora
from reft_jax.model.transformer import LoraConfig, RunOptions, Transformer, abstract_model, init_model

__all__ = [
  "PRESETS",
  "ModelConfig",
  "from_hf_config",
  "to_hf_config",
  "load_hf",
  "read_hf_config",
  "save_hf",
  "merge_lora",
  "save_peft_adapter",
  "LoraConfig",
  "RunOptions",
  "Transformer",
  "abstract_model",
  "init_model",
]
