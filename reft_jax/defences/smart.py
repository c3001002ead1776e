"""SMART (Jiang et al., ACL 2020; namisan/mt-dnn mt_dnn/perturbation.py): smoothness-inducing adversarial
regularization with Bregman proximal point optimisation (METHODS.md §8), fine-tuning from the aligned model:
CE + lam * symKL(f(x), f(x + delta)), delta one projected ascent step on the input embeddings (the model's
"embed" intervention site), + mu * symKL(f(x; w), f(x; w~)), w~ a momentum copy of the trained weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from reft_jax import losses
from reft_jax.config import check
from reft_jax.defences.registry import Defence, register
from reft_jax.defences.sft import aligned_stage
from reft_jax.optim import overlay, trainable_copy, trainable_labels
from reft_jax.stages import Env, MethodState, StageSpec
from reft_jax.train import split_model


def sym_kl(logits_p_BTV, logits_q_BTV, weights_BT):
  """(sum over weighted positions of KL(p||q) + KL(q||p), in float32; differentiable in both)."""
  log_p = jax.nn.log_softmax(logits_p_BTV.astype(jnp.float32), axis=-1)
  log_q = jax.nn.log_softmax(logits_q_BTV.astype(jnp.float32), axis=-1)
  per_token = jnp.sum((jnp.exp(log_p) - jnp.exp(log_q)) * (log_p - log_q), axis=-1)
  return jnp.sum(per_token * weights_BT)


def smart_delta(model, batch, clean_logits, key, eps: float, sigma: float, eta: float):
  """The input-embedding perturbation (Algorithm 1, T=1): delta0 ~ N(0, sigma^2), then
  delta = clip(delta0 + eta g / ||g||_inf, -eps, eps), g = d symKL(f(x), f(x + delta0)) / d delta0 with
  f(x) a constant and the infinity norm per example. A constant: no gradient flows through it."""
  tokens, mask = batch["tokens"], batch["attention_mask"]
  _, w = losses.next_token_targets(tokens, batch["loss_mask"])
  clean = jax.lax.stop_gradient(clean_logits)
  noise = sigma * jax.random.normal(key, (*tokens.shape, model.cfg.hidden_size), jnp.float32)

  def divergence(delta):
    logits, _ = model.forward(tokens, mask, interventions={"embed": delta})
    return sym_kl(clean, logits[:, :-1], w)

  g = jax.grad(divergence)(noise)
  g_inf = jnp.max(jnp.abs(g), axis=(1, 2), keepdims=True)
  delta = jnp.clip(noise + eta * g / (g_inf + 1e-12), -eps, eps)
  return jax.lax.stop_gradient(delta)


def smart_loss(lam: float, eps: float, sigma: float, eta: float, mu: float):
  """CE + lam * adversarial symKL + mu * proximal symKL, each a mean over the response tokens.
  ctx.extras: "smart_key" (raw PRNG key for the start noise) and "smart_momentum" (w~, the parameters
  being trained; the rest are shared with the model)."""

  def loss(model, batch, ctx):
    tokens, mask = batch["tokens"], batch["attention_mask"]
    targets, w = losses.next_token_targets(tokens, batch["loss_mask"])
    logits, _ = model.forward(tokens, mask)
    logits = logits[:, :-1]
    total, count = losses.masked_cross_entropy(logits, targets, w)
    n = jnp.maximum(count, 1)
    delta = smart_delta(model, batch, logits, ctx.extras["smart_key"], eps, sigma, eta)
    adv_logits, _ = model.forward(tokens, mask, interventions={"embed": delta})
    # As in the paper's l_s, both distributions get gradients (the clean one is not a fixed target).
    adv = sym_kl(logits, adv_logits[:, :-1], w) / n
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    tilde, _ = nnx.merge(graphdef, overlay(params, ctx.extras["smart_momentum"])).forward(tokens, mask)
    prox = sym_kl(logits, jax.lax.stop_gradient(tilde[:, :-1]), w) / n
    return total + (lam * adv + mu * prox) * n, count, {"smart_adv": adv, "smart_prox": prox}

  return loss


def smart_momentum(momentum: dict, params: dict, beta: float) -> dict:
  """w~_t = (1 - beta) w_t + beta w~_{t-1}, in float32."""
  return jax.tree.map(lambda m, p: (1 - beta) * p.astype(jnp.float32) + beta * m, momentum, params)


def smart_state(params: dict, labels: dict, beta: float, seed: int) -> MethodState:
  """Method state for smart_loss: w~ starts at the initial weights and, before every later step, moves
  toward the weights the previous step left; each step draws its own start noise."""
  part = lambda p: trainable_copy(p, labels)
  key = jax.random.PRNGKey(seed)
  extras = {"smart_momentum": part(params), "smart_key": key}
  update = jax.jit(lambda m, p: smart_momentum(m, part(p), beta), donate_argnums=0)

  def before_step(step, state):
    extras = dict(state.extras)
    if step > 0:
      extras["smart_momentum"] = update(extras["smart_momentum"], state.params)
    extras["smart_key"] = jax.random.fold_in(key, step)
    return state.replace(extras=extras)

  return MethodState(extras, before_step=before_step)


def finetune(env: Env, root: str, start: str, user) -> StageSpec:
  c, s = env.c, env.c.smart

  def setup(model):
    params = split_model(model)[1]
    return smart_state(params, trainable_labels(params, c.train.mode, c.train.trainable_regex), s.beta, c.seed)

  return StageSpec(
    "smart", env.tokenize(user), init=start, loss=smart_loss(s.lam, s.eps, s.sigma, s.eta, s.mu), setup=setup
  )


def _validate(c):
  for f in ("lam", "mu", "eps", "sigma", "eta"):
    check(c.smart[f] >= 0, f"smart.{f}", c.smart[f], "must be >= 0")
  check(0 <= c.smart.beta < 1, "smart.beta", c.smart.beta, "must lie in [0, 1)")


SMART = register(
  Defence(
    "smart",
    "fine-tuning with adversarial smoothness and a Bregman proximal term",
    finetune=finetune,
    align=aligned_stage,
    section="smart",
    # lam (adversarial weight, tuned in {1,3,5}), eps (inf-norm radius of the embedding perturbation), sigma
    # (start noise), eta (ascent step), mu (proximal weight), beta (momentum of the proximal copy). With bf16
    # compute a 1e-5 perturbation is below the residual's resolution.
    defaults={"lam": 1.0, "eps": 1e-5, "sigma": 1e-5, "eta": 1e-3, "mu": 1.0, "beta": 0.99},
    validate=_validate,
    source="Jiang et al., ACL 2020; namisan/mt-dnn",
  )
)
