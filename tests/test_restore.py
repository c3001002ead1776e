"""Post-hoc restoration against the official algorithm (kangyangWHU/LLMAlignment sgdg_rollback_final.py):
the per-step share and score, gradient accumulation, warm-up, rollback, restart and checkpoint choice."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from reft_jax import refusal
from reft_jax.data import sft
from reft_jax.defences.restore import RestoreConfig, restore_safety

K = 2  # floor(2/3 * 3) edited blocks


def _prompts(seed: int, n: int = 8, t: int = 12) -> sft.TokenizedSet:
  tokens = np.random.default_rng(seed).integers(4, 256, size=(n, t)).astype(np.int32)
  last = np.full((n,), t - 1, np.int32)
  return sft.TokenizedSet(tokens, np.zeros_like(tokens), np.ones_like(tokens), 0, last)


@functools.lru_cache(maxsize=1)
def _setup():
  """(aligned, fine-tuned = aligned + noise, harmful prompts, benign prompts); shared, never mutated."""
  from reft_jax.model import PRESETS, init_model

  aligned = init_model(PRESETS["tiny"].replace(num_layers=3), seed=0)
  graphdef, state = nnx.split(aligned)
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
  rng = np.random.default_rng(1)
  noisy = {p: v + 0.05 * rng.standard_normal(v.shape, np.float32) for p, v in flat.items()}
  finetuned = nnx.merge(graphdef, traverse_util.unflatten_dict(noisy))
  return aligned, finetuned, _prompts(0), _prompts(1)


def _flat(model) -> dict:
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model))).items()}


def _n_changed(model, finetuned) -> int:
  f = _flat(finetuned)
  return int(sum(np.sum(v != f[p]) for p, v in _flat(model).items()))


@functools.lru_cache(maxsize=2)
def _grad_fn(graphdef):
  def loss(p, tokens, mask, last, target):
    h = refusal.last_prompt_features(nnx.merge(graphdef, p), tokens, mask, last, K)
    return -refusal.cosine(h.mean(0)[None], target)[0]

  return jax.jit(jax.grad(loss))


def _grad(model, data, target) -> dict:
  """Gradient of -cos(mean h^K(prompts), target) w.r.t. every parameter (one batch: batch_size >= 8)."""
  graphdef, state = nnx.split(model)
  g = _grad_fn(graphdef)(
    nnx.to_pure_dict(state),
    jnp.asarray(data.tokens),
    jnp.asarray(data.attention_mask),
    jnp.asarray(data.last_prompt),
    target,
  )
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(g).items()}


def _direction(model, data) -> jnp.ndarray:
  return jnp.asarray(refusal.prompt_features(model, data, K).mean(0))


def _top_descent(
  theta: dict, target: dict, grad: dict, allowed, count: int | None = None, frac: float | None = None
) -> dict:
  """The expected pick, written out: entries of `allowed` (path -> mask) where theta - target and grad
  share a strict sign, and among them |grad| strictly above the count-th (or ceil(frac x n)-th) largest."""
  cand = {p: m & (np.sign(theta[p] - target[p]) * np.sign(grad[p]) > 0) for p, m in allowed.items()}
  scores = np.concatenate([np.abs(grad[p][m]) for p, m in cand.items()])
  k = count if frac is None else math.ceil(frac * len(scores))
  thr = np.sort(scores)[::-1][min(k, len(scores)) - 1]
  return {p: m & (np.abs(grad[p]) > thr) for p, m in cand.items()}


def _edited(flat: dict) -> dict:
  """Non-norm block weights of the first K blocks."""
  out = {}
  for p, v in flat.items():
    m = np.zeros(v.shape, bool)
    if p.startswith("blocks/") and "norm" not in p:
      m[:K] = True
    out[p] = m
  return out


def _apply(theta: dict, source: dict, mask: dict) -> dict:
  return {p: np.where(mask[p], source[p], v) if p in mask else v for p, v in theta.items()}


def _model_like(model, flat: dict):
  graphdef, _ = nnx.split(model)
  return nnx.merge(
    graphdef, traverse_util.unflatten_dict({tuple(p.split("/")): jnp.asarray(v) for p, v in flat.items()})
  )


def _per_step(flat: dict, rate: float) -> int:
  """ceil(rate x every decoder-block parameter, norms and all layers included): official get_total_param."""
  return math.ceil(rate * sum(v.size for p, v in flat.items() if p.startswith("blocks/")))


def test_each_step_restores_the_rate_share_of_all_block_params_by_the_accumulated_harmful_gradient():
  aligned, finetuned, harmful, _ = _setup()
  a, f = _flat(aligned), _flat(finetuned)
  d_h = _direction(aligned, harmful)
  count = _per_step(a, 0.002)  # 222 here; the old code restored 0.002 x the first K blocks' weights (148)
  model, report = restore_safety(aligned, finetuned, harmful, RestoreConfig(steps=2, warmup_steps=2))
  # Step 1: from theta_F, the harmful gradient's top descent-direction weights are set to theta_A.
  g0 = _grad(finetuned, harmful, d_h)
  pick0 = _top_descent(f, a, g0, _edited(a), count)
  theta1 = _apply(f, a, pick0)
  # Step 2: the score is the gradient accumulated over both steps (the official `.grad` is never zeroed).
  g1 = _grad(_model_like(finetuned, theta1), harmful, d_h)
  acc = {p: g0[p] + g1[p] for p in g0}
  pick1 = _top_descent(theta1, a, acc, _edited(a), count)
  expected = _apply(theta1, a, pick1)
  out = _flat(model)
  for p in f:
    np.testing.assert_array_equal(out[p], expected[p], err_msg=p)
  assert [h["restored"] for h in report["history"]] == [count - 1, count - 1]  # strictly above the count-th
  assert report["per_step"] == count and report["restored_weights"] == 2 * (count - 1)
  assert [h["phase"] for h in report["history"]] == ["warmup", "warmup"] and report["rolled_back"] == 0
  # Only the non-norm weights of the first K blocks ever move.
  for p in f:
    if not p.startswith("blocks/") or "norm" in p:
      np.testing.assert_array_equal(out[p], f[p], err_msg=p)
    else:
      np.testing.assert_array_equal(out[p][K:], f[p][K:], err_msg=p)


def test_warmup_restores_without_rollback_and_the_metric_is_first_read_after_it():
  aligned, finetuned, harmful, benign = _setup()
  seen = []

  def metric(model):
    seen.append(_n_changed(model, finetuned))
    return 100.0

  cfg = RestoreConfig(steps=4, warmup_steps=2, eval_every=2)
  _, report = restore_safety(aligned, finetuned, harmful, cfg, metric, benign)
  per = report["per_step"] - 1
  # The fine-tuned model, the model after the 2 warm-up steps, then the checkpoint at step 4.
  assert seen == [0, 2 * per, 4 * per]
  assert [h["phase"] for h in report["history"]] == ["warmup", "warmup", "restore", "restore"]
  assert not report["restarted"] and report["rolled_back"] == 0
  assert [c["step"] for c in report["checkpoints"]] == [2, 4] and report["checkpoint"] == 4


def test_rollback_returns_the_share_of_each_steps_restored_weights_chosen_by_the_benign_gradient():
  aligned, finetuned, harmful, benign = _setup()
  a, f = _flat(aligned), _flat(finetuned)
  count = _per_step(a, 0.002)
  # After warm-up the task metric is down (so the run restarts); once weights are rolled back it is fine.
  metric = lambda m: 90.0 if _n_changed(m, finetuned) >= count - 1 else 100.0
  cfg = RestoreConfig(steps=1, warmup_steps=1, eval_every=1)
  model, report = restore_safety(aligned, finetuned, harmful, cfg, metric, benign)
  assert report["restarted"] and [h["phase"] for h in report["history"]] == ["warmup", "rollback"]
  # Written out: restart at theta_F, restore by the harmful gradient, then roll back ceil(0.2 x n)
  # (strictly above: minus one) of the restored weights where returning to theta_F lowers the benign loss.
  pick = _top_descent(f, a, _grad(finetuned, harmful, _direction(aligned, harmful)), _edited(a), count)
  restored = _apply(f, a, pick)
  gb = _grad(_model_like(finetuned, restored), benign, _direction(finetuned, benign))
  back = _top_descent(restored, f, gb, pick, frac=0.2)
  n_back = int(sum(m.sum() for m in back.values()))
  assert n_back > 0 and report["rolled_back"] == n_back == report["history"][1]["rolled_back"]
  out, expected = _flat(model), _apply(restored, f, back)
  for p in f:
    np.testing.assert_array_equal(out[p], expected[p], err_msg=p)
  assert report["checkpoint"] == 1 and report["task_after"] == 100.0 and report["task_warmup"] == 90.0


def _scripted(*scores):
  it = iter(scores)
  return lambda model: next(it)


def test_restart_from_the_finetuned_weights_only_below_min_task_ratio_of_the_original():
  aligned, finetuned, harmful, benign = _setup()
  cfg = RestoreConfig(steps=3, warmup_steps=2, eval_every=1, min_task_ratio=0.95)
  # 94.9 < 0.95 x 100: restart, then all 3 steps with rollback (steps counted from 0 again).
  _, report = restore_safety(aligned, finetuned, harmful, cfg, _scripted(100.0, 94.9, 100, 100, 100), benign)
  assert report["restarted"]
  assert [(h["step"], h["phase"]) for h in report["history"]] == [
    (0, "warmup"),
    (1, "warmup"),
    (0, "rollback"),
    (1, "rollback"),
    (2, "rollback"),
  ]
  assert all(h["rolled_back"] > 0 for h in report["history"][2:])
  # The restarted run's first step starts from theta_F with a fresh gradient: the warm-up's first pick.
  assert report["history"][2]["restored"] == report["history"][0]["restored"]
  assert report["restored_weights"] < 3 * report["history"][0]["restored"]
  # 95.5 >= 95: no restart, the run goes on from the warm-up weights to step 3 without rollback.
  _, report = restore_safety(aligned, finetuned, harmful, cfg, _scripted(100.0, 95.5, 100), benign)
  assert not report["restarted"] and report["rolled_back"] == 0
  assert [h["phase"] for h in report["history"]] == ["warmup", "warmup", "restore"]
  assert report["restored_weights"] == 3 * report["history"][0]["restored"]


def test_result_is_the_checkpoint_before_the_first_one_at_or_below_the_minimum():
  aligned, finetuned, harmful, benign = _setup()
  cfg = RestoreConfig(steps=3, warmup_steps=1, eval_every=1)
  model, report = restore_safety(aligned, finetuned, harmful, cfg, _scripted(100.0, 96, 96, 95), benign)
  assert report["checkpoint"] == 2 and report["task_after"] == 96
  two, _ = restore_safety(aligned, finetuned, harmful, RestoreConfig(steps=2, warmup_steps=1))
  a, b = _flat(model), _flat(two)
  for p in a:
    np.testing.assert_array_equal(a[p], b[p], err_msg=p)


def test_restoration_moves_the_harmful_features_back_toward_the_aligned_direction():
  aligned, finetuned, harmful, benign = _setup()
  d_h = _direction(aligned, harmful)
  cos = lambda m: float(refusal.cosine(_direction(m, harmful)[None], d_h)[0])
  for scores in ((100.0,) * 8, (100.0, 90.0) + (100.0,) * 6):  # without and with the restart
    model, report = restore_safety(aligned, finetuned, harmful, RestoreConfig(), _scripted(*scores), benign)
    assert report["restarted"] == (scores[1] == 90.0) and report["checkpoint"] == 20
    assert cos(model) > cos(finetuned) + 0.01
    h = report["history"]
    assert h[-1]["neg_cos"] < h[0]["neg_cos"]


def test_a_task_metric_of_zero_sets_no_minimum():
  # Documented choice: the official `<=` pick would return theta_F whenever the original metric is 0.
  aligned, finetuned, harmful, benign = _setup()
  cfg = RestoreConfig(steps=2, warmup_steps=1, eval_every=1)
  model, report = restore_safety(aligned, finetuned, harmful, cfg, _scripted(0.0, 0.0, 0.0), benign)
  assert not report["restarted"] and report["checkpoint"] == 2 and _n_changed(model, finetuned) > 0
