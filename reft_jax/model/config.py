"""Architecture hyper-parameters for the decoder families we support, and HF config translation.

One ModelConfig describes every family; the families differ only in its fields (no per-family model
classes): Llama 2/3.x, Mistral (Llama + an optional sliding window on every layer), Qwen2 (qkv bias),
Qwen3 (QK-norm, no bias), Gemma 2 (1+w norms, sandwich norms, soft-caps, alternating windows) and
Gemma 3 (Gemma 2's layout + QK-norm, a 5:1 local/global pattern with a RoPE base per kind, no
attention soft-cap).
"""

from __future__ import annotations

import dataclasses
from typing import Any

FAMILIES = ("llama", "qwen2", "gemma2", "gemma3", "qwen3", "mistral")
# HF model_type -> our family where the names differ (Gemma3ForCausalLM's config is "gemma3_text";
# "gemma3" is the multimodal Gemma3ForConditionalGeneration, whose weights live under other names).
_HF_MODEL_TYPES = {"gemma3_text": "gemma3"}
_OUR_MODEL_TYPES = {v: k for k, v in _HF_MODEL_TYPES.items()}
# rope_scaling key sets: Llama-3 frequency scaling, and linear position interpolation (Gemma 3 global).
_LLAMA3_KEYS = ("factor", "high_freq_factor", "low_freq_factor", "original_max_position_embeddings")
_LINEAR_KEYS = ("factor",)
ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """One decoder config; the families differ only in these fields."""

  family: str = "llama"
  vocab_size: int = 256
  hidden_size: int = 64
  intermediate_size: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 16
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  # RoPE scaling as sorted (key, value) pairs, its kind given by the keys: Llama-3 frequency scaling
  # (factor, high_freq_factor, low_freq_factor, original_max_position_embeddings) or linear position
  # interpolation (factor alone: inv_freq / factor). With rope_local_theta it applies to full layers only.
  rope_scaling: tuple[tuple[str, float], ...] | None = None
  # Gemma 3 only (required there): the RoPE base of its sliding-window (local) layers, never scaled.
  rope_local_theta: float | None = None
  max_position_embeddings: int = 2048
  activation: str = "silu"
  qkv_bias: bool = False  # Qwen2
  qk_norm: bool = False  # Qwen3, Gemma3: RMSNorm over head_dim on each q and k head, before RoPE
  norm_plus_one: bool = False  # Gemma: x * (1 + w)
  sandwich_norms: bool = False  # Gemma2: post-attention and pre/post-ffw norms
  scale_embeddings: bool = False  # Gemma: embeddings * sqrt(hidden)
  tie_embeddings: bool = False
  query_scale: float | None = None  # None: head_dim ** -0.5
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None
  sliding_window: int | None = None
  # Per layer "full" or "sliding"; empty = all full.
  layer_types: tuple[str, ...] = ()
  bos_token_id: int | None = None
  eos_token_id: int | None = None
  pad_token_id: int | None = None

  def __post_init__(self):
    def bad(field, why):
      raise ValueError(f"model config: {field}={getattr(self, field)!r} {why}")

    if self.family not in FAMILIES:
      bad("family", f"is not one of {FAMILIES}")
    if self.activation not in ACTIVATIONS:
      bad("activation", f"is not one of {ACTIVATIONS}")
    for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
      if getattr(self, f) <= 0:
        bad(f, "must be positive")
    if self.num_heads % self.num_kv_heads:
      bad("num_kv_heads", f"must divide num_heads={self.num_heads}")
    if self.layer_types and len(self.layer_types) != self.num_layers:
      bad("layer_types", f"must have num_layers={self.num_layers} entries")
    if any(t not in ("full", "sliding") for t in self.layer_types):
      bad("layer_types", "entries must be 'full' or 'sliding'")
    if "sliding" in self.layer_types and not self.sliding_window:
      bad("sliding_window", "must be set when some layer_types are 'sliding'")
    if self.rope_scaling is not None and tuple(k for k, _ in self.rope_scaling) not in (_LLAMA3_KEYS, _LINEAR_KEYS):
      bad("rope_scaling", f"must have the sorted keys {_LLAMA3_KEYS} (llama3) or {_LINEAR_KEYS} (linear)")
    if (self.family == "gemma3") != (self.rope_local_theta is not None):
      # Gemma 3's local layers have their own base (and no scaling); no other HF family can say so.
      bad("rope_local_theta", "must be set for gemma3 and only for gemma3")
    if self.family == "mistral" and len(set(self.windows)) > 1:
      # HF Mistral has one sliding_window for every layer (or none): a mixture cannot be exported.
      bad("layer_types", "must be all 'sliding' or all 'full' for mistral")

  @property
  def windows(self) -> tuple[int, ...]:
    """Attention window per layer; 0 means unbounded (full causal attention)."""
    types = self.layer_types or ("full",) * self.num_layers
    return tuple(self.sliding_window if t == "sliding" else 0 for t in types)

  def num_params(self, include_embeddings: bool = True) -> int:
    d, f, h, kv, hd = (self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads, self.head_dim)
    attn = d * h * hd * 2 + d * kv * hd * 2 + (h + 2 * kv) * hd * self.qkv_bias
    norms = d * (4 if self.sandwich_norms else 2) + 2 * hd * self.qk_norm
    per_layer = attn + 3 * d * f + norms
    emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
    return self.num_layers * per_layer + d + (emb if include_embeddings else 0)

  def replace(self, **kw) -> ModelConfig:
    return dataclasses.replace(self, **kw)


# ---------------------------------------------------------------- HF config.json <-> ModelConfig


def _rope_params(hf: dict[str, Any]) -> dict[str, Any]:
  # transformers 5 writes rope_parameters={rope_theta, rope_type, ...}; v4 wrote rope_theta/rope_scaling.
  rope = dict(hf.get("rope_parameters") or {})
  if not rope:
    rope = dict(hf.get("rope_scaling") or {})
    rope.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
  return _named_type(rope)


def _named_type(rope: dict[str, Any]) -> dict[str, Any]:
  if "type" in rope and "rope_type" not in rope:
    rope["rope_type"] = rope.pop("type")
  return rope


def _gemma3_rope(hf: dict[str, Any]) -> tuple[dict[str, Any], float]:
  """(global RoPE parameters, local base). transformers 5 nests rope_parameters by layer type; v4
  wrote rope_theta (global, default 1e6), rope_local_base_freq (default 1e4) and rope_scaling."""
  nested = hf.get("rope_parameters") or {}
  if "full_attention" in nested or "sliding_attention" in nested:
    full = _named_type(dict(nested.get("full_attention") or {}))
    local = _named_type(dict(nested.get("sliding_attention") or {}))
  else:
    full = _named_type(dict(hf.get("rope_scaling") or {}))
    local = {"rope_theta": hf.get("rope_local_base_freq", 10000.0)}
  full.setdefault("rope_theta", hf.get("rope_theta", 1_000_000.0))
  if local.get("rope_type", "default") != "default":
    raise ValueError(f"rope type {local['rope_type']!r} on sliding_attention layers is not supported (default)")
  return full, float(local.get("rope_theta", hf.get("rope_local_base_freq", 10000.0)))


def _scaling(rope: dict[str, Any], source: str) -> tuple[tuple[str, float], ...] | None:
  rope_type = rope.get("rope_type", "default")
  keys = {"default": (), "llama3": _LLAMA3_KEYS, "linear": _LINEAR_KEYS}.get(rope_type)
  if keys is None:
    raise ValueError(f"{source}: rope type {rope_type!r} is not supported (default, llama3, linear)")
  return tuple((k, float(rope[k])) for k in keys) or None


def _first_id(v):
  return v[0] if isinstance(v, (list, tuple)) else v


def _default_layer_types(family: str, n: int) -> tuple[str, ...]:
  """transformers' layer pattern when config.json has no layer_types: Gemma 2 alternates sliding/full
  (sliding first); Gemma 3 has five sliding layers, then one full (sliding_window_pattern=6)."""
  period = {"gemma2": 2, "gemma3": 6}[family]
  return tuple("sliding" if (i + 1) % period else "full" for i in range(n))


def _layer_types(hf: dict[str, Any], family: str, n_layers: int) -> tuple[str, ...]:
  """Which layers attend within a sliding window ("sliding") and which attend to everything ("full")."""
  layer_types = tuple("sliding" if t == "sliding_attention" else "full" for t in (hf.get("layer_types") or ()))
  if family in ("gemma2", "gemma3") and not layer_types:
    layer_types = _default_layer_types(family, n_layers)
  if family in ("qwen2", "qwen3"):
    if not hf.get("use_sliding_window", False):
      layer_types = ()
    elif not layer_types and hf.get("sliding_window"):  # v4 configs: windows from max_window_layers on
      first = hf.get("max_window_layers", 28)
      layer_types = tuple("sliding" if i >= first else "full" for i in range(n_layers))
  if family == "mistral":  # one window on every layer, or none
    layer_types = ("sliding",) * n_layers if hf.get("sliding_window") else ()
  return layer_types


def from_hf_config(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
  """Translates a Hugging Face config dict into a ModelConfig (errors name the field)."""
  model_type = hf.get("model_type")
  family = _HF_MODEL_TYPES.get(model_type, model_type)
  if model_type == "gemma3":
    raise ValueError(
      f"{source}: model_type='gemma3' is Gemma 3's multimodal checkpoint "
      "(Gemma3ForConditionalGeneration); use a text-only Gemma3ForCausalLM checkpoint "
      "(model_type 'gemma3_text')"
    )
  if family not in FAMILIES:
    supported = tuple(_OUR_MODEL_TYPES.get(f, f) for f in FAMILIES)
    raise ValueError(f"{source}: model_type={model_type!r} is not supported; supported: {supported}")
  gemma = family in ("gemma2", "gemma3")
  try:
    local_theta = None
    if family == "gemma3":
      try:
        rope, local_theta = _gemma3_rope(hf)
      except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    else:
      rope = _rope_params(hf)
    scaling = _scaling(rope, source)
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    n_layers = hf["num_hidden_layers"]
    layer_types = _layer_types(hf, family, n_layers)
    common = dict(
      family=family,
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"],
      num_layers=n_layers,
      num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=head_dim,
      rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
      rope_theta=float(rope.get("rope_theta", 10000.0)),
      rope_scaling=scaling,
      rope_local_theta=local_theta,
      max_position_embeddings=hf.get("max_position_embeddings", 2048),
      tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
      layer_types=layer_types if "sliding" in layer_types else (),
      sliding_window=hf.get("sliding_window") if "sliding" in layer_types else None,
      bos_token_id=_first_id(hf.get("bos_token_id")),
      eos_token_id=_first_id(hf.get("eos_token_id")),
      pad_token_id=_first_id(hf.get("pad_token_id")),
    )
  except KeyError as e:
    raise ValueError(f"{source}: required field {e.args[0]!r} is missing") from None
  if family in ("llama", "mistral", "qwen3"):
    # Qwen3's attention_bias would also put a bias on o_proj, which our model does not have.
    if hf.get("attention_bias") or hf.get("mlp_bias"):
      raise ValueError(f"{source}: attention_bias/mlp_bias=True is not supported for {family}")
    return ModelConfig(activation=hf.get("hidden_act", "silu"), qk_norm=family == "qwen3", **common)
  if family == "qwen2":
    return ModelConfig(activation=hf.get("hidden_act", "silu"), qkv_bias=True, **common)
  if family == "gemma3" and hf.get("use_bidirectional_attention"):
    raise ValueError(f"{source}: use_bidirectional_attention=True (an embedding model) is not supported")
  return ModelConfig(  # gemma2, gemma3
    activation=hf.get("hidden_activation") or hf.get("hidden_act", "gelu_pytorch_tanh"),
    norm_plus_one=True,
    sandwich_norms=True,
    scale_embeddings=True,
    qk_norm=family == "gemma3",
    query_scale=float(hf.get("query_pre_attn_scalar", head_dim)) ** -0.5,
    # Gemma 3 dropped attention soft-capping: transformers' Gemma3Attention never applies
    # attn_logit_softcapping, whatever config.json says.
    attn_logit_softcap=hf.get("attn_logit_softcapping") if family == "gemma2" else None,
    final_logit_softcap=hf.get("final_logit_softcapping"),
    **common,
  )


def _rope_dict(theta: float, scaling) -> dict[str, Any]:
  rope: dict[str, Any] = {"rope_theta": theta, "rope_type": "default"}
  if scaling:
    rope.update(dict(scaling), rope_type="llama3" if len(scaling) > 1 else "linear")
    if "original_max_position_embeddings" in rope:
      rope["original_max_position_embeddings"] = int(rope["original_max_position_embeddings"])
  return rope


def to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
  """The config.json that transformers reads for this model."""
  rope = _rope_dict(cfg.rope_theta, cfg.rope_scaling)
  layer_types = [("sliding_attention" if w else "full_attention") for w in cfg.windows]
  hf = dict(
    model_type=_OUR_MODEL_TYPES.get(cfg.family, cfg.family),
    vocab_size=cfg.vocab_size,
    hidden_size=cfg.hidden_size,
    intermediate_size=cfg.intermediate_size,
    num_hidden_layers=cfg.num_layers,
    num_attention_heads=cfg.num_heads,
    num_key_value_heads=cfg.num_kv_heads,
    head_dim=cfg.head_dim,
    rms_norm_eps=cfg.rms_norm_eps,
    rope_parameters=rope,
    rope_theta=cfg.rope_theta,
    max_position_embeddings=cfg.max_position_embeddings,
    tie_word_embeddings=cfg.tie_embeddings,
    bos_token_id=cfg.bos_token_id,
    eos_token_id=cfg.eos_token_id,
    pad_token_id=cfg.pad_token_id,
  )
  if cfg.family in ("llama", "mistral"):
    hf.update(
      architectures=["LlamaForCausalLM" if cfg.family == "llama" else "MistralForCausalLM"],
      hidden_act=cfg.activation,
      attention_bias=False,
      mlp_bias=False,
    )
    if cfg.family == "mistral":
      hf["sliding_window"] = cfg.sliding_window if any(cfg.windows) else None
  elif cfg.family in ("qwen2", "qwen3"):
    hf.update(
      architectures=["Qwen2ForCausalLM" if cfg.family == "qwen2" else "Qwen3ForCausalLM"],
      hidden_act=cfg.activation,
      layer_types=layer_types,
      use_sliding_window=bool(cfg.sliding_window),
      sliding_window=cfg.sliding_window,
    )
    if cfg.family == "qwen3":
      hf["attention_bias"] = False
  else:
    hf.update(
      architectures=["Gemma2ForCausalLM" if cfg.family == "gemma2" else "Gemma3ForCausalLM"],
      hidden_activation=cfg.activation,
      query_pre_attn_scalar=round((cfg.query_scale or cfg.head_dim**-0.5) ** -2),
      attn_logit_softcapping=cfg.attn_logit_softcap,
      final_logit_softcapping=cfg.final_logit_softcap,
      sliding_window=cfg.sliding_window or cfg.max_position_embeddings,
      layer_types=layer_types,
    )
    if cfg.family == "gemma3":
      local = cfg.rope_local_theta
      hf.update(
        rope_parameters={"full_attention": rope, "sliding_attention": _rope_dict(local, None)},
        rope_local_base_freq=local,
        use_bidirectional_attention=False,
      )
  return hf
