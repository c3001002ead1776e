"""Gemma 3, Qwen3, Mistral and Llama 3.x: logits parity with transformers on tiny random models that
exercise each family's quirks, save_hf round trips, PEFT adapters, sharding, dpa attention, the KV cache,
real config.json files and the 7-12B memory-plan presets."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx

from helpers import load_config_module, perturbed_torch_model, saved_hf_models

import reft_jax
from reft_jax import LoraConfig, RunOptions, save_peft_adapter
from reft_jax.pipelines import plan
from reft_jax import sharding as shd
from reft_jax.model import PRESETS, ModelConfig, abstract_model, from_hf_config, to_hf_config
from reft_jax.model.transformer import rope_frequencies

FAMILIES = ("gemma3", "qwen3", "mistral", "llama3")
VOCAB, T, WINDOW = 128, 12, 4  # every window is shorter than the sequence


def make_hf_model(family: str, seed: int = 0):
  """A tiny random transformers model with perturbed norms (q/k norms included), eager attention."""
  common = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
    initializer_range=0.15,
  )
  if family == "gemma3":
    # Six layers without layer_types: transformers' own 5:1 pattern (sliding_window_pattern=6); the
    # global layers' RoPE is linearly scaled, the local ones rotate at their own base. Tied head.
    common.update(
      num_hidden_layers=6,
      sliding_window=WINDOW,
      query_pre_attn_scalar=24,
      final_logit_softcapping=5.0,
      rope_parameters={
        "full_attention": dict(rope_type="linear", factor=4.0, rope_theta=1e6),
        "sliding_attention": dict(rope_type="default", rope_theta=1e4),
      },
    )
    config, cls = transformers.Gemma3TextConfig(**common), transformers.Gemma3ForCausalLM
  elif family == "qwen3":  # tied head (as Qwen3-0.6B..4B); windows from layer 1 on
    config = transformers.Qwen3Config(
      **common,
      tie_word_embeddings=True,
      use_sliding_window=True,
      sliding_window=WINDOW,
      max_window_layers=1,
      rope_parameters=dict(rope_type="default", rope_theta=1e6),
    )
    cls = transformers.Qwen3ForCausalLM
  elif family == "mistral":  # untied head, one window on every layer
    config = transformers.MistralConfig(
      **common, sliding_window=WINDOW, rope_parameters=dict(rope_type="default", rope_theta=1e6)
    )
    cls = transformers.MistralForCausalLM
  else:  # Llama 3.2-style: tied head, llama3 scaling whose three frequency bands all occur at head_dim 16
    config = transformers.LlamaConfig(
      **common,
      tie_word_embeddings=True,
      rope_parameters=dict(
        rope_type="llama3",
        rope_theta=500000.0,
        factor=32.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=64,
      ),
    )
    cls = transformers.LlamaForCausalLM
  return perturbed_torch_model(cls, config, seed)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  """family -> (torch model, checkpoint dir, our model loaded from it)."""
  return saved_hf_models(FAMILIES, make_hf_model, tmp_path_factory)


def batch(padding: str):
  ids = np.random.RandomState(0).randint(0, VOCAB, (2, T))
  mask = np.ones((2, T), np.int64)
  if padding == "right":
    mask[1, 9:] = 0
  elif padding == "left":
    mask[1, :3] = 0
  return ids, mask


def torch_logits(model, ids, mask):
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  with torch.no_grad():
    return model(
      torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)
    ).logits.numpy()


def max_diff(a, b, mask):
  return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))[mask > 0].max())


def with_config(model, cfg=None, options=RunOptions()):
  """The same parameters under another compatible config or other RunOptions."""
  graphdef, _ = nnx.split(abstract_model(cfg or model.cfg, options))
  return nnx.merge(graphdef, nnx.state(model))


def test_configs_read_as_the_family(hf_dirs):
  g3, q3, mi, l3 = (hf_dirs[f][2].cfg for f in FAMILIES)
  assert (g3.family, q3.family, mi.family, l3.family) == ("gemma3", "qwen3", "mistral", "llama")
  assert g3.layer_types == ("sliding",) * 5 + ("full",) and g3.sliding_window == WINDOW
  assert g3.rope_local_theta == 1e4 and g3.rope_theta == 1e6 and g3.rope_scaling == (("factor", 4.0),)
  assert g3.qk_norm and g3.attn_logit_softcap is None and g3.final_logit_softcap == 5.0
  assert g3.query_scale == 24**-0.5 and g3.tie_embeddings and g3.scale_embeddings
  assert q3.qk_norm and not q3.qkv_bias and q3.layer_types == ("full", "sliding", "sliding")
  assert q3.tie_embeddings and not q3.norm_plus_one
  assert mi.layer_types == ("sliding",) * 3 and not mi.tie_embeddings and not mi.qk_norm
  assert dict(l3.rope_scaling)["factor"] == 32.0 and l3.tie_embeddings
  assert hf_dirs["gemma3"][2].blocks.attn.q_norm.scale.value.shape == (6, 16)


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(hf_dirs, family, padding):
  torch_model, _, model = hf_dirs[family]
  ids, mask = batch(padding)
  ours = model(jnp.asarray(ids), jnp.asarray(mask))
  ref = torch_logits(torch_model, ids, mask)
  assert ours.dtype == jnp.float32 and ours.shape == (2, T, VOCAB)
  assert max_diff(ours, ref, mask) <= 1e-4


@pytest.mark.parametrize(
  "family, change",
  [
    ("gemma3", dict(layer_types=(), sliding_window=None)),  # the windows matter
    ("gemma3", dict(rope_local_theta=1e6)),  # the local layers' own RoPE base matters
    ("gemma3", dict(rope_scaling=None)),  # the global layers' linear scaling matters
    ("qwen3", dict(layer_types=(), sliding_window=None)),
    ("mistral", dict(layer_types=(), sliding_window=None)),
  ],
)
def test_each_quirk_is_needed_for_parity(hf_dirs, family, change):
  """Without the quirk our logits leave transformers' (so the parity test would catch its absence)."""
  torch_model, _, model = hf_dirs[family]
  ids, mask = batch("none")
  plain = with_config(model, model.cfg.replace(**change))
  assert max_diff(plain(jnp.asarray(ids), jnp.asarray(mask)), torch_logits(torch_model, ids, mask), mask) > 1e-3


def test_qk_norm_is_needed_for_parity(hf_dirs):
  torch_model, _, model = hf_dirs["qwen3"]
  ids, mask = batch("none")
  unit = nnx.clone(model)
  for norm in (unit.blocks.attn.q_norm, unit.blocks.attn.k_norm):
    norm.scale.value = jnp.ones_like(norm.scale.value)  # HF's init: the perturbation is lost
  assert max_diff(unit(jnp.asarray(ids), jnp.asarray(mask)), torch_logits(torch_model, ids, mask), mask) > 1e-3


@pytest.mark.parametrize("family", ["gemma3", "llama3"])
def test_rope_frequencies_match_transformers(hf_dirs, family):
  torch_model, _, model = hf_dirs[family]
  rotary = torch_model.model.rotary_emb
  if family == "gemma3":
    np.testing.assert_array_equal(rope_frequencies(model.cfg), rotary.full_attention_inv_freq.numpy())
    np.testing.assert_array_equal(rope_frequencies(model.cfg, local=True), rotary.sliding_attention_inv_freq.numpy())
  else:  # transformers' _compute_llama3_parameters, to float32 rounding: bit for bit on an AVX2 AMD EPYC,
    # one ulp apart in one entry on an AVX-512 Xeon (torch's vectorised pow rounds differently there)
    np.testing.assert_allclose(rope_frequencies(model.cfg), rotary.inv_freq.numpy(), rtol=3e-7, atol=0)
    plain = rope_frequencies(model.cfg.replace(rope_scaling=None))
    ratio = plain / rope_frequencies(model.cfg)
    assert ratio.min() == 1.0 and ratio.max() == 32.0 and ((ratio > 1) & (ratio < 32)).any()


@pytest.mark.parametrize("family", FAMILIES)
def test_save_hf_round_trip(hf_dirs, tmp_path, family):
  torch_model, _, model = hf_dirs[family]
  out = reft_jax.save_hf(model, str(tmp_path / "out"))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(reloaded) is type(torch_model)
  reloaded.config._attn_implementation = "eager"
  ids, mask = batch("left")
  assert max_diff(torch_logits(reloaded, ids, mask), torch_logits(torch_model, ids, mask), mask) <= 1e-5
  again = reft_jax.load_hf(out)
  assert again.cfg == model.cfg
  for (path, a), (_, b) in zip(nnx.state(model).flat_state(), nnx.state(again).flat_state(), strict=True):
    np.testing.assert_array_equal(np.asarray(a.value), np.asarray(b.value), err_msg=str(path))


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_loads_our_adapter(hf_dirs, tmp_path, family):
  torch_model, path, _ = hf_dirs[family]
  lora = LoraConfig(rank=4, alpha=8.0, targets=("q", "k", "v", "o", "gate", "up", "down"))
  model = reft_jax.load_hf(path, options=RunOptions(lora=lora))
  rng = np.random.RandomState(1)
  nnx.update(
    model, jax.tree.map(lambda x: jnp.asarray(0.2 * rng.randn(*x.shape), x.dtype), nnx.state(model, nnx.LoRAParam))
  )
  out = save_peft_adapter(model, str(tmp_path / "adapter"), base_model_name_or_path=path)
  base = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
  base.config._attn_implementation = "eager"
  peft_model = peft.PeftModel.from_pretrained(base, out).eval()
  ids, mask = batch("right")
  ref = torch_logits(peft_model, ids, mask)
  assert max_diff(ref, torch_logits(torch_model, ids, mask), mask) > 1e-2  # the adapter does something
  assert max_diff(model(jnp.asarray(ids), jnp.asarray(mask)), ref, mask) <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_dpa_and_scan_match_einsum(hf_dirs, family):
  _, _, model = hf_dirs[family]
  ids, mask = (jnp.asarray(x) for x in batch("left"))
  ref = np.asarray(model(ids, mask))
  for options in (
    RunOptions(attention="dpa"),
    RunOptions(scan_layers=True),
    RunOptions(scan_layers=True, attention="dpa"),
  ):
    other = with_config(model, options=options)
    np.testing.assert_allclose(np.asarray(other(ids, mask)), ref, atol=1e-5, err_msg=str(options))


@pytest.mark.parametrize("scan", [False, True])
def test_gemma3_kv_cache_decode_matches_full_forward(hf_dirs, scan):
  """Prefill + one-token decode against the KV cache (local and global layers, scanned: a traced layer
  kind picks the RoPE base) equals the full forward."""
  model = with_config(hf_dirs["gemma3"][2], options=RunOptions(scan_layers=scan))
  ids = jnp.asarray(batch("none")[0])
  full = np.asarray(model(ids))
  positions = jnp.broadcast_to(jnp.arange(T), (2, T))
  cache = model.init_cache(2, T)
  prefill_mask = jnp.asarray(np.arange(T) < T - 1, jnp.int32)[None].repeat(2, 0)
  logits, cache = model.forward_cached(ids[:, :-1], positions[:, :-1], prefill_mask, cache, 0)
  np.testing.assert_allclose(np.asarray(logits), full[:, :-1], atol=1e-5)
  last, _ = model.forward_cached(ids[:, -1:], positions[:, -1:], jnp.ones((2, T), jnp.int32), cache, T - 1)
  np.testing.assert_allclose(np.asarray(last[:, 0]), full[:, -1], atol=1e-5)


@pytest.mark.parametrize("family", ["gemma3", "qwen3"])
def test_sharded_load_and_norm_axes(hf_dirs, family):
  _, path, model = hf_dirs[family]
  for name in ("q_norm", "k_norm"):
    var = getattr(model.blocks.attn, name).scale
    assert var.get_metadata()["logical_axes"] == ("layers", "norm")
  mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
  sharded = reft_jax.load_hf(path, mesh=mesh)
  q_norm = sharded.blocks.attn.q_norm.scale[...]
  assert q_norm.sharding.shard_shape(q_norm.shape) == q_norm.shape  # replicated, like every norm
  q = sharded.blocks.attn.q.kernel[...]  # [layers, embed, heads, head_dim]: embed/fsdp, heads/tensor
  assert q.sharding.shard_shape(q.shape) == (q.shape[0], 32, 2, 16)
  ids, mask = (jax.device_put(np.concatenate([a, a]), shd.batch_sharding(mesh)) for a in batch("left"))
  logits = nnx.jit(lambda m, i, k: m(i, k))(sharded, ids, mask)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(model(ids, mask)), atol=1e-5)


# ---------------------------------------------------------------- real config.json files

# Published configs (the fields we read), transformers-4 style as they sit on the hub.
REAL_CONFIGS = {
  # huggingface.co/OpenPipe/gemma-3-12b-it-text-only config.json (google/gemma-3-12b-it's text_config)
  "gemma3_12b": dict(
    model_type="gemma3_text",
    vocab_size=262208,
    hidden_size=3840,
    intermediate_size=15360,
    num_hidden_layers=48,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=256,
    hidden_activation="gelu_pytorch_tanh",
    max_position_embeddings=131072,
    rms_norm_eps=1e-6,
    query_pre_attn_scalar=256,
    rope_local_base_freq=10000.0,
    rope_theta=1000000.0,
    rope_scaling={"factor": 8.0, "rope_type": "linear"},
    sliding_window=1024,
    sliding_window_pattern=6,
    attn_logit_softcapping=None,
    final_logit_softcapping=None,
    bos_token_id=2,
    eos_token_id=1,
    pad_token_id=0,
  ),
  # Qwen/Qwen3-8B config.json
  "qwen3_8b": dict(
    model_type="qwen3",
    vocab_size=151936,
    hidden_size=4096,
    intermediate_size=12288,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    hidden_act="silu",
    max_position_embeddings=40960,
    max_window_layers=36,
    rms_norm_eps=1e-6,
    rope_scaling=None,
    rope_theta=1000000,
    sliding_window=None,
    use_sliding_window=False,
    tie_word_embeddings=False,
    attention_bias=False,
    bos_token_id=151643,
    eos_token_id=151645,
  ),
  # mistralai/Mistral-7B-Instruct-v0.1 config.json
  "mistral_7b": dict(
    model_type="mistral",
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    hidden_act="silu",
    max_position_embeddings=32768,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    sliding_window=4096,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
  ),
  # meta-llama/Llama-3.1-8B(-Instruct) config.json
  "llama3_8b": dict(
    model_type="llama",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    hidden_act="silu",
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling={
      "factor": 8.0,
      "low_freq_factor": 1.0,
      "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192,
      "rope_type": "llama3",
    },
    tie_word_embeddings=False,
    bos_token_id=128000,
    eos_token_id=[128009, 128001, 128008],
  ),
}


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_real_config_json_gives_the_preset(name):
  assert from_hf_config(REAL_CONFIGS[name]) == PRESETS[name]


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_transformers_reads_our_config_as_the_preset(name):
  """Our exported config.json, read by transformers' own config class, has the preset's layer kinds,
  RoPE parameters and shapes."""
  hf = transformers.AutoConfig.for_model(**to_hf_config(PRESETS[name])).to_dict()
  assert from_hf_config(hf) == PRESETS[name]


def test_gemma2_config_without_layer_types_alternates():
  """A transformers-4 Gemma 2 config.json (no layer_types) has sliding even layers, as Gemma2Config."""
  hf = to_hf_config(PRESETS["gemma2_9b"])
  del hf["layer_types"]
  assert from_hf_config(hf) == PRESETS["gemma2_9b"]
  assert transformers.Gemma2Config(**{k: v for k, v in hf.items() if k != "model_type"}).layer_types[:2] == [
    "sliding_attention",
    "full_attention",
  ]


def test_qwen3_config_windows_from_max_window_layers():
  hf = dict(REAL_CONFIGS["qwen3_8b"], use_sliding_window=True, sliding_window=4096, max_window_layers=30)
  cfg = from_hf_config(hf)
  assert cfg.layer_types == ("full",) * 30 + ("sliding",) * 6 and cfg.sliding_window == 4096
  assert transformers.Qwen3Config(**{k: v for k, v in hf.items() if k != "model_type"}).layer_types == [
    "sliding_attention" if t == "sliding" else "full_attention" for t in cfg.layer_types
  ]


@pytest.mark.parametrize(
  "hf, match",
  [
    (dict(REAL_CONFIGS["gemma3_12b"], model_type="gemma3"), "multimodal"),
    (dict(REAL_CONFIGS["gemma3_12b"], use_bidirectional_attention=True), "use_bidirectional_attention"),
    (dict(REAL_CONFIGS["gemma3_12b"], rope_scaling={"rope_type": "yarn", "factor": 8.0}), "yarn"),
    (dict(REAL_CONFIGS["qwen3_8b"], attention_bias=True), "attention_bias"),
  ],
)
def test_unsupported_configs_are_named(hf, match):
  with pytest.raises(ValueError, match=match):
    from_hf_config(hf)


@pytest.mark.parametrize(
  "kw, field",
  [
    (dict(family="gemma3"), "rope_local_theta"),
    (dict(rope_local_theta=1e4), "rope_local_theta"),
    (dict(rope_scaling=(("factor", 2.0), ("low_freq_factor", 1.0))), "rope_scaling"),
    (dict(family="mistral", num_layers=2, sliding_window=4, layer_types=("sliding", "full")), "layer_types"),
  ],
)
def test_model_config_errors_name_the_field(kw, field):
  with pytest.raises(ValueError, match=f"{field}="):
    ModelConfig(**kw)


# ---------------------------------------------------------------- presets and memory plans


@pytest.mark.parametrize(
  "name, expected", [("gemma3_12b", 11.77e9), ("qwen3_8b", 8.19e9), ("mistral_7b", 7.24e9), ("llama3_8b", 8.03e9)]
)
def test_presets_and_memory_plans(name, expected):
  cfg = PRESETS[name]
  model = abstract_model(cfg, RunOptions(scan_layers=True, lora=LoraConfig(rank=4)))
  base = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
  count = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, base)))
  assert count == cfg.num_params() and abs(count - expected) <= 0.005 * expected, count
  for path, var in nnx.state(model, nnx.Variable).flat_state():
    axes = var.get_metadata().get("logical_axes")
    assert isinstance(axes, tuple) and len(axes) == len(var.value.shape), (path, axes)

  c = load_config_module().get_config("llama2_7b")  # the 7B training settings on this architecture
  c.model.arch = name
  spec = plan.stage_spec(c, mode="lora", stage="student")
  assert spec.model == cfg
  one = plan.plan_row(spec, plan.HARDWARE["h100"], (1, -1, 1), None, compile=False)
  eight = plan.plan_row(spec, plan.HARDWARE["v5e-8"], (1, -1, 1), None, compile=False)
  assert one["teacher"] == pytest.approx(count * 2, rel=1e-6)  # the bf16 teacher
  assert eight["teacher"] == pytest.approx(count * 2 / 8, rel=0.01)
  assert 0 < eight["lora"] < 0.03 * eight["params"] and eight["total"] > eight["params"]


# ---------------------------------------------------------------- Gemma 3 GGUF (written here)


def write_gemma3_gguf(torch_model, path: str, pattern=None) -> None:
  """What llama.cpp's convert_hf_to_gguf (Gemma3Model) writes for a float32 Gemma 3: norm weights stored
  as 1 + w, no q/k permutation, tied head (no output.weight), the global RoPE (base, linear scaling) and
  the window in metadata; the local base, 5:1 pattern and query scale are implied by the architecture."""
  import gguf

  from reft_jax.model import gguf as rg

  c = torch_model.config
  full = c.rope_parameters["full_attention"]
  w = gguf.GGUFWriter(path, "gemma3")
  w.add_architecture()
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_block_count(c.num_hidden_layers)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_key_length(c.head_dim)
  w.add_value_length(c.head_dim)
  w.add_rope_freq_base(full["rope_theta"])
  w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
  w.add_rope_scaling_factor(full["factor"])
  w.add_final_logit_softcapping(c.final_logit_softcapping)
  w.add_sliding_window(c.sliding_window)
  if pattern is not None:
    w.add_sliding_window_pattern(pattern)
  specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
  w.add_tokenizer_model("llama")
  w.add_token_list(specials + [chr(ord("a") + i % 26) * (1 + i // 26) for i in range(VOCAB - 4)])
  w.add_token_scores([-float(i) for i in range(VOCAB)])
  w.add_token_types([3, 3, 3, 2] + [1] * (VOCAB - 4))
  w.add_bos_token_id(2)
  w.add_eos_token_id(1)
  w.add_pad_token_id(0)
  w.add_add_space_prefix(False)
  names = {v: k for k, v in rg._GEMMA_LAYER_NAMES.items()}
  glob = {v: k for k, v in rg._GLOBAL_NAMES.items()}
  for name, p in torch_model.state_dict().items():
    if name == "lm_head.weight":
      continue
    arr = p.detach().numpy().astype(np.float32)
    if name.endswith("norm.weight"):
      arr = arr + np.float32(1.0)
    if name in glob:
      w.add_tensor(glob[name], arr)
    else:
      _, _, layer, *module, kind = name.split(".")
      w.add_tensor(f"blk.{layer}.{names['.'.join(module)]}.{kind}", arr)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.fixture(scope="module")
def gemma3_gguf(tmp_path_factory):
  pytest.importorskip("gguf")
  # llama.cpp's Gemma 3 semantics: query scale 1/sqrt(head_dim), local RoPE base 1e4, pattern 5:1.
  config = transformers.Gemma3TextConfig(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
    initializer_range=0.15,
    sliding_window=WINDOW,
    query_pre_attn_scalar=16,
    final_logit_softcapping=5.0,
    rope_parameters={
      "full_attention": dict(rope_type="linear", factor=4.0, rope_theta=1e6),
      "sliding_attention": dict(rope_type="default", rope_theta=1e4),
    },
  )
  torch_model = perturbed_torch_model(transformers.Gemma3ForCausalLM, config, 3)
  path = str(tmp_path_factory.mktemp("gguf_gemma3") / "tiny-gemma3.gguf")
  write_gemma3_gguf(torch_model, path)
  return torch_model, path


def test_gemma3_gguf_matches_transformers(gemma3_gguf, tmp_path):
  torch_model, path = gemma3_gguf
  model, tok = reft_jax.load_gguf(path, out_dir=str(tmp_path / "hf"))
  cfg = model.cfg
  assert cfg.family == "gemma3" and cfg.tie_embeddings and cfg.qk_norm and cfg.rope_local_theta == 1e4
  assert cfg.layer_types == ("sliding",) * 5 + ("full",) and cfg.sliding_window == WINDOW
  assert cfg.rope_scaling == (("factor", 4.0),) and cfg.final_logit_softcap == 5.0
  assert cfg.query_scale == 16**-0.5 and (cfg.bos_token_id, cfg.eos_token_id) == (2, 1)
  ref = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  from reft_jax.model.hf import hf_state_dict

  for k, v in hf_state_dict(model).items():  # norms: (1 + w) - 1 in float32
    np.testing.assert_allclose(v, ref[k], atol=1e-6, err_msg=k)
  for padding in ("left", "right"):
    ids, mask = batch(padding)
    assert max_diff(model(jnp.asarray(ids), jnp.asarray(mask)), torch_logits(torch_model, ids, mask), mask) <= 1e-4
  assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<bos>", "<eos>", "<pad>")


def test_gemma3_gguf_metadata_rules():
  from reft_jax.model import gguf as rg

  meta = {
    "general.architecture": "gemma3",
    "gemma3.embedding_length": 5376,
    "gemma3.block_count": 62,
    "gemma3.attention.head_count": 32,
    "gemma3.attention.head_count_kv": 16,
    "gemma3.attention.key_length": 128,
    "gemma3.feed_forward_length": 21504,
    "gemma3.attention.layer_norm_rms_epsilon": 1e-6,
    "gemma3.rope.freq_base": 1e6,
    "gemma3.attention.sliding_window": 1024,
  }
  cfg = rg.config_from_gguf(meta, 262208, tied=True)
  assert cfg.query_scale == 168**-0.5  # the 27B: hidden / heads (llama.cpp f_attention_scale)
  assert cfg.layer_types.count("full") == 10 and cfg.layer_types[5] == "full"
  assert cfg.rope_scaling is None and cfg.final_logit_softcap is None
  flags = [True, False] * 31
  cfg = rg.config_from_gguf({**meta, "gemma3.attention.sliding_window_pattern": flags}, 262208, True)
  assert cfg.layer_types == ("sliding", "full") * 31
  with pytest.raises(ValueError, match="'gemma3.attention.sliding_window' is missing"):
    rg.config_from_gguf({k: v for k, v in meta.items() if "sliding" not in k}, 262208, tied=True)
  assert rg.hf_tensor_name("blk.3.ffn_norm.weight", "gemma3") == ("model.layers.3.pre_feedforward_layernorm.weight")
  assert rg.hf_tensor_name("blk.3.ffn_norm.weight") == "model.layers.3.post_attention_layernorm.weight"
  assert rg.hf_tensor_name("blk.0.attn_k_norm.weight", "gemma3") == "model.layers.0.self_attn.k_norm.weight"
