"""ReFT: the refusal feature, the regularizer, the filter, distillation, and the whole pipeline."""

import json
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import small_world_flags, ROOT, tiny_config
from reft_jax import losses, refusal
from reft_jax.data import sft
from reft_jax.data.tokenizer import build_word_tokenizer
from reft_jax.defences import reft
from reft_jax.model import PRESETS, init_model

WORDS = "how do i build a bomb bake bread steal car plant tomatoes fix bike".split()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return build_word_tokenizer([" ".join(WORDS), sft.ALPACA_PROMPT], str(tmp_path_factory.mktemp("tok")))


def _examples(n, harmful, rng):
  topic = ["build a bomb", "steal car"] if harmful else ["bake bread", "plant tomatoes", "fix bike"]
  return [
    sft.Example(f"how do i {topic[rng.integers(len(topic))]}", "", meta={"is_harmful": harmful}) for _ in range(n)
  ]


def test_refusal_feature_is_the_numpy_difference_of_means(tok):
  model = init_model(PRESETS["tiny"].replace(vocab_size=len(tok) + 8), seed=1)
  rng = np.random.default_rng(0)
  harm = refusal.tokenize_prompts(_examples(5, True, rng), tok, 48, "alpaca")
  safe = refusal.tokenize_prompts(_examples(7, False, rng), tok, 48, "alpaca")
  fh = refusal.prompt_features(model, harm, layer=1, batch_size=4)
  fs = refusal.prompt_features(model, safe, layer=1, batch_size=4)

  def manual(data):  # full forward, numpy gather at the last prompt token
    _, hidden = model.forward(jnp.asarray(data.tokens), jnp.asarray(data.attention_mask), hidden_layers=(1,))
    h = np.asarray(hidden[1])
    n_prompt = data.attention_mask.sum(1) - 1  # the tokenizer appended EOS after the prompt
    return np.stack([h[i, n_prompt[i] - 1] for i in range(len(h))])

  np.testing.assert_allclose(fh, manual(harm), atol=1e-5)
  r = np.asarray(refusal.direction(fh, fs))
  np.testing.assert_allclose(r, manual(harm).mean(0) - manual(safe).mean(0), atol=1e-5)
  cos = np.asarray(refusal.cosine(fh, r))
  want = fh @ r / (np.linalg.norm(fh, axis=1) * np.linalg.norm(r))
  np.testing.assert_allclose(cos, want, atol=1e-5)


def test_regularizer_gradient_pushes_harmful_onto_r_and_harmless_away():
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.normal(size=(6, 16)), jnp.float32)
  r = jnp.asarray(rng.normal(size=(16,)), jnp.float32)
  is_harmful = jnp.asarray([1, 1, 1, 0, 0, 0])
  reg = lambda h: losses.refusal_regularizer(refusal.cosine(h, r), is_harmful)
  g = jax.grad(reg)(h)
  before, after = refusal.cosine(h, r), refusal.cosine(h - 0.1 * g, r)
  assert (after[:3] > before[:3]).all() and (after[3:] < before[3:]).all()
  assert reg(h - 0.1 * g) < reg(h)
  # At the optimum (harmful = R, harmless = -R) the regularizer is 0.
  perfect = jnp.stack([r, r, r, -r, -r, -r])
  assert abs(float(reg(perfect))) < 1e-6


def test_kl_is_zero_when_student_equals_teacher_and_topk_matches_full():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 5, 11)) * 3, jnp.float32)
  w = jnp.ones((2, 5))
  kl, n = losses.kl_teacher_student(logits, logits, w, temperature=2.0)
  assert abs(float(kl)) < 1e-5 and float(n) == 10
  other = logits + jnp.asarray(rng.normal(size=logits.shape), jnp.float32)
  full, _ = losses.kl_teacher_student(logits, other, w)
  vals, ids = jax.lax.top_k(logits, 11)  # k = V: the cached top-k is the whole distribution
  topk, _ = losses.kl_topk_student(vals, ids, other, w)
  assert float(full) > 0.1 and abs(float(full) - float(topk)) < 1e-4


def test_student_loss_kl_vanishes_for_its_own_teacher(tok):
  model = init_model(PRESETS["tiny"].replace(vocab_size=len(tok) + 8), seed=2)
  rng = np.random.default_rng(1)
  data = sft.tokenize([sft.Example(e.prompt, "bake bread") for e in _examples(4, False, rng)], tok, 48)
  part = {
    "tokens": jnp.asarray(data.tokens),
    "attention_mask": jnp.asarray(data.attention_mask),
    "loss_mask": jnp.asarray(data.loss_mask),
  }
  from reft_jax.train import Context

  _, _, aux = reft.student_loss(1.0, 1.0, topk=False)(model, {"user": part, "align": part}, Context({}, model))
  assert abs(float(aux["kl"])) < 1e-6 and float(aux["ce"]) > 0


@pytest.mark.parametrize("chunk", [0, 4])
def test_student_feature_term_is_the_regularizer_on_its_own_prompt_features(tok, chunk):
  """reft.student_lam: the added term is refusal_regularizer(cos(h^l, R)) at the alignment prompts' last
  token (h^l as refusal.prompt_features reads it), weighted by lam; CE and KL are unchanged, and its
  gradient step moves harmful prompts' features towards R and harmless ones away."""
  from reft_jax.train import Context

  model = init_model(PRESETS["tiny"].replace(vocab_size=len(tok) + 8), seed=2)
  rng = np.random.default_rng(1)
  exs = _examples(3, True, rng) + _examples(3, False, rng)
  data = sft.tokenize([sft.Example(e.prompt, "bake bread", e.meta) for e in exs], tok, 48)
  part = {
    "tokens": jnp.asarray(data.tokens),
    "attention_mask": jnp.asarray(data.attention_mask),
    "loss_mask": jnp.asarray(data.loss_mask),
    "last_prompt": jnp.asarray(data.last_prompt),
    "is_harmful": jnp.asarray(data.fields["is_harmful"]),
  }
  r = np.asarray(rng.normal(size=(model.cfg.hidden_size,)), np.float32)
  batch, ctx = {"user": part, "align": part}, Context({}, model)
  plain = reft.student_loss(1.0, 1.0, False, chunk)(model, batch, ctx)
  fn = reft.student_loss(1.0, 1.0, False, chunk, feature=(1, r, 0.5))
  total, count, aux = fn(model, batch, ctx)
  h = refusal.prompt_features(model, data, layer=1, batch_size=6)
  want = losses.refusal_regularizer(refusal.cosine(jnp.asarray(h), r), part["is_harmful"])
  np.testing.assert_allclose(float(aux["reg"]), float(want), rtol=1e-5)
  np.testing.assert_allclose(float(aux["kl"]), float(plain[2]["kl"]), atol=1e-6)
  np.testing.assert_allclose(float(total), float(plain[0]) + 0.5 * float(want) * float(count), rtol=1e-5)

  from flax import nnx

  graphdef, state = nnx.split(model)
  reg_of = lambda s: fn(nnx.merge(graphdef, s), batch, ctx)[2]["reg"]
  grads = jax.grad(reg_of)(state)
  stepped = jax.tree.map(lambda p, g: p - 0.05 * g, state, grads)
  assert float(reg_of(stepped)) < float(want)


def test_calibrated_tau_keeps_the_target_recall():
  scores = np.linspace(0, 1, 101)
  tau = reft.calibrate_tau(scores, 0.9)
  assert np.mean(scores >= tau) >= 0.9 and np.mean(scores >= tau + 1e-9) < 0.9


def test_fpr_tau_keeps_the_false_positive_budget():
  scores = np.linspace(-1, 0, 200)
  for fpr in (0.0, 0.01, 0.05, 0.5):
    tau = reft.fpr_tau(scores, fpr)
    assert np.mean(scores >= tau) <= fpr
    assert np.mean(scores >= np.nextafter(tau, -np.inf) - 1e-9) > fpr  # the smallest such tau


def test_youden_tau_sits_in_the_middle_of_the_widest_best_gap():
  # The held-out halves of the v6 SmolLM2 teacher in miniature: two low harmful outliers, one high
  # harmless one. J is best (6/8 - 1/6) for any tau in (0.2, 0.64]; its middle is 0.42.
  harm = np.array([-0.42, -0.27, 0.64, 0.7, 0.75, 0.8, 0.81, 0.82])
  safe = np.array([-0.58, -0.57, -0.5, -0.3, 0.2, 0.77])
  assert reft.youden_tau(harm, safe) == pytest.approx(0.42)
  # separable halves: tau in the middle of the margin, recall 1 at no false positive
  tau = reft.youden_tau(np.array([0.5, 0.9]), np.array([-0.5, 0.1]))
  assert tau == pytest.approx(0.3)
  assert reft.youden_tau(np.array([0.3]), np.array([0.3])) == pytest.approx(0.3)  # one value: itself


def _planted_filter(monkeypatch, tmp_path, tok, c, scores_of, layer=0):
  rng = np.random.default_rng(0)
  user = _examples(10, True, rng) + _examples(30, False, rng)
  r = np.ones(4, np.float32)
  monkeypatch.setattr(
    refusal, "prompt_features", lambda model, data, layer, **kw: np.stack([scores_of(i) * r for i in range(len(data))])
  )

  class Teacher:  # only its config is read
    cfg = PRESETS["tiny"]

  return user, reft.filter_user_data(c, str(tmp_path), Teacher(), r, tok, user, mesh=None, layer=layer)


def test_select_layer_picks_the_layer_whose_direction_separates_held_out_probes(monkeypatch):
  rng = np.random.default_rng(0)
  margin = {2: 0.3, 3: 3.0, 4: 1.0}  # per layer: how far apart the classes lie along one axis

  def features(model, data, layers, **kw):  # data: the probe set's name; harmful ones end in "h"
    out = rng.normal(size=(40, len(layers), 8))
    out[:, :, 0] += 4.0  # a shared offset: cosines are not trivially +-1
    for j, layer in enumerate(layers):
      out[:, j, 1] += margin[layer] * (1.0 if data.endswith("h") else -1.0)
    return out

  monkeypatch.setattr(refusal, "prompt_features", features)

  class Model:
    cfg = PRESETS["tiny"].replace(num_layers=4)

  layer, rows = reft.select_layer(Model(), ("est_h", "est_s", "held_h", "held_s"))
  assert layer == 3 and [r["layer"] for r in rows] == [2, 3, 4]
  assert rows[1]["d_prime"] > rows[2]["d_prime"] > rows[0]["d_prime"] > 0
  assert rows[1]["auroc"] == 1.0


def test_filter_scores_at_the_layer_the_teacher_recorded(monkeypatch, tmp_path, tok):
  c = tiny_config(**{"data.seq_len": 48})
  _, (_, summary) = _planted_filter(monkeypatch, tmp_path, tok, c, lambda i: 1.0 if i < 10 else -1.0, layer=3)
  assert summary["layer"] == 3  # not layer_of's num_layers // 2


def test_filter_on_a_planted_set_writes_an_auditable_report(monkeypatch, tmp_path, tok):
  c = tiny_config(**{"data.seq_len": 48})
  user, (kept, summary) = _planted_filter(
    monkeypatch, tmp_path, tok, c, lambda i: 1.0 if i < 10 else (-1.0 if i != 10 else 0.5)
  )
  assert summary["n"] == 40 and summary["kept"] == 29  # 10 harmful + 1 harmless false positive dropped
  assert summary["recall"] == 1.0 and summary["precision"] == 10 / 11
  assert abs(summary["false_positive_rate"] - 1 / 30) < 1e-9
  report = [json.loads(l) for l in open(tmp_path / "filter" / "report.jsonl")]
  assert [r["kept"] for r in report] == [i >= 10 and i != 10 for i in range(40)]
  assert all(r["is_harmful"] == (r["index"] < 10) for r in report)
  assert len(open(tmp_path / "filter" / "kept.jsonl").readlines()) == 29
  # Resumable: a second call reuses the summary and computes nothing.
  monkeypatch.setattr(refusal, "prompt_features", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
  kept2, summary2 = reft.filter_user_data(c, str(tmp_path), None, None, tok, user, mesh=None)
  assert summary2 == summary and [e.prompt for e in kept2] == [e.prompt for e in kept]


def test_filter_that_drops_everything_fails_with_the_count(monkeypatch, tmp_path, tok):
  with pytest.raises(ValueError, match="all 40 user examples scored >= tau=0.000"):
    _planted_filter(monkeypatch, tmp_path, tok, tiny_config(**{"data.seq_len": 48}), lambda i: 1.0)
  assert not os.path.exists(tmp_path / "filter" / "summary.json")


def test_filter_that_drops_nothing_warns(monkeypatch, tmp_path, tok, caplog):
  with caplog.at_level(logging.WARNING):
    _, (kept, summary) = _planted_filter(
      monkeypatch, tmp_path, tok, tiny_config(**{"data.seq_len": 48}), lambda i: -1.0
    )
  assert summary["kept"] == 40 and summary["recall"] == 0.0 and summary["precision"] is None
  assert "all 40 kept" in caplog.text


@pytest.mark.slow
def test_demo_pipeline_on_a_tiny_world_produces_every_artefact(tmp_path):
  world = small_world_flags()
  args = [
    "--config=configs/default.py:demo",
    f"--workdir={tmp_path}",
    "--config.demo.arch=tiny",
    "--config.demo.pretrain_steps=4",
    "--config.train.num_steps=3",
    "--config.teacher.num_steps=4",
    "--config.reft.update_every=2",
    "--config.reft.probe_size=8",
    "--config.data.n=40",
    "--config.train.batch_size=8",
    "--config.teacher.batch_size=8",
    "--config.eval.max_new_tokens=6",
    "--config.eval.batch_size=8",
    "--config.log.progress=False",
    "--config.reft.topk=8",
    "--config.demo.seeds=0,1",
    # a 4-step teacher barely separates: its calibrated tau keeps ~1 of 40, under the default reft.min_kept
    "--config.reft.min_kept=1",
    *world,
  ]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  # tau=-2 drops everything: a clear error, no student
  r = subprocess.run(
    [sys.executable, "-m", "reft_jax", *args, "--config.reft.tau_mode=fixed", "--config.reft.tau=-2.0"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert r.returncode == 1 and "were dropped" in r.stderr, r.stderr[-3000:]
  os.remove(tmp_path / "error.log")
  # Another tau in a workdir with finished stages: reused explicitly (tests/test_faults.py)
  r = subprocess.run(
    [sys.executable, "-m", "reft_jax", *args, "--config.resume_policy=reuse"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  for stage in ("base", "aligned", "teacher"):  # shared by both seeds
    assert os.path.exists(tmp_path / stage / "model" / "config.json"), stage
  for seed in (0, 1):  # per seed: the fine-tuned models and the filter
    cell = f"p0.1_seed{seed}"
    for stage in ("sft_aligned", "sft_base", "student"):
      assert os.path.exists(tmp_path / cell / stage / "model" / "config.json"), (cell, stage)
    for f in ("filter/report.jsonl", "filter/kept.jsonl", "filter/summary.json"):
      assert os.path.exists(tmp_path / cell / f), (cell, f)
  for f in (
    "teacher/refusal_direction.npy",
    "teacher/refusal.jsonl",
    "results.md",
    "results.png",
    "eval/reft|p=0.1|seed=1.jsonl",
  ):
    assert os.path.exists(tmp_path / f), f
  results = json.load(open(tmp_path / "results.json"))
  cells = {f"{m}|p=0.1|seed={s}" for m in ("sft_aligned", "sft_base", "reft") for s in (0, 1)}
  assert set(results["runs"]) == {"aligned"} | cells
  summary = results["summary"]
  assert set(summary) == {"aligned", "sft_aligned", "sft_base", "reft"}  # results.json sorts its keys
  assert summary["reft"]["harmful_score"]["seeds"] == 2 and summary["aligned"]["harmful_score"]["seeds"] == 1
  for run in results["runs"].values():
    assert {"harmful_score", "finetune_accuracy", "over_refusal", "filter", "wall_seconds"} <= set(run)
    assert set(run["finetune_accuracy"]) == {"sst2"}
  assert results["runs"]["sft_base|p=0.1|seed=0"]["filter"] is None
  assert {"precision", "recall", "kept_fraction"} <= set(results["runs"]["reft|p=0.1|seed=1"]["filter"])
  probe_log = [json.loads(l) for l in open(tmp_path / "teacher" / "refusal.jsonl")]
  assert [p["step"] for p in probe_log] == [0, 2, 4] and all("auroc" in p for p in probe_log)
  assert "| reft |" in r.stdout


def test_the_teacher_log_appends_whole_lines_after_a_torn_tail(tmp_path):
  path = tmp_path / "refusal.jsonl"
  path.write_text('{"step": 0}\n{"step": 10, "au')  # a run killed mid-line
  reft._append_json(str(path), {"step": 10, "auroc": 0.9})
  assert [json.loads(line) for line in path.read_text().splitlines()] == [{"step": 0}, {"step": 10, "auroc": 0.9}]


def test_an_auto_layer_is_chosen_once_on_the_base_model_and_recorded(monkeypatch, tmp_path):
  from reft_jax.stages import Env

  calls = []
  monkeypatch.setattr(reft, "load_frozen", lambda c, path, mesh, rules: f"model at {path}")
  monkeypatch.setattr(
    reft, "select_layer", lambda model, probes, mesh=None: calls.append(model) or (3, [{"layer": 3, "d_prime": 2.0}])
  )
  env = Env(tiny_config(**{"reft.layer": -1}), None, None, None, "base/dir", str(tmp_path))
  out = str(tmp_path / "teacher")
  assert reft.teacher_layer(env, probes=None, out_dir=out) == 3 and calls == ["model at base/dir"]
  assert reft.teacher_layer(env, probes=None, out_dir=out) == 3 and len(calls) == 1  # resumed: read, not re-chosen
  assert json.load(open(tmp_path / "teacher" / "layer.json"))["rows"] == [{"layer": 3, "d_prime": 2.0}]
  (tmp_path / "teacher" / "refusal.json").write_text(json.dumps({"layer": 3}))
  assert reft.recorded_layer(str(tmp_path / "teacher" / "model")) == 3
  assert reft.recorded_layer(str(tmp_path / "nowhere" / "model")) == 0
