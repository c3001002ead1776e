"""model/kernels.py: each hand-written gradient equals autodiff's (values and gradients to 1e-5), the model
built on them equals the model built on plain autodiff, and a scanned model's backward pass keeps the few
stacked arrays the kernels promise."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from reft_jax.model import ModelConfig, init_model
from reft_jax.model import kernels, layers
from reft_jax.model.layers import LORA_TARGETS, LoraConfig, RunOptions

TOL = dict(rtol=1e-5, atol=1e-5)
CFG = ModelConfig(
  vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8
)


def _randn(*shape, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randn(*shape), jnp.float32)


def _plain_masked_softmax(scores, mask_BTS):
  """masked_softmax as autodiff sees it: the reference of its hand-written gradient."""
  return jax.nn.softmax(jnp.where(mask_BTS[:, None, None], scores, jnp.finfo(jnp.float32).min), axis=-1)


def _assert_same_vjp(fast, plain, args, argnums):
  """Equal values, and equal gradients of a random projection of the output."""
  out = plain(*args)
  np.testing.assert_allclose(fast(*args), out, **TOL)
  ct = _randn(*out.shape, seed=9)
  grads = [jax.grad(lambda *a, f=f: jnp.sum(f(*a) * ct), argnums)(*args) for f in (fast, plain)]
  for a, b in zip(*grads):
    np.testing.assert_allclose(a, b, **TOL)


@pytest.mark.parametrize("name", sorted(kernels.ACTIVATION_FNS))
def test_gated_matches_autodiff(name):
  act = kernels.ACTIVATION_FNS[name]
  g, up = 3 * _randn(4, 7, 6, seed=1), _randn(4, 7, 6, seed=2)
  _assert_same_vjp(lambda g, u: kernels.gated(g, u, act), lambda g, u: act(g) * u, (g, up), (0, 1))


def test_masked_softmax_matches_autodiff():
  scores = 4 * _randn(2, 2, 3, 5, 5, seed=3)  # [B, KV, G, T, S]
  mask = np.tril(np.ones((5, 5), bool))[None].repeat(2, 0)
  mask[1, 3] = False  # a fully masked row (a padding query): finite, and no gradient through it
  mask = jnp.asarray(mask)
  _assert_same_vjp(kernels.masked_softmax, _plain_masked_softmax, (scores, mask), 0)
  assert np.isfinite(kernels.masked_softmax(scores, mask)).all()


def _lora_model(scan):
  opts = RunOptions(scan_layers=scan, lora=LoraConfig(targets=LORA_TARGETS))
  model = init_model(CFG, opts, seed=0)
  rng = np.random.RandomState(0)
  for _, var in nnx.state(model, nnx.LoRAParam).flat_state():  # B = 0 at init: give the adapters a say
    var.value = jnp.asarray(rng.randn(*var.value.shape) * 0.3, jnp.float32)
  return model


def _lora_loss(model):
  graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
  tokens = jnp.asarray(np.random.RandomState(1).randint(0, CFG.vocab_size, (2, 6)), jnp.int32)
  mask = jnp.asarray([[1] * 6, [1] * 4 + [0] * 2], jnp.int32)
  ct = _randn(2, 6, CFG.vocab_size, seed=4)
  return (lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(tokens, mask) * ct)), lora


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_model_on_kernels_matches_plain_autodiff(scan, monkeypatch):
  """The whole model's LoRA gradients, with the kernels and with their autodiff reference patched in."""
  loss, lora = _lora_loss(_lora_model(scan))
  fast = jax.value_and_grad(loss)(lora)
  monkeypatch.setattr(layers, "dense", lambda x, w, n_in=1: jnp.tensordot(x, w, n_in))
  monkeypatch.setattr(layers, "gated", lambda g, u, act: act(g) * u)
  monkeypatch.setattr(layers, "masked_softmax", _plain_masked_softmax)
  plain = jax.value_and_grad(loss)(lora)
  np.testing.assert_allclose(fast[0], plain[0], **TOL)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), fast[1], plain[1])


def test_scanned_backward_keeps_few_stacked_arrays(capsys):
  """What lax.scan stacks over the layers for the backward pass: the gated MLP's g, up and hidden state
  (three [L, B, T, F] arrays), one [L, B, KV, G, T, S] probability array, no per-layer copy of the mask and
  no per-layer copy of a weight."""
  loss, lora = _lora_loss(_lora_model(True))
  jax.ad_checkpoint.print_saved_residuals(loss, lora)
  stacked = [
    tuple(int(d) for d in m.group(2).split(","))
    for m in re.finditer(r"^(\w+)\[([\d,]+)\] output of scan", capsys.readouterr().out, re.M)
    if m.group(2).startswith(f"{CFG.num_layers},")
  ]
  L, d, f, t = CFG.num_layers, CFG.hidden_size, CFG.intermediate_size, 6
  assert stacked, "no stacked residual read: the parser is broken"
  assert stacked.count((L, 2, t, f)) == 3, stacked
  assert sum(1 for s in stacked if s[-2:] == (t, t)) == 1, stacked  # probabilities only, not the mask
  assert not [s for s in stacked if s[1] == d], stacked  # [L, d, ...]: a weight's slice
