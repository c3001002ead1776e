"""reft-jax: safe fine-tuning under harmful fine-tuning attacks, in JAX/Flax.

The names below load on first use (PEP 562): `import reft_jax.main` (the CLI) starts without importing JAX,
so the CLI can set the allocator up (reft_jax.hugepages) before anything is allocated.
"""

import importlib

__version__ = "0.1.0"
_LAZY = {
  "LoraConfig": "reft_jax.model",
  "ModelConfig": "reft_jax.model",
  "RunOptions": "reft_jax.model",
  "Transformer": "reft_jax.model",
  "load_hf": "reft_jax.model",
  "merge_lora": "reft_jax.model",
  "save_hf": "reft_jax.model",
  "save_peft_adapter": "reft_jax.model",
  "load_gguf": "reft_jax.model.gguf",
}
__all__ = [name for name in _LAZY if name != "load_gguf"]


def __getattr__(name: str):
  if name in _LAZY:
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'reft_jax' has no attribute {name!r}")


def __dir__():
  return sorted([*globals(), *_LAZY])
