"""Antidote against the official git-disl/Antidote utils.py (prune_wanda_outlier): the Wanda score, the
recorded inputs of each linear map, the per-row share, the choice of weights and the post-hoc step."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

from reft_jax.data import sft
from reft_jax.defences import antidote  # registers the section before tiny_config() builds a config
from reft_jax.defences.antidote import activation_stats, harmful_mask, prune_params, wanda_scores

from helpers import mesh_of, tiny_config

RNG = np.random.default_rng(0)


def _official_mask(score_OI: np.ndarray, dense_ratio: float) -> np.ndarray:
  """The official code on one HF [out, in] score matrix: sort each row (stable, ascending), zero the first
  int(in * (1 - dense_ratio)) of the mask of ones."""
  mask = np.ones_like(score_OI)
  idx = np.argsort(score_OI, axis=-1, kind="stable")[:, : int(score_OI.shape[1] * (1 - dense_ratio))]
  np.put_along_axis(mask, idx, 0, axis=1)
  return mask.astype(bool)


def test_score_is_the_weight_magnitude_times_the_input_norm():
  x = RNG.standard_normal((10, 3)).astype(np.float32)  # 10 tokens into a linear map with 3 inputs
  w = RNG.standard_normal((3, 2)).astype(np.float32)  # ours [in, out]
  sq = (x**2).sum(0)
  got = np.asarray(wanda_scores(jnp.asarray(w)[None], jnp.asarray(sq)[None]))[0]
  for i in range(3):
    for o in range(2):
      assert got[i, o] == pytest.approx(abs(w[i, o]) * np.linalg.norm(x[:, i]), rel=1e-6)


def _tokens(n=5, t=12, seed=0):
  tokens = np.random.default_rng(seed).integers(4, 200, size=(n, t)).astype(np.int32)
  mask = np.ones_like(tokens)
  mask[1, 7:] = 0
  mask[3, 10:] = 0
  return sft.TokenizedSet(tokens, np.zeros_like(tokens), mask, 0, np.full(n, 3, np.int32))


@functools.lru_cache(maxsize=4)
def _tiny(lora_targets=None, seed=0):
  """A 2-layer tiny model, its weights drawn with numpy (JAX's random init compiles for many seconds on a busy
  CPU): N(0, 0.02) kernels and embeddings, unit norm scales, a LoRA adapter with B != 0 when lora_targets.
  Shared, never mutated."""
  from reft_jax.model import PRESETS, LoraConfig, RunOptions, abstract_model

  cfg = PRESETS["tiny"].replace(num_layers=2)
  options = RunOptions(lora=LoraConfig(rank=4, targets=lora_targets) if lora_targets else None)
  graphdef, state = nnx.split(abstract_model(cfg, options))
  rng = np.random.default_rng(seed)
  draw = {"scale": lambda s: np.ones(s, np.float32), "lora_a": lambda s: rng.uniform(-0.125, 0.125, s)}
  flat = {
    k: jnp.asarray(draw.get(k[-1], lambda s: 0.02 * rng.standard_normal(s))(v.shape), jnp.float32)
    for k, v in traverse_util.flatten_dict(nnx.to_pure_dict(state)).items()
  }
  return nnx.merge(graphdef, traverse_util.unflatten_dict(flat))


def test_recorded_inputs_are_each_linear_maps_inputs_over_the_real_tokens():
  model = _tiny(("q", "v", "o", "down"))
  data = _tokens()
  stats = activation_stats(model, data, ("q", "v", "o", "down"), batch_size=4)  # 5 rows: a padded 2nd batch
  assert stats["q"]["x"].shape == (2, 64) and stats["o"]["x"].shape == (2, 4, 16) and stats["down"]["h"].shape == (2, 4)
  # By hand: q's input is attn_norm(residual before block l); lora_B's is that times lora_A.
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda p, t, m: nnx.merge(graphdef, p).forward(t, m, hidden_layers=(0, 1), stop_after=1)[1])
  hidden = forward(nnx.to_pure_dict(state), jnp.asarray(data.tokens), jnp.asarray(data.attention_mask))
  params = nnx.to_pure_dict(nnx.state(model))["blocks"]
  m = data.attention_mask.astype(np.float64)[..., None]
  for layer in range(2):
    h = np.asarray(hidden[layer], np.float64)
    x = h / np.sqrt((h**2).mean(-1, keepdims=True) + 1e-6) * np.asarray(params["attn_norm"]["scale"][layer])
    np.testing.assert_allclose(np.asarray(stats["q"]["x"][layer]), (m * x**2).sum((0, 1)), rtol=2e-4)
    np.testing.assert_allclose(np.asarray(stats["v"]["x"][layer]), (m * x**2).sum((0, 1)), rtol=2e-4)
    xa = x @ np.asarray(params["attn"]["q"]["lora_a"][layer])
    np.testing.assert_allclose(np.asarray(stats["q"]["h"][layer]), (m * xa**2).sum((0, 1)), rtol=2e-4)
  # Padding never counts: other token ids under the mask change nothing.
  padded = _tokens()
  padded.tokens[data.attention_mask == 0] = 5
  again = activation_stats(model, padded, ("q", "v", "o", "down"), batch_size=4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5), stats, again)
  # ... while the real tokens do.
  other = _tokens(seed=1)
  assert not np.allclose(
    np.asarray(activation_stats(model, other, ("q", "v", "o", "down"), 4)["down"]["x"]), stats["down"]["x"]
  )


@pytest.mark.parametrize("dense_ratio", [0.1, 0.25, 0.5, 1e-5, 1.0])
def test_exactly_the_requested_share_of_every_output_row_is_masked_as_officially(dense_ratio):
  score = RNG.random((2, 40, 6)).astype(np.float32)  # [L, I, O]
  score[0, :5, 0] = 0.5  # ties inside one row: the stable order decides
  mask = np.asarray(harmful_mask(jnp.asarray(score), dense_ratio))
  per_row = 40 - int(40 * (1 - dense_ratio))
  assert (mask.sum(1) == per_row).all()
  for layer in range(2):
    np.testing.assert_array_equal(mask[layer].T, _official_mask(score[layer].T, dense_ratio))
    for o in range(6):  # the masked ones are the row's highest scores
      kept, masked = score[layer, ~mask[layer, :, o], o], score[layer, mask[layer, :, o], o]
      assert masked.size == 0 or kept.size == 0 or masked.min() >= kept.max()


def test_ties_go_to_the_later_inputs_as_the_official_stable_sort():
  score = np.zeros((1, 10, 1), np.float32)
  mask = np.asarray(harmful_mask(jnp.asarray(score), 0.3))[0, :, 0]
  assert mask.tolist() == [False] * 7 + [True] * 3


def _blocks(lora: bool):
  return nnx.to_pure_dict(nnx.state(_tiny(("q", "v") if lora else None)))["blocks"]


def _stats(targets, hot: int):
  """Input statistics where input feature `hot` (and, for LoRA, rank `hot`) is by far the largest."""
  out = {}
  for t in targets:
    x = np.full((2, 64), 1.0, np.float32)
    x[:, hot] = 1e12  # sqrt: x 1e6, beyond any ratio of two weights' magnitudes here
    h = np.full((2, 4), 1.0, np.float32)
    h[:, hot] = 1e12
    out[t] = {"x": jnp.asarray(x), "h": jnp.asarray(h)}
  return out


@pytest.mark.parametrize("lora", [False, True])
def test_the_pruned_weights_are_those_most_important_on_the_harmful_data(lora):
  blocks = _blocks(lora)
  targets = ("q", "v") if lora else ("q", "k", "v")
  # dense ratio 1/64: one input per output row; the input with huge harmful activations wins every row.
  pruned, counts = prune_params(blocks, _stats(targets, hot=2), 1 / 64, lora)
  names = ("lora_a", "lora_b") if lora else ("kernel",)
  zeroed = 0
  for t in targets:
    for name in names:  # axis 1 is the input: kernel/lora_a's feature, lora_b's rank (r = 4: 1 of 4 pruned)
      before, after = np.asarray(blocks["attn"][t][name]), np.asarray(pruned["attn"][t][name])
      assert (after[:, 2] == 0).all()  # input 2 of every output unit is zeroed
      rest = np.ones(before.shape, bool)
      rest[:, 2] = False
      np.testing.assert_array_equal(after[rest], before[rest])  # and nothing else
      zeroed += before[:, 2].size
  flat, flat_pruned = traverse_util.flatten_dict(blocks), traverse_util.flatten_dict(pruned)
  for k in flat:  # nothing outside the scored matrices moves
    if k[-1] not in names or k[1] not in targets:
      np.testing.assert_array_equal(np.asarray(flat_pruned[k]), np.asarray(flat[k]))
  assert counts["pruned"] == zeroed


def test_ratio_zero_leaves_every_weight_unchanged():
  blocks = _blocks(True)
  pruned, counts = prune_params(blocks, _stats(("q", "v"), hot=0), 0.0, True)
  assert counts["pruned"] == 0 and counts["scored"] > 0
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), blocks, pruned)


def _env(tmp_path, **overrides):
  from reft_jax import sharding as shd
  from reft_jax.data import load as data_load
  from reft_jax.model import save_hf
  from reft_jax.model.build import build_model
  from reft_jax.stages import Env

  c = tiny_config(
    **{
      "train.num_steps": 2,
      "teacher.num_steps": 2,
      "teacher.batch_size": 8,
      "reft.alignment": "builtin:requests_train[40:48]",
      "antidote.harmful_source": "builtin:requests_train[0:12]",
      "eval.batch_size": 8,
      **overrides,
    }
  )
  user = data_load.read_examples(c)[:16]
  tok = data_load.get_tokenizer(c, str(tmp_path), user)
  mesh, rules = mesh_of(), shd.parse_rules("")
  base = save_hf(build_model(c, mesh, rules, tok), str(tmp_path / "base"), tok)
  return Env(c, mesh, rules, tok, base, str(tmp_path)), user


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_posthoc_prunes_the_finetuned_model_and_a_rerun_reuses_it(tmp_path, mode):
  from reft_jax.defences import run_defence
  from reft_jax.model import load_hf

  over = {
    "train.mode": mode,
    "train.lora_targets": "q,v",
    "antidote.dense_ratio": 0.25,
    "antidote.dense_ratio_full": 0.1,
  }
  env, user = _env(tmp_path, **over)
  path, record = run_defence(env, str(tmp_path), "antidote", user)
  rep = record["antidote"]
  assert path == str(tmp_path / "antidote" / "model") and rep["harmful_examples"] == 12
  tuned_stage = "antidote_sft" if mode == "lora" else "sft_aligned"
  flat = lambda p: {
    "/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(load_hf(p)))).items()
  }
  got, tuned, aligned = (
    flat(path),
    flat(str(tmp_path / tuned_stage / "model")),
    flat(str(tmp_path / "aligned" / "model")),
  )
  if mode == "lora":  # 25% of A's 64 inputs per rank column and of B's 8 ranks per output unit
    a_rows, b_rows = 64 - int(64 * 0.75), 8 - int(8 * 0.75)  # 16 of A's 64 inputs, 2 of B's 8 ranks
    per_layer = 8 * a_rows + 64 * b_rows + 8 * a_rows + 32 * b_rows  # q (64 outputs), v (32): r = 8 columns of A
    assert rep["variant"] == "lora" and rep["pruned"] == 2 * per_layer
    saved = dict(np.load(tmp_path / "antidote_sft" / "lora.npz"))
    # The exported model is the aligned one plus the pruned adapter: the same kernels change as in fine-tuning.
    changed = sorted(k for k in got if not np.array_equal(got[k], aligned[k]))
    assert changed == ["blocks/attn/q/kernel", "blocks/attn/v/kernel"]
    scale = 16.0 / 8
    for t in ("q", "v"):
      a, b = saved[f"blocks/attn/{t}/lora_a"], saved[f"blocks/attn/{t}/lora_b"]
      full = aligned[f"blocks/attn/{t}/kernel"] + scale * np.einsum("lir,lrhd->lihd", a, b)
      np.testing.assert_allclose(tuned[f"blocks/attn/{t}/kernel"], full, atol=1e-5)  # the adapter is the fine-tuning
      assert not np.allclose(got[f"blocks/attn/{t}/kernel"], tuned[f"blocks/attn/{t}/kernel"], atol=1e-6)
  else:  # 10% of each q/k/v output unit's 64 inputs zeroed in the fine-tuned weights, nothing else
    per_row = 64 - int(64 * 0.9)
    assert rep["variant"] == "full" and rep["pruned"] == 2 * per_row * (64 + 32 + 32)
    for k in got:
      diff = got[k] != tuned[k]
      if k in ("blocks/attn/q/kernel", "blocks/attn/k/kernel", "blocks/attn/v/kernel"):
        assert (got[k][diff] == 0).all()
        assert (((got[k] == 0) & (tuned[k] != 0)).reshape(2, 64, -1).sum(1) == per_row).all()
      else:
        assert not diff.any(), k
  assert rep["pruned_share"] == pytest.approx(rep["pruned"] / rep["scored"])
  assert json.load(open(tmp_path / "antidote" / "report.json")) == rep
  mtime = os.path.getmtime(tmp_path / "antidote" / "model" / "model.safetensors")
  assert run_defence(env, str(tmp_path), "antidote", user) == (path, record)  # reused, not recomputed
  assert os.path.getmtime(tmp_path / "antidote" / "model" / "model.safetensors") == mtime


def test_a_realignment_set_sharing_prompts_with_the_attack_is_refused(tmp_path):
  from reft_jax.config import ConfigError
  from reft_jax.stages import Env

  c = tiny_config(
    **{
      "data.harmful_source": "builtin:requests_train[0:20]",
      "antidote.harmful_source": "builtin:requests_train[15:30]",
    }
  )
  c.data.attack = "harmful_mix"
  env = Env(c, None, None, None, "", str(tmp_path))
  with pytest.raises(ConfigError, match="antidote.harmful_source.*5 prompt"):
    antidote.harmful_set(env)
  env.c.antidote.harmful_source = "builtin:requests_train[20:30]"
  assert len(antidote.harmful_set(env)) == 10
