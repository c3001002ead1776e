"""The fast paths equal the plain ones, in values and gradients: the chunked (fused) head + loss, the
cross-entropy's hand-written gradient, and kernels.dense's weight gradient."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from reft_jax import losses, refusal
from reft_jax.defences.reft import student_loss
from reft_jax.model import ModelConfig, init_model
from reft_jax.train import Context
from reft_jax.pipelines.validate import validate as validate_config
from reft_jax.model import build as model_build
from reft_jax.data import load as data_load
from reft_jax import stages
from reft_jax import sharding as shd

LLAMA = ModelConfig(
  vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8
)
# Tied embeddings (the head reads `embed`, also used by the input) and a final logit soft-cap.
TIED = LLAMA.replace(family="gemma2", tie_embeddings=True, final_logit_softcap=5.0, norm_plus_one=True)
TOL = dict(rtol=1e-5, atol=1e-5)


def randomized(cfg, seed=0):
  """O(1) logits, so that soft-max and KL are far from uniform."""
  model = init_model(cfg, seed=seed)
  rng = np.random.RandomState(seed)
  for _, var in nnx.state(model, nnx.Param).flat_state():
    scale = 1 / math.sqrt(cfg.hidden_size) if var.value.ndim > 1 else 0.3
    var.value = jnp.asarray(var.value + rng.randn(*var.value.shape) * scale, var.value.dtype)
  return model


def lm_batch(cfg, seed=1, b=3, t=11):
  rng = np.random.RandomState(seed)
  mask = np.ones((b, t), np.int32)
  mask[1, 7:] = 0
  return {
    "tokens": jnp.asarray(rng.randint(0, cfg.vocab_size, (b, t)), jnp.int32),
    "attention_mask": jnp.asarray(mask),
    "loss_mask": jnp.asarray(rng.randint(0, 2, (b, t)) * mask),
  }


def value_and_grads(model, fn):
  """fn(model) -> scalar, its value and gradient w.r.t. every parameter (jitted)."""
  graphdef, params = nnx.split(model)
  return jax.jit(jax.value_and_grad(lambda p: fn(nnx.merge(graphdef, p))))(params)


@pytest.fixture(params=["deferred", "per_chunk"])
def projection_grad(request, monkeypatch):
  """Both ways of the chunked head's backward: the projection's after the loop (CPU) or in each chunk."""
  monkeypatch.setattr(losses, "_defer_projection_grad", lambda: request.param == "deferred")
  return request.param


def assert_same(a, b):
  (va, ga), (vb, gb) = a, b
  np.testing.assert_allclose(va, vb, **TOL)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **TOL), ga, gb)


@pytest.mark.parametrize("n_in", [1, 2])
def test_dense_matches_tensordot(n_in):
  from reft_jax.model.kernels import dense

  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(3, 5, *(4, 6)[:n_in]), jnp.float32)
  w = jnp.asarray(rng.randn(*(4, 6)[:n_in], 7, 2), jnp.float32)
  ct = jnp.asarray(rng.randn(3, 5, 7, 2), jnp.float32)
  fast = jax.jit(lambda x, w: jnp.sum(dense(x, w, n_in) * ct))
  plain = jax.jit(lambda x, w: jnp.sum(jnp.tensordot(x, w, n_in) * ct))
  np.testing.assert_allclose(dense(x, w, n_in), jnp.tensordot(x, w, n_in), **TOL)
  for a, b in zip(jax.grad(fast, (0, 1))(x, w), jax.grad(plain, (0, 1))(x, w)):
    np.testing.assert_allclose(a, b, **TOL)


@pytest.mark.parametrize("cfg", [LLAMA, TIED], ids=["llama", "tied_softcap"])
def test_lm_loss_matches_autodiff_log_softmax(cfg):
  """lm_loss (head on the shifted positions, token_nll's own gradient) against the textbook loss."""
  model, batch = randomized(cfg), lm_batch(cfg)
  t, w = losses.next_token_targets(batch["tokens"], batch["loss_mask"])

  def textbook(m):
    logp = jax.nn.log_softmax(m(batch["tokens"], batch["attention_mask"])[:, :-1], axis=-1)
    return -jnp.sum(jnp.take_along_axis(logp, t[..., None], -1)[..., 0] * w) / jnp.sum(w)

  fast = lambda m: (lambda s, n, _: s / n)(*losses.lm_loss(m, batch))
  assert_same(value_and_grads(model, fast), value_and_grads(model, textbook))


@pytest.mark.parametrize("cfg", [LLAMA, TIED], ids=["llama", "tied_softcap"])
@pytest.mark.parametrize("chunk", [4, 16])  # 4 does not divide T - 1 = 10; 16 > T - 1 (one padded chunk)
def test_lm_loss_chunked_matches(cfg, chunk, projection_grad):
  model, batch = randomized(cfg), lm_batch(cfg)
  mean = lambda loss_fn: lambda m: (lambda s, n, _: s / n)(*loss_fn(m, batch))
  assert_same(value_and_grads(model, mean(losses.make_lm_loss(chunk))), value_and_grads(model, mean(losses.lm_loss)))
  assert losses.make_lm_loss(0) is losses.lm_loss


def test_chunked_cross_entropy_count_and_forward_only():
  model, batch = randomized(LLAMA), lm_batch(LLAMA)
  t, w = losses.next_token_targets(batch["tokens"], batch["loss_mask"])
  h = losses.final_hidden(model, batch["tokens"], batch["attention_mask"])[:, :-1]
  got = losses.chunked_cross_entropy(model, h, t, w, 3)
  want = losses.masked_cross_entropy(model(batch["tokens"], batch["attention_mask"])[:, :-1], t, w)
  np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.parametrize("cfg", [LLAMA, TIED], ids=["llama", "tied_softcap"])
def test_kl_teacher_student_chunked_matches(cfg, projection_grad):
  student, teacher, batch = randomized(cfg), randomized(cfg, seed=5), lm_batch(cfg)
  _, w = losses.next_token_targets(batch["tokens"], batch["loss_mask"])
  tok, mask = batch["tokens"], batch["attention_mask"]
  t_hidden = losses.final_hidden(teacher, tok, mask)[:, :-1]

  def full(m):
    return losses.kl_teacher_student(teacher(tok, mask)[:, :-1], m(tok, mask)[:, :-1], w, 2.0)[0]

  def chunked(m):
    h = losses.final_hidden(m, tok, mask)[:, :-1]
    return losses.chunked_kl_teacher_student(teacher, t_hidden, m, h, w, 2.0, chunk=4)[0]

  assert_same(value_and_grads(student, chunked), value_and_grads(student, full))


def test_kl_topk_chunked_matches(projection_grad):
  student, teacher, batch = randomized(LLAMA), randomized(LLAMA, seed=5), lm_batch(LLAMA)
  _, w = losses.next_token_targets(batch["tokens"], batch["loss_mask"])
  tok, mask = batch["tokens"], batch["attention_mask"]
  vals, ids = jax.lax.top_k(teacher(tok, mask)[:, :-1], 8)

  def full(m):
    return losses.kl_topk_student(vals, ids, m(tok, mask)[:, :-1], w, 1.5)[0]

  def chunked(m):
    h = losses.final_hidden(m, tok, mask)[:, :-1]
    return losses.chunked_kl_topk_student(vals, ids, m, h, w, 1.5, chunk=3)[0]

  assert_same(value_and_grads(student, chunked), value_and_grads(student, full))


@pytest.mark.parametrize("topk", [False, True])
def test_student_loss_chunked_matches(topk, projection_grad):
  student, teacher = randomized(LLAMA), randomized(LLAMA, seed=5)
  batch = {"user": lm_batch(LLAMA, seed=1), "align": lm_batch(LLAMA, seed=2)}
  if topk:
    a = batch["align"]
    vals, ids = jax.lax.top_k(teacher(a["tokens"], a["attention_mask"]), 8)
    batch["align"] = {**a, "topk_logits": vals, "topk_ids": ids}
  ctx = Context({}, None if topk else teacher)

  def mean(chunk):
    fn = student_loss(0.7, 1.3, topk, chunk)
    return lambda m: (lambda s, n, _: s / n)(*fn(m, batch, ctx))

  assert_same(value_and_grads(student, mean(4)), value_and_grads(student, mean(0)))


@pytest.mark.parametrize("chunk", [0, 4])
def test_student_loss_is_ce_plus_kl_plus_feature_term(chunk, projection_grad):
  """The student's loss, with the refusal-feature term, and its gradients equal the textbook composition
  CE + beta KL(teacher || student) + lam reg, each from a forward of its own (alignment batch shorter)."""
  student, teacher = randomized(LLAMA), randomized(LLAMA, seed=5)
  u, a = lm_batch(LLAMA, seed=1), lm_batch(LLAMA, seed=2, t=9)
  a = {**a, "last_prompt": jnp.asarray([3, 5, 2]), "is_harmful": jnp.asarray([1, 0, 1])}
  r = np.random.RandomState(3).randn(LLAMA.hidden_size).astype(np.float32)
  beta, temp, lam = 0.7, 1.3, 0.4
  fn = student_loss(beta, temp, False, chunk, feature=(1, r, lam))
  ctx = Context({}, teacher)

  def textbook(m):
    ce, count = losses.batch_cross_entropy(m, u)
    _, wa = losses.next_token_targets(a["tokens"], a["loss_mask"])
    t_logits = losses.shifted_logits(teacher, a["tokens"], a["attention_mask"])
    kl, n = losses.kl_teacher_student(t_logits, losses.shifted_logits(m, a["tokens"], a["attention_mask"]), wa, temp)
    h1 = m.forward(a["tokens"], a["attention_mask"], hidden_layers=(1,), stop_after=1)[1][1]
    h = jnp.take_along_axis(h1, a["last_prompt"][:, None, None], 1)[:, 0]
    reg = losses.refusal_regularizer(refusal.cosine(h, jnp.asarray(r)), a["is_harmful"])
    return ce / count + beta * kl / n + lam * reg

  mean = lambda m: (lambda s, n, _: s / n)(*fn(m, {"user": u, "align": a}, ctx))
  assert_same(value_and_grads(student, mean), value_and_grads(student, textbook))


def test_loss_chunk_config_is_checked():
  from helpers import tiny_config

  from reft_jax import config as config_lib

  validate_config(tiny_config(**{"train.loss_chunk": 16}))
  with pytest.raises(config_lib.ConfigError, match="train.loss_chunk=-2"):
    validate_config(tiny_config(**{"train.loss_chunk": -2}))


def test_sharded_training_with_chunked_loss_matches_unchunked(tmp_path):
  """The real train stage on a (data, fsdp, tensor) = (2, 2, 2) mesh, head sharded over vocab."""
  from helpers import mesh_of, tiny_config

  from reft_jax.data import sft

  c = tiny_config(**{"train.num_steps": 3})

  def losses_of(mesh, loss_fn, workdir):
    examples = data_load.read_examples(c)
    tok = data_load.get_tokenizer(c, str(workdir), examples)
    data = sft.tokenize(examples, tok, c.data.seq_len, c.data.template)
    rules = shd.parse_rules(c.mesh.rules)
    model = model_build.build_model(c, mesh, rules, tok)
    history = stages.train_stage(c, str(workdir), "sft", model, data, loss_fn, mesh, rules)[1]
    return [h["loss"] for h in history]

  want = losses_of(mesh_of(), losses.lm_loss, tmp_path / "a")
  got = losses_of(mesh_of(data=2, fsdp=2, tensor=2), losses.make_lm_loss(8), tmp_path / "b")
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_auto_loss_chunk_by_vocabulary():
  """train.loss_chunk=-1 (the default): unchunked below 16k entries, 16 positions above (on CPU), and the
  auto loss equals the unchunked one."""
  assert losses.resolve_chunk(-1, LLAMA.vocab_size) == 0 and losses.resolve_chunk(-1, 49152) == 16
  assert losses.resolve_chunk(0, 49152) == 0 and losses.resolve_chunk(8, 97) == 8
  big = LLAMA.replace(vocab_size=losses.AUTO_CHUNK_MIN_VOCAB)
  model, batch = randomized(big), lm_batch(big, t=40)
  mean = lambda loss_fn: lambda m: (lambda s, n, _: s / n)(*loss_fn(m, batch))
  assert_same(value_and_grads(model, mean(losses.make_lm_loss(-1))), value_and_grads(model, mean(losses.lm_loss)))


def test_token_kl_gradients_match_autodiff():
  """token_kl's written-out gradients (student and teacher) against autodiff of the textbook KL."""
  rng = np.random.RandomState(3)
  t, s = (jnp.asarray(rng.randn(2, 5, 11) * 2, jnp.float32) for _ in range(2))
  g = jnp.asarray(rng.randn(2, 5), jnp.float32)

  def textbook(t, s):
    log_t, log_s = jax.nn.log_softmax(t, -1), jax.nn.log_softmax(s, -1)
    return jnp.sum(jnp.sum(jnp.exp(log_t) * (log_t - log_s), -1) * g)

  fast = lambda t, s: jnp.sum(losses.token_kl(t, s) * g)
  np.testing.assert_allclose(fast(t, s), textbook(t, s), **TOL)
  for a, b in zip(jax.grad(fast, (0, 1))(t, s), jax.grad(textbook, (0, 1))(t, s)):
    np.testing.assert_allclose(a, b, **TOL)
