"""reft-jax: safe fine-tuning under harmful fine-tuning attacks, in JAX/Flax."""

from reft_jax.model import (
  LoraConfig,
  ModelConfig,
  RunOptions,
  Transformer,
  load_hf,
  merge_lora,
  save_hf,
  save_peft_adapter,
)
from reft_jax.model.gguf import load_gguf as load_gguf  # re-export

__version__ = "0.1.0"
__all__ = [
  "LoraConfig",
  "ModelConfig",
  "RunOptions",
  "Transformer",
  "load_hf",
  "merge_lora",
  "save_hf",
  "save_peft_adapter",
]
