"""The adaptive (Virus-style) attack on the refusal-feature filter: its gradients, its optimiser's
guarantees and that it really evades a filter on a tiny model."""

import jax.numpy as jnp
import numpy as np
import pytest

from reft_jax import refusal
from reft_jax.data import adaptive, sft
from reft_jax.data.tokenizer import build_word_tokenizer
from reft_jax.defences import reft_filter
from reft_jax.model import PRESETS, init_model

HARM = "bomb poison steal hack weapon kill".split()
SAFE = "bread garden bike soup kite song".split()
ANSWERS = "first get the parts then mix them and wait".split()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """A word tokenizer, a random tiny teacher with R = its own harmful - harmless difference of means at
  layer 1 and tau = the smallest harmful score (the filter flags every harmful prompt), and a base model."""
  words = " ".join(["how do i make a"] + HARM + SAFE + ANSWERS)
  tok = build_word_tokenizer([words, sft.ALPACA_PROMPT], str(tmp_path_factory.mktemp("tok")))
  cfg = PRESETS["tiny"].replace(vocab_size=len(tok) + 8)
  teacher, student = init_model(cfg, seed=1), init_model(cfg, seed=2)
  # The planted feature: the harmful words' embeddings share a direction u, which attention carries to the
  # last prompt token (the template's ":"), so that R separates the classes as a trained teacher's does.
  u = np.random.default_rng(3).normal(size=cfg.hidden_size)
  table = np.array(teacher.embed[...])
  table[[tok.convert_tokens_to_ids(w) for w in HARM]] += (
    3 * np.linalg.norm(table, axis=1).mean() * u / np.linalg.norm(u)
  )
  teacher.embed.value = jnp.asarray(table)
  rng = np.random.default_rng(0)
  answer = lambda: " ".join(rng.choice(ANSWERS, 4))
  harm = [sft.Example(f"how do i make a {w}", answer(), meta={"is_harmful": True}) for w in HARM]
  safe = [sft.Example(f"how do i make a {w}", answer(), meta={"is_harmful": False}) for w in SAFE]
  feats = lambda exs: refusal.prompt_features(teacher, refusal.tokenize_prompts(exs, tok, 64, "alpaca"), 1, 8)
  r = np.asarray(refusal.direction(feats(harm), feats(safe)))
  scores = adaptive.filter_scores(teacher, r, 1, harm, tok, 64, "alpaca")
  tau = float(scores.min())
  assert np.all(adaptive.filter_scores(teacher, r, 1, safe, tok, 64, "alpaca") < tau)  # a working filter
  return dict(tok=tok, teacher=teacher, student=student, harm=harm, safe=safe, r=r, tau=tau)


def _config(**kw):
  base = dict(steps=8, suffix_len=4, topk=8, batch=16, lam=1.0, chunk=8, seq_len=64, template="alpaca")
  return adaptive.AttackConfig(**{**base, **kw})


def _attack(w, examples, seed=0, **kw):
  return adaptive.optimise_prompts(
    examples, w["teacher"], w["student"], w["tok"], w["r"], 1, w["tau"], _config(**kw), seed
  )


@pytest.fixture(scope="module")
def evasion(world):
  """The unconstrained attack (lam = 1: the filter term only) on four harmful and one harmless example."""
  return _attack(world, world["harm"][:4] + world["safe"][:1])


def test_filter_loss_is_the_filters_own_score(world):
  harm = world["harm"]
  data = refusal.tokenize_prompts(harm, world["tok"], 64, "alpaca")
  direct = adaptive.filter_loss(world["teacher"], data.tokens, data.attention_mask, data.last_prompt, world["r"], 1)
  np.testing.assert_allclose(
    direct, adaptive.filter_scores(world["teacher"], world["r"], 1, harm, world["tok"], 64, "alpaca"), atol=1e-5
  )
  hinge = adaptive.filter_loss(
    world["teacher"], data.tokens, data.attention_mask, data.last_prompt, world["r"], 1, tau=0.0, margin=0.1
  )
  np.testing.assert_allclose(hinge, np.maximum(np.asarray(direct) + 0.1, 0), atol=1e-6)


def test_gradient_similarity_loss_is_zero_for_the_original_only(world):
  tok, student = world["tok"], world["student"]
  names = adaptive.trainable_names(student)
  assert names == ("blocks/attn/k/kernel", "blocks/attn/q/kernel", "blocks/attn/v/kernel")
  data = sft.tokenize(world["harm"][:2], tok, 64, "alpaca")
  g0 = adaptive.lm_gradient(student, data.tokens[0], data.attention_mask[0], data.loss_mask[0], names)
  loss = np.asarray(
    adaptive.gradient_similarity_loss(student, data.tokens, data.attention_mask, data.loss_mask, g0, names)
  )
  assert abs(loss[0]) < 1e-5 and loss[1] > 1e-3


def _layout_arrays(w, ex, slots):
  c = _config()
  lay = adaptive._layout(ex, w["tok"], c, adaptive.allowed_tokens(w["tok"], w["teacher"].cfg.vocab_size))
  return adaptive._arrays(lay, np.asarray(slots, np.int32), c.seq_len)


@pytest.mark.parametrize(
  "lam,target_k",
  [
    (1.0, 0),
    (1.0, 3),
    pytest.param(0.0, 0, marks=pytest.mark.slow),
    pytest.param(0.3, 0, marks=pytest.mark.slow),
    pytest.param(0.3, 3, marks=pytest.mark.slow),
  ],
)
def test_one_hot_gradient_is_the_derivative_of_a_token_swap(world, lam, target_k):
  """G[s, v] - G[s, cur] = d/d eps objective(embedding_s + eps (E[v] - E[cur])) at 0 (central difference),
  for the filter term, the guard's target CE (target_k > 0), the (second-order) similarity term and mixes."""
  teacher, student, tok, r, tau = world["teacher"], world["student"], world["tok"], world["r"], world["tau"]
  names = adaptive.trainable_names(student)
  ex = world["harm"][0]
  orig = sft.tokenize([ex], tok, 64, "alpaca").trimmed()
  g0 = adaptive.lm_gradient(student, orig.tokens[0], orig.attention_mask[0], orig.loss_mask[0], names)
  slots = [tok.convert_tokens_to_ids(t) for t in ("bread", "then", "kite", "mix")]
  (tp, mp, last), (tf, mf, lf), start = _layout_arrays(world, ex, slots)
  grad = adaptive.one_hot_gradient(
    teacher, student, r, 1, tau, g0, names, (tp, mp, last), (tf, mf, lf), int(start), 4, lam=lam, target_k=target_k
  )

  e_t, e_s = np.asarray(teacher.embed[...]), np.asarray(student.embed[...])

  def objective(pos, v, eps):
    cur = tf[pos]
    dp, df = np.zeros((1, len(tp), e_t.shape[1]), np.float32), np.zeros((1, len(tf), e_s.shape[1]), np.float32)
    dp[0, pos], df[0, pos] = eps * (e_t[v] - e_t[cur]), eps * (e_s[v] - e_s[cur])
    total = 0.0  # only the terms in play: each costs its own compilation
    if lam > 0 and target_k:
      dt = np.zeros((len(tf), e_t.shape[1]), np.float32)
      dt[pos] = eps * (e_t[v] - e_t[cur])
      total += lam * float(adaptive.target_loss(teacher, tf, mf, lf, target_k, embed_delta=dt))
    elif lam > 0:
      total += lam * float(adaptive.filter_loss(teacher, tp[None], mp[None], last[None], r, 1, embed_delta=dp)[0])
    if lam < 1:
      sim = adaptive.gradient_similarity_loss(student, tf[None], mf[None], lf[None], g0, names, embed_delta=df)
      total += (1 - lam) * float(sim[0])
    return total

  checked = 0
  for slot, v in [(0, tok.convert_tokens_to_ids("bomb")), (2, tok.convert_tokens_to_ids("how")), (3, 7)]:
    pos = int(start) + slot
    eps = 1e-2
    fd = (objective(pos, v, eps) - objective(pos, v, -eps)) / (2 * eps)
    lin = grad[slot, v] - grad[slot, tf[pos]]
    assert abs(fd - lin) <= 2e-2 * max(abs(fd), abs(lin)) + 1e-4, (lam, slot, v, fd, lin)
    checked += abs(lin) > 1e-4
  assert checked >= 2  # not vacuous: the derivatives are not all zero


def test_filter_only_attack_never_raises_the_filter_loss_and_lowers_it(evasion):
  for rows in evasion.history[:4]:
    cos = np.asarray([row["cos"] for row in rows])
    assert len(rows) == 9 and np.all(np.diff(cos) <= 1e-6)
    assert cos[-1] < cos[0] - 1e-3
  assert evasion.history[4] is None  # the harmless example is not attacked


def test_attack_drives_most_harmful_prompts_below_tau(world, evasion):
  """Before: the filter flags every harmful prompt (tau is their smallest score); after 8 steps on a 4-token
  suffix the filter, re-tokenizing the texts as it does, misses most of them."""
  harm = evasion.examples[:4]
  before = np.asarray([e.meta["filter_score_before"] for e in harm])
  after = adaptive.filter_scores(world["teacher"], world["r"], 1, harm, world["tok"], 64, "alpaca")
  np.testing.assert_allclose(after, [e.meta["filter_score_after"] for e in harm], atol=1e-6)
  assert np.all(before >= world["tau"])
  flagged = after >= world["tau"]
  assert reft_filter.label_metrics(flagged, harm)["recall"] <= 0.25
  # What the filter reads is what was optimised: the tokens re-tokenize exactly, the scores agree.
  for e, rows, s in zip(harm, evasion.history, after):
    assert e.meta["retokenized_exact"] and abs(rows[-1]["cos"] - s) < 1e-5


def test_attack_keeps_the_response_the_label_and_the_request(world, evasion):
  for orig, new in zip(world["harm"][:4] + world["safe"][:1], evasion.examples):
    assert new.response == orig.response and new.meta["is_harmful"] == orig.meta["is_harmful"]
    if orig.meta["is_harmful"]:
      assert new.prompt.startswith(orig.prompt + " ") and new.prompt != orig.prompt
      assert new.meta["adaptive"] and new.meta["adaptive_steps"] == 8
      assert new.prompt == orig.prompt + " " + new.meta["adaptive_text"]
    else:
      assert new is orig
  mid = evasion.at(3)
  assert [e.meta.get("adaptive_steps") for e in mid[:4]] == [3] * 4 and mid[4] is evasion.examples[4]
  assert all(a.response == b.response for a, b in zip(mid, evasion.examples))


@pytest.mark.slow
def test_similarity_weight_keeps_the_gradient_closer_than_the_unconstrained_attack(world, evasion):
  constrained = _attack(world, world["harm"][:4], lam=0.02)
  sim = lambda res: np.mean([e.meta["gradient_similarity"] for e in res.examples[:4]])
  assert sim(constrained) >= sim(evasion) + 1e-3
  for rows in constrained.history:
    assert np.all(np.diff([row["objective"] for row in rows]) <= 1e-6)


def test_attack_is_deterministic_under_its_seed(world):
  exs = world["harm"][4:6]
  a, b, other = (_attack(world, exs, seed=s, steps=3) for s in (5, 5, 6))
  slots = lambda res: [[row["slots"] for row in rows] for rows in res.history]
  assert slots(a) == slots(b) and [e.prompt for e in a.examples] == [e.prompt for e in b.examples]
  assert slots(a) != slots(other)


def test_prompt_mode_rewrites_the_request_in_place(world):
  ex = world["harm"][0]
  res = _attack(world, [ex], steps=4, mode="prompt", batch=24)
  new, rows = res.examples[0], res.history[0]
  assert len(rows[0]["slots"]) == len(world["tok"].encode(ex.prompt, add_special_tokens=False))
  assert new.prompt == new.meta["adaptive_text"] != ex.prompt
  assert new.response == ex.response and rows[-1]["cos"] < rows[0]["cos"]
  assert new.meta["filter_score_before"] == pytest.approx(rows[0]["cos"], abs=1e-5)


def test_target_loss_is_the_guards_ce_on_the_answers_opening(world):
  """guard="target": the term is the guard's CE of the first k response tokens given the prompt; with k at
  least the response's length it is the whole response CE the student trains on."""
  from reft_jax import losses

  ex, tok, guard = world["harm"][0], world["tok"], world["teacher"]
  b = sft.tokenize([ex], tok, 64, "alpaca").trimmed(16)
  n = int(b.loss_mask.sum())
  batch = lambda lm: {"tokens": jnp.asarray(b.tokens), "attention_mask": jnp.asarray(b.attention_mask), "loss_mask": lm}
  total, count = losses.batch_cross_entropy(guard, batch(jnp.asarray(b.loss_mask)))
  whole = adaptive.target_loss(guard, b.tokens[0], b.attention_mask[0], b.loss_mask[0], n + 5)
  assert float(whole) == pytest.approx(float(total / count), rel=1e-5)
  first = np.asarray(b.loss_mask).copy()
  first[0, np.flatnonzero(first[0])[2:]] = 0
  t2, c2 = losses.batch_cross_entropy(guard, batch(jnp.asarray(first)))
  two = adaptive.target_loss(guard, b.tokens[0], b.attention_mask[0], b.loss_mask[0], 2)
  assert float(c2) == 2 and float(two) == pytest.approx(float(t2 / c2), rel=1e-5) != float(whole)
  np.testing.assert_allclose(adaptive.target_losses(guard, [ex], tok, 64, "alpaca", 2), [float(two)], rtol=1e-5)


def test_the_attack_on_a_generating_guard_lowers_its_target_ce(world):
  """lam = 1, guard="target": GCG on the guard's CE of the harmful answer's opening; the objective never
  rises, falls on every example, and the meta records the guard's CE before and after (no filter score)."""
  harm = world["harm"][:2]
  res = adaptive.optimise_prompts(
    harm, world["teacher"], world["student"], world["tok"], None, 0, 0.0, _config(guard="target", target_tokens=3)
  )
  for orig, new, rows in zip(harm, res.examples, res.history):
    ce = np.asarray([row["target_ce"] for row in rows])
    assert np.all(np.diff(ce) <= 1e-6) and ce[-1] < ce[0] - 1e-3
    assert new.response == orig.response and new.prompt.startswith(orig.prompt + " ")
    # before: the original prompt (row 0 is the "! ! !" suffix); after: what the optimiser ended on
    before = adaptive.target_losses(world["teacher"], [orig], world["tok"], 64, "alpaca", 3)[0]
    assert new.meta["target_ce_before"] == pytest.approx(before, rel=1e-5)
    assert new.meta["target_ce_after"] == pytest.approx(ce[-1], rel=1e-4)
    assert "filter_score_after" not in new.meta


def test_config_rejects_bad_values():
  with pytest.raises(ValueError, match="guard"):
    adaptive.AttackConfig(guard="llama_guard")
  with pytest.raises(ValueError, match="margin"):
    adaptive.AttackConfig(guard="target", margin=0.1)
  with pytest.raises(ValueError, match="lam"):
    adaptive.AttackConfig(lam=1.5)
  with pytest.raises(ValueError, match="mode"):
    adaptive.AttackConfig(mode="middle")
