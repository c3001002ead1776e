"""model.attention=splash: the Pallas TPU splash kernel (run by Pallas' interpreter on CPU) computes the
same logits and gradients as the einsum path: GQA, left/right padding, Gemma2 sliding windows and
soft-cap, scanned and unrolled layers, and sharded over a device mesh inside the real train step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_attention_impl import GEMMA_SOFTCAP, LLAMA_GQA, batch, randomized, with_attention

from reft_jax import sharding as shd
from reft_jax.generate import generate
from reft_jax.losses import lm_loss
from reft_jax.model import RunOptions, init_model
from reft_jax.optim import make_optimizer
from reft_jax.train import batch_shardings, init_train_state, jit_step, make_train_step

# Three sliding layers of window 3 and one soft-capped full layer, 9 tokens padded to one 128 block.
GEMMA = GEMMA_SOFTCAP.replace(num_layers=4, layer_types=("sliding", "full", "sliding", "sliding"))


@pytest.mark.parametrize("cfg", [LLAMA_GQA, GEMMA], ids=["llama_gqa", "gemma2_window_softcap"])
@pytest.mark.parametrize("scan", [False, True])
def test_splash_matches_einsum(cfg, scan):
  ref = randomized(cfg)
  tokens, mask = batch(cfg)
  model = with_attention(ref, "splash", scan_layers=scan)
  assert model.blocks.attn.impl == "splash"
  want = with_attention(ref, "einsum", scan_layers=scan)(tokens, mask)
  got = model(tokens, mask)
  real = np.asarray(mask, bool)  # padding queries' outputs differ between paths and are never read
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=2e-5, atol=2e-5)


def test_splash_gradients_match_einsum():
  ref = randomized(GEMMA)
  tokens, mask = batch(GEMMA)

  def grads(attention):
    graphdef, params = nnx.split(with_attention(ref, attention, scan_layers=True))

    def loss(p):
      logits = nnx.merge(graphdef, p)(tokens, mask)
      return jnp.sum(jax.nn.log_softmax(logits)[..., 0] * mask)

    return jax.grad(loss)(params)

  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads("splash"), grads("einsum"))


def test_splash_model_generates_like_einsum():
  """Generation runs against a KV cache, where splash hands over to XLA attention."""
  ref = randomized(LLAMA_GQA)
  tokens, mask = batch(LLAMA_GQA)
  out = {
    a: generate(with_attention(ref, a), tokens[:2], mask[:2], max_new_tokens=4, eos_id=-1, pad_id=0)
    for a in ("einsum", "splash")
  }
  np.testing.assert_array_equal(out["splash"], out["einsum"])


def _losses(mesh, attention, steps=2):
  cfg = LLAMA_GQA.replace(vocab_size=64)
  rng = np.random.RandomState(0)
  mask = (np.arange(16)[None] < rng.randint(8, 17, size=(8, 1))).astype(np.int32)
  data = {
    "tokens": rng.randint(0, cfg.vocab_size, (8, 16)).astype(np.int32) * mask,
    "attention_mask": mask,
    "loss_mask": mask,
  }
  graphdef, state = nnx.split(init_model(cfg, RunOptions(attention=attention), seed=0))
  params = jax.device_put(nnx.to_pure_dict(state), shd.state_shardings(state, mesh))
  tx, schedule, labels = make_optimizer(params, lr=1e-2, num_steps=steps, schedule="constant")
  train_state, state_sh = init_train_state(params, tx, mesh)
  batch_sh = batch_shardings(data, mesh)
  step = jit_step(make_train_step(graphdef, tx, lm_loss, schedule, labels), state_sh, batch_sh, mesh)
  data = jax.device_put(data, batch_sh)
  losses = []
  for _ in range(steps):
    train_state, metrics = step(train_state, data)
    losses.append(float(metrics["loss"]))
  return np.array(losses)


def test_splash_train_step_on_a_mesh_matches_einsum():
  """Batch over data x fsdp and the 2 KV heads over tensor: the kernel runs per shard (shard_map)."""
  mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
  np.testing.assert_allclose(_losses(mesh, "splash"), _losses(mesh, "einsum"), rtol=1e-5)


def test_splash_refusal_features_on_a_mesh_match_einsum():
  """The filter's pass (refusal.prompt_features) runs the kernel per shard on the model's mesh."""
  from reft_jax import refusal
  from reft_jax.data.sft import TokenizedSet

  mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
  ref = randomized(LLAMA_GQA)
  tokens, mask = batch(LLAMA_GQA)
  data = TokenizedSet(
    tokens=np.asarray(tokens),
    attention_mask=np.asarray(mask),
    loss_mask=np.asarray(mask),
    num_truncated=0,
    last_prompt=np.asarray(mask).sum(1) - 1,
  )

  def features(attention):
    model = with_attention(ref, attention)
    graphdef, state = nnx.split(model)
    params = jax.device_put(nnx.to_pure_dict(state), shd.state_shardings(state, mesh))
    return refusal.prompt_features(nnx.merge(graphdef, params), data, 1, batch_size=8, mesh=mesh)

  np.testing.assert_allclose(features("splash"), features("einsum"), rtol=2e-5, atol=2e-5)
