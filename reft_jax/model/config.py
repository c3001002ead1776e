"""Architecture hyper-parameters for the decoder families we support, and HF config translation."""

from __future__ import annotations

import dataclasses
from typing import Any

FAMILIES = ("llama", "qwen2", "gemma2")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """One decoder config; Llama, Qwen2 and Gemma2 differ only in these fields."""

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
  # Llama-3 frequency scaling: None or dict(factor, low_freq_factor, high_freq_factor,
  # original_max_position_embeddings).
  rope_scaling: tuple[tuple[str, float], ...] | None = None
  max_position_embeddings: int = 2048
  activation: str = "silu"
  qkv_bias: bool = False  # Qwen2
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
    for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
              "num_kv_heads", "head_dim"):
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

  @property
  def windows(self) -> tuple[int, ...]:
    """Attention window per layer; 0 means unbounded (full causal attention)."""
    types = self.layer_types or ("full",) * self.num_layers
    return tuple(self.sliding_window if t == "sliding" else 0 for t in types)

  def num_params(self, include_embeddings: bool = True) -> int:
    d, f, h, kv, hd = (self.hidden_size, self.intermediate_size, self.num_heads,
                       self.num_kv_heads, self.head_dim)
    attn = d * h * hd * 2 + d * kv * hd * 2 + (h + 2 * kv) * hd * self.qkv_bias
    norms = d * (4 if self.sandwich_norms else 2)
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
  if "type" in rope and "rope_type" not in rope:
    rope["rope_type"] = rope.pop("type")
  return rope


def _first_id(v):
  return v[0] if isinstance(v, (list, tuple)) else v


def from_hf_config(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
  """Translates a Hugging Face config dict into a ModelConfig (errors name the field)."""
  family = hf.get("model_type")
  if family not in FAMILIES:
    raise ValueError(f"{source}: model_type={family!r} is not supported; supported: {FAMILIES}")
  try:
    rope = _rope_params(hf)
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ("default", "llama3"):
      raise ValueError(f"{source}: rope type {rope_type!r} is not supported (default, llama3)")
    scaling = None
    if rope_type == "llama3":
      scaling = tuple(sorted((k, float(rope[k])) for k in (
          "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")))
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    layer_types = tuple("sliding" if t == "sliding_attention" else "full"
                        for t in (hf.get("layer_types") or ()))
    if family == "qwen2" and not hf.get("use_sliding_window", False):
      layer_types = ()
    common = dict(
        family=family, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(rope.get("rope_theta", 10000.0)),
        rope_scaling=scaling, max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", family == "gemma2")),
        layer_types=layer_types if "sliding" in layer_types else (),
        sliding_window=hf.get("sliding_window") if "sliding" in layer_types else None,
        bos_token_id=_first_id(hf.get("bos_token_id")), eos_token_id=_first_id(hf.get("eos_token_id")),
        pad_token_id=_first_id(hf.get("pad_token_id")),
    )
  except KeyError as e:
    raise ValueError(f"{source}: required field {e.args[0]!r} is missing") from None
  if family == "llama":
    if hf.get("attention_bias") or hf.get("mlp_bias"):
      raise ValueError(f"{source}: attention_bias/mlp_bias=True is not supported for llama")
    return ModelConfig(activation=hf.get("hidden_act", "silu"), **common)
  if family == "qwen2":
    return ModelConfig(activation=hf.get("hidden_act", "silu"), qkv_bias=True, **common)
  return ModelConfig(  # gemma2
      activation=hf.get("hidden_activation") or hf.get("hidden_act", "gelu_pytorch_tanh"),
      norm_plus_one=True, sandwich_norms=True, scale_embeddings=True,
      query_scale=float(hf.get("query_pre_attn_scalar", head_dim)) ** -0.5,
      attn_logit_softcap=hf.get("attn_logit_softcapping"),
      final_logit_softcap=hf.get("final_logit_softcapping"), **common)


def to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
  """The config.json that transformers reads for this model."""
  rope: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
  if cfg.rope_scaling:
    rope.update(dict(cfg.rope_scaling), rope_type="llama3")
    rope["original_max_position_embeddings"] = int(rope["original_max_position_embeddings"])
  layer_types = [("sliding_attention" if w else "full_attention") for w in cfg.windows]
  hf = dict(
      model_type=cfg.family, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
      intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
      rms_norm_eps=cfg.rms_norm_eps, rope_parameters=rope, rope_theta=cfg.rope_theta,
      max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_embeddings,
      bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
  )
  if cfg.family == "llama":
    hf.update(architectures=["LlamaForCausalLM"], hidden_act=cfg.activation, attention_bias=False,
              mlp_bias=False)
  elif cfg.family == "qwen2":
    hf.update(architectures=["Qwen2ForCausalLM"], hidden_act=cfg.activation, layer_types=layer_types,
              use_sliding_window=bool(cfg.sliding_window), sliding_window=cfg.sliding_window)
  else:
    hf.update(architectures=["Gemma2ForCausalLM"], hidden_activation=cfg.activation,
              query_pre_attn_scalar=round((cfg.query_scale or cfg.head_dim ** -0.5) ** -2),
              attn_logit_softcapping=cfg.attn_logit_softcap,
              final_logit_softcapping=cfg.final_logit_softcap,
              sliding_window=cfg.sliding_window or cfg.max_position_embeddings, layer_types=layer_types)
  return hf


# ---------------------------------------------------------------- presets (real architectures)

PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(),
    # The safety world's base model: small enough to pretrain in minutes on 2 CPU cores.
    "world": ModelConfig(hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
                         num_kv_heads=2, head_dim=32),
    # SmolLM2-135M(-Instruct), the real model the `smollm2` preset runs offline from a GGUF file.
    "smollm2_135m": ModelConfig(
        family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
        num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
        tie_embeddings=True, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2, pad_token_id=2),
    "llama2_7b": ModelConfig(
        family="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
        num_heads=32, num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5, max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=2),
    "llama3_8b": ModelConfig(
        family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=(("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                      ("original_max_position_embeddings", 8192.0)),
        max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128009),
    "qwen2_7b": ModelConfig(
        family="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
        num_heads=28, num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
        qkv_bias=True, max_position_embeddings=32768, eos_token_id=151645),
    "gemma2_9b": ModelConfig(
        family="gemma2", vocab_size=256000, hidden_size=3584, intermediate_size=14336, num_layers=42,
        num_heads=16, num_kv_heads=8, head_dim=256, rms_norm_eps=1e-6, activation="gelu_pytorch_tanh",
        norm_plus_one=True, sandwich_norms=True, scale_embeddings=True, tie_embeddings=True,
        query_scale=256 ** -0.5, attn_logit_softcap=50.0, final_logit_softcap=30.0, sliding_window=4096,
        layer_types=("sliding", "full") * 21, max_position_embeddings=8192, bos_token_id=2,
        eos_token_id=1, pad_token_id=0),
}
