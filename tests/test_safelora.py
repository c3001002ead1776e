"""Safe LoRA against the official IBM/SafeLoRA model.py: the projector, the similarity, the layer selection
(threshold and number) and the projected model W_aligned + C dW."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

from reft_jax.defences import safelora  # registers the section before tiny_config() builds a config
from reft_jax.defences.safelora import SafeLoRAConfig, project, projector, select, similarity

from helpers import mesh_of, tiny_config

RNG = np.random.default_rng(0)


def _hf(v_IO: np.ndarray) -> np.ndarray:
  """Our [in, out] matrix in Hugging Face's [out, in] layout."""
  return v_IO.T


def test_approx_projector_is_the_official_v_vt_over_frobenius_norm():
  v = RNG.standard_normal((5, 7)).astype(np.float32)  # ours [I, O]; HF V [7, 5]
  V = _hf(v)
  c = np.asarray(projector(jnp.asarray(v)))
  np.testing.assert_allclose(c, V @ V.T / np.linalg.norm(V), rtol=1e-5, atol=1e-6)
  # The official operator is not a projection: applying it twice is not applying it once.
  assert not np.allclose(c @ c, c, atol=1e-3)
  # Applied to an update: HF's C @ dW is ours dW @ C.
  d = RNG.standard_normal((5, 7)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(project(jnp.asarray(d), jnp.asarray(c))).T, c @ _hf(d), rtol=1e-5, atol=1e-5)


def test_exact_projector_is_idempotent_and_equals_v_inverse_gram_vt():
  v = RNG.standard_normal((3, 8)).astype(np.float32)  # HF V [8, 3]: full column rank
  V = _hf(v).astype(np.float64)
  c = np.asarray(projector(jnp.asarray(v), exact=True))
  np.testing.assert_allclose(c, V @ np.linalg.inv(V.T @ V) @ V.T, atol=1e-5)
  np.testing.assert_allclose(c @ c, c, atol=1e-5)
  np.testing.assert_allclose(c, c.T, atol=1e-6)


def test_an_update_inside_the_alignment_span_is_kept():
  # Exact projector: any dW = V M is its own projection (similarity 1).
  v = RNG.standard_normal((3, 8)).astype(np.float32)
  d = (_hf(v) @ RNG.standard_normal((3, 3))).T.astype(np.float32)  # HF dW = V M, back to ours
  p = project(jnp.asarray(d), projector(jnp.asarray(v), exact=True))
  np.testing.assert_allclose(np.asarray(p), d, atol=1e-4)
  assert float(similarity(p, jnp.asarray(d))) == pytest.approx(1.0, abs=1e-5)
  # The official approx operator keeps the direction too when V's columns are orthogonal and of equal norm.
  q = np.linalg.qr(RNG.standard_normal((8, 3)))[0].astype(np.float32)  # HF V = 2 Q
  d = (q @ RNG.standard_normal((3, 3))).T.astype(np.float32)
  p = project(jnp.asarray(d), projector(jnp.asarray(2 * q.T)))
  assert float(similarity(p, jnp.asarray(d))) == pytest.approx(1.0, abs=1e-5)


def _stack():
  """base/aligned/fine-tuned q kernels [3 layers, I=4, O=8] whose updates are: layer 0 inside V's span
  (similarity 1), layer 1 orthogonal to it (0), layer 2 half inside half outside (between)."""
  I, O = 4, 8
  # Coordinate axes as the bases: the orthogonal layer's C dW is exactly zero (no rounding noise).
  q = np.eye(O, dtype=np.float32)
  inside, outside = q[:, :3], q[:, 3:]  # HF [out, k]
  base = RNG.standard_normal((3, I, O)).astype(np.float32)
  v = (2 * inside @ np.eye(3, I, dtype=np.float32)).T  # ours [I, O]: V's columns orthogonal, equal norm
  aligned = base + v[None]
  m = lambda basis: (basis @ RNG.standard_normal((basis.shape[1], I))).T.astype(np.float32)
  delta = np.stack([m(inside), m(outside), m(inside) + m(outside)])
  tuned = aligned + 0.1 * delta
  return {"q": jnp.asarray(base)}, {"q": jnp.asarray(aligned)}, {"q": jnp.asarray(tuned)}


def _expected_projected(base, aligned, tuned, layer, exact=False):
  mat = lambda x: np.asarray(x[layer]).reshape(x.shape[1], -1)  # [I, O] (q, v: one input axis)
  v, d = mat(aligned["q"] - base["q"]), mat(tuned["q"] - aligned["q"])
  V, D = _hf(v).astype(np.float64), _hf(d).astype(np.float64)
  C = V @ np.linalg.pinv(V) if exact else V @ V.T / np.linalg.norm(V)
  return (mat(aligned["q"]) + (C @ D).T).reshape(aligned["q"].shape[1:])


def test_threshold_selection_projects_only_layers_at_or_below_it_and_leaves_the_others_untouched():
  base, aligned, tuned = _stack()
  out, report = safelora.safelora(base, aligned, tuned, SafeLoRAConfig("threshold", threshold=0.5))
  sims = report["similarity"]
  names = list(sims)
  assert sims[names[0]] == pytest.approx(1.0, abs=1e-4) and sims[names[1]] == pytest.approx(0.0, abs=1e-4)
  assert 0.05 < sims[names[2]] < 0.95
  assert names[0] == "0.self_attn.q_proj"
  want = [n for n in names if sims[n] <= 0.5]
  assert report["projected"] == want and names[1] in want and names[0] not in want
  for layer, name in enumerate(names):
    if name in want:
      np.testing.assert_allclose(
        np.asarray(out["q"][layer]), _expected_projected(base, aligned, tuned, layer), atol=1e-5
      )
    else:  # untouched: the fine-tuned weights, bit for bit
      np.testing.assert_array_equal(np.asarray(out["q"][layer]), np.asarray(tuned["q"][layer]))
  # <=: a similarity equal to the threshold is projected; just below it is not.
  s2 = sims[names[2]]
  assert names[2] in select(sims, SafeLoRAConfig("threshold", threshold=s2))[1]
  assert names[2] not in select(sims, SafeLoRAConfig("threshold", threshold=s2 - 1e-5))[1]
  # The orthogonal layer is projected to nothing: its weights are the aligned ones.
  np.testing.assert_allclose(np.asarray(out["q"][1]), np.asarray(aligned["q"][1]), atol=1e-5)


def test_number_selection_projects_the_n_least_similar_layers_ties_included():
  sims = {"a": 0.3, "b": 0.1, "c": 0.9, "d": 0.3, "e": float("nan")}
  cfg = lambda n: SafeLoRAConfig("number", num_proj_layers=n)
  assert select(sims, cfg(1)) == (0.1, ["b"])
  assert select(sims, cfg(2)) == (0.3, ["a", "b", "d"])  # numpy.sort(cos)[:2][-1] = 0.3, and <= takes both
  assert select(sims, cfg(10)) == (0.9, ["a", "b", "c", "d"])  # more than there are: all (never the NaN one)
  base, aligned, tuned = _stack()
  out, report = safelora.safelora(base, aligned, tuned, cfg(2))
  assert report["n_projected"] == 2 and report["projected"] == ["1.self_attn.q_proj", "2.self_attn.q_proj"]
  np.testing.assert_array_equal(np.asarray(out["q"][0]), np.asarray(tuned["q"][0]))


def test_exact_projection_keeps_the_in_span_layer_and_removes_the_orthogonal_one():
  base, aligned, tuned = _stack()
  out, report = safelora.safelora(base, aligned, tuned, SafeLoRAConfig("number", num_proj_layers=3, projection="exact"))
  assert report["n_projected"] == 3
  for layer in range(3):
    np.testing.assert_allclose(
      np.asarray(out["q"][layer]), _expected_projected(base, aligned, tuned, layer, exact=True), atol=1e-5
    )
  np.testing.assert_allclose(np.asarray(out["q"][0]), np.asarray(tuned["q"][0]), atol=1e-5)  # in the span: kept
  np.testing.assert_allclose(np.asarray(out["q"][1]), np.asarray(aligned["q"][1]), atol=1e-5)  # orthogonal: removed


def test_a_module_without_alignment_direction_is_never_projected():
  base, _, tuned = _stack()
  out, report = safelora.safelora(base, base, tuned, SafeLoRAConfig("number", num_proj_layers=3))
  assert report["n_projected"] == 0 and all(s is None for s in report["similarity"].values())
  np.testing.assert_array_equal(np.asarray(out["q"]), np.asarray(tuned["q"]))


def _flat(model) -> dict:
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model))).items()}


def test_posthoc_writes_aligned_plus_projected_update_for_the_lora_targets_and_reuses_it(tmp_path):
  from reft_jax import sharding as shd
  from reft_jax.model import PRESETS, abstract_model, load_hf, save_hf
  from reft_jax.stages import Env

  # Weights drawn with numpy: JAX's random init compiles for many seconds on a busy CPU.
  graphdef, state = nnx.split(abstract_model(PRESETS["tiny"].replace(num_layers=3)))
  rng = np.random.default_rng(1)
  flat = {
    k: 0.02 * rng.standard_normal(v.shape).astype(np.float32)
    for k, v in traverse_util.flatten_dict(nnx.to_pure_dict(state)).items()
  }
  shift = lambda s: {p: v + s * rng.standard_normal(v.shape).astype(np.float32) for p, v in flat.items()}
  aligned_flat = shift(0.05)
  tuned_flat = {p: v + 0.01 * rng.standard_normal(v.shape).astype(np.float32) for p, v in aligned_flat.items()}
  dirs = {}
  for name, f in (("base", flat), ("aligned", aligned_flat), ("tuned", tuned_flat)):
    dirs[name] = save_hf(nnx.merge(graphdef, traverse_util.unflatten_dict(f)), str(tmp_path / name))
  c = tiny_config(**{"train.lora_targets": "q,v", "safelora.num_proj_layers": 4})
  env = Env(c, mesh_of(), shd.parse_rules(""), None, dirs["base"], str(tmp_path / "shared"))
  path, record = safelora.SAFELORA.posthoc(env, str(tmp_path / "cell"), dirs["aligned"], dirs["tuned"], [])
  rep = record["safelora"]
  assert path == str(tmp_path / "cell" / "safelora" / "model") and rep["n_layers"] == 6 and rep["n_projected"] == 4
  assert rep["targets"] == ["q", "v"] and sorted(rep["similarity"].values())[3] == rep["threshold"]
  got, tuned = _flat(load_hf(path)), _flat(load_hf(dirs["tuned"]))
  loaded = {n: _flat(load_hf(dirs[n])) for n in ("base", "aligned")}
  changed = sorted(k for k in got if not np.array_equal(got[k], tuned[k]))
  assert changed == ["blocks/attn/q/kernel", "blocks/attn/v/kernel"]  # the LoRA targets only
  for t in ("q", "v"):
    key = f"blocks/attn/{t}/kernel"
    for layer in range(3):
      name = f"{layer}.self_attn.{t}_proj"
      if name in rep["projected"]:
        b, a = {"q": jnp.asarray(loaded["base"][key])}, {"q": jnp.asarray(loaded["aligned"][key])}
        want = _expected_projected(b, a, {"q": jnp.asarray(tuned[key])}, layer)
        np.testing.assert_allclose(got[key][layer], want, atol=1e-5)
      else:
        np.testing.assert_array_equal(got[key][layer], tuned[key][layer])
  # A rerun reuses the exported model and returns the same record.
  again = safelora.SAFELORA.posthoc(env, str(tmp_path / "cell"), dirs["aligned"], dirs["tuned"], [])
  assert again == (path, json.loads(json.dumps(record)))
