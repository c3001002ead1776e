"""The pure train step and the loop shared by every method.

A method supplies `loss_fn(model, batch) -> (sum, count, aux)`; the step turns it into
`(state, batch) -> (state, metrics)`, jitted once with explicit shardings and the state donated.
"""

from __future__ import annotations

import math
import signal
import time
from typing import Any
from collections.abc import Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, traverse_util

from reft_jax import sharding as shd
from reft_jax.distributed import StopVote
from reft_jax.optim import TRAINABLE


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict  # pure nested dict of arrays (nnx.to_pure_dict of the model's state)
  opt_state: Any
  extras: dict = flax.struct.field(default_factory=dict)  # method state, e.g. the refusal direction


@flax.struct.dataclass
class Context:
  """What a loss sees besides the model and the batch."""

  extras: dict  # TrainState.extras (constants inside the step)
  frozen: Any = None  # a frozen model passed into the step (the teacher), or None


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, dict]:
  graphdef, state = nnx.split(model)
  return graphdef, nnx.to_pure_dict(state)


def opt_state_shardings(abstract_opt_state, params: dict, mesh):
  """Each optimizer leaf that mirrors a parameter (Adam's mu/nu: its key path ends with the
  parameter's path and the shapes agree) takes that parameter's sharding; the rest (counts) are
  replicated."""
  by_path = {k: v for k, v in traverse_util.flatten_dict(params).items()}

  def one(path, leaf):
    keys = tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
    for i in range(len(keys)):
      p = by_path.get(keys[i:])
      if p is not None and p.shape == leaf.shape:
        return p.sharding
    return shd.replicated(mesh)

  return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


def init_train_state(
  params: dict, tx: optax.GradientTransformation, mesh, extras: dict | None = None
) -> tuple[TrainState, Any]:
  """The train state and its shardings; optimizer moments are born sharded like their params,
  extras (small method state) are replicated."""
  opt_sh = opt_state_shardings(jax.eval_shape(tx.init, params), params, mesh)
  opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
  rep = shd.replicated(mesh)

  def place(x):  # keep extras already sharded on this mesh (e.g. a weight snapshot), replicate the rest;
    # always a fresh buffer, so a snapshot never aliases the (donated) parameters
    sh = getattr(x, "sharding", None)
    return jnp.copy(x) if isinstance(sh, shd.NamedSharding) and sh.mesh == mesh else jax.device_put(x, rep)

  state = TrainState(
    jax.device_put(jnp.zeros((), jnp.int32), rep), params, opt_state, jax.tree.map(place, dict(extras or {}))
  )
  return state, jax.tree.map(lambda x: x.sharding, state)


def _microbatches(batch: dict, n: int) -> dict:
  # Strided split (row j goes to micro-batch j % n) keeps every micro-batch spread over all
  # data-parallel devices instead of living on the first few.
  def split(x):
    if x.shape[0] % n:
      raise ValueError(f"batch size {x.shape[0]} is not divisible by grad_accum={n}")
    return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)

  return jax.tree.map(split, batch)


def make_train_step(
  graphdef,
  tx,
  loss_fn: Callable,
  schedule,
  labels: dict,
  grad_accum: int = 1,
  frozen_graphdef=None,
  update_extras: Callable | None = None,
):
  """Builds the pure step `(state, batch[, frozen_params]) -> (state, metrics)`; `jit_step` compiles
  it with shardings and donation.

  loss_fn(model, batch, ctx: Context) -> (sum, count, aux): the step minimises sum / count over
  the whole batch (micro-batches included). aux values are averaged over micro-batches and logged;
  update_extras(extras, aux) -> (extras, aux) may turn some of them into new method state (e.g. an
  EMA of the refusal direction). frozen_params (with frozen_graphdef) are merged into ctx.frozen:
  forward only, never differentiated, never donated.
  """

  def loss_sum(params, batch, extras, frozen_params):
    frozen = None if frozen_graphdef is None else nnx.merge(frozen_graphdef, frozen_params)
    total, count, aux = loss_fn(nnx.merge(graphdef, params), batch, Context(extras, frozen))
    return total, (count, aux)

  grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

  def train_step(state: TrainState, batch: dict, frozen_params=None):
    if grad_accum == 1:
      (total, (count, aux)), grads = grad_fn(state.params, batch, state.extras, frozen_params)
    else:

      def body(carry, mb):
        (t, (c, a)), g = grad_fn(state.params, mb, state.extras, frozen_params)
        acc_t, acc_c, acc_g, acc_a = carry
        return (acc_t + t, acc_c + c, jax.tree.map(jnp.add, acc_g, g), jax.tree.map(jnp.add, acc_a, a)), None

      mbs = _microbatches(batch, grad_accum)
      (_, (_, aux0)), _ = jax.eval_shape(
        grad_fn, state.params, jax.tree.map(lambda x: x[0], mbs), state.extras, frozen_params
      )
      zeros = (
        jnp.zeros(()),
        jnp.zeros(()),
        jax.tree.map(jnp.zeros_like, state.params),
        jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), aux0),
      )
      (total, count, grads, aux), _ = jax.lax.scan(body, zeros, mbs)
      aux = jax.tree.map(lambda a: a / grad_accum, aux)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)  # mean over all response tokens of the batch
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    extras = state.extras
    if update_extras is not None:
      extras, aux = update_extras(extras, aux)
    trainable = jax.tree.map(lambda g, l: g if l == TRAINABLE else jnp.zeros(()), grads, labels)
    masks = [x for k, x in traverse_util.flatten_dict(batch).items() if k[-1] == "attention_mask"]
    metrics = {
      "loss": total / denom,
      "loss_tokens": count,
      "tokens": sum(jnp.sum(m) for m in masks).astype(jnp.float32),
      "grad_norm": optax.global_norm(trainable),
      "lr": schedule(state.step),
      **aux,
    }
    return TrainState(state.step + 1, params, opt_state, extras), metrics

  return train_step


def batch_shardings(batch: dict, mesh, rules=None):
  """Every batch leaf is split along its first (example) axis over the data-parallel mesh axes."""
  return jax.tree.map(lambda x: shd.batch_sharding(mesh, rules, np.ndim(x)), batch)


def jit_step(step_fn, state_shardings, batch_sharding, mesh, frozen_shardings=None, rules=None):
  """The step jitted with explicit shardings, the state donated; the model's activations are constrained
  with `mesh` and `rules` (shd.activation_sharding), like the params and the batch."""

  def traced(*args):  # the context is entered inside the trace, so it binds to this jit only
    with shd.activation_sharding(mesh, rules):
      return step_fn(*args)

  if frozen_shardings is None:
    return jax.jit(
      lambda s, b: traced(s, b),
      in_shardings=(state_shardings, batch_sharding),
      out_shardings=(state_shardings, shd.replicated(mesh)),
      donate_argnums=0,
    )
  return jax.jit(
    traced,
    in_shardings=(state_shardings, batch_sharding, frozen_shardings),
    out_shardings=(state_shardings, shd.replicated(mesh)),
    donate_argnums=0,
  )


# ---------------------------------------------------------------- checkpointed subset of the state


def trainable_subset(state: TrainState, labels: dict) -> dict:
  """What a checkpoint holds: step, trainable parameters and optimizer state (frozen weights are
  rebuilt from their source, e.g. the base checkpoint, so a LoRA checkpoint stays small)."""
  flat_p = traverse_util.flatten_dict(state.params)
  flat_l = traverse_util.flatten_dict(labels)
  params = {k: v for k, v in flat_p.items() if flat_l[k] == TRAINABLE}
  return {
    "step": state.step,
    "params": traverse_util.unflatten_dict(params),
    "opt_state": state.opt_state,
    "extras": state.extras,
  }


def with_trainable(state: TrainState, subset: dict) -> TrainState:
  flat = traverse_util.flatten_dict(state.params)
  flat.update(traverse_util.flatten_dict(subset["params"]))
  return TrainState(subset["step"], traverse_util.unflatten_dict(flat), subset["opt_state"], subset["extras"])


# ---------------------------------------------------------------- the loop


class StopSignal:
  """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the next step boundary and exits."""

  def __init__(self):
    self.received: int | None = None
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: no handlers, nothing to restore
        pass
    return self

  def _handle(self, signum, frame):
    self.received = signum

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


class NonFiniteLoss(RuntimeError):
  """A NaN/inf loss or gradient norm at `step`: the state after it is never saved, and the state it started
  from (finite, but one whose gradient is not) is no checkpoint to resume from either."""

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step


def flops_per_token(model_cfg, seq_len: int) -> float:
  """Training FLOPs per token: 6 N (matmuls, fwd+bwd) + 12 L T D_attn (attention scores)."""
  n = model_cfg.num_params(include_embeddings=False) + model_cfg.vocab_size * model_cfg.hidden_size
  attn = 12 * model_cfg.num_layers * seq_len * model_cfg.num_heads * model_cfg.head_dim
  return 6.0 * n + attn


def step_metrics(step: int, metrics: dict, positions: int, dt: float, flops_token: float, peak_flops: float) -> dict:
  """One step's metrics on the host, with throughput (real tokens/s, TFLOP/s over every position, MFU);
  raises NonFiniteLoss on a NaN/inf loss or gradient norm."""
  m = {k: float(v) for k, v in jax.device_get(metrics).items()}
  # The gradient norm too: a NaN gradient with a still-finite loss already broke the parameters this step
  # updated, and the loop saves that state only after this check.
  for key in ("loss", "grad_norm"):
    if key in m and not math.isfinite(m[key]):
      raise NonFiniteLoss(
        f"{key.replace('_', ' ')} became {m[key]} at step {step}; stopped before saving its state (no "
        "checkpoint holds it or the state it started from). Lower train.lr or check the data and rerun; "
        "--config.resume_policy=reuse resumes from the last checkpoint with the new settings.",
        step,
      )
  m["step"] = step
  m["tokens_per_sec"] = m["tokens"] / dt if dt > 0 else 0.0  # real (non-padding) tokens
  flops = flops_token * positions / dt if dt > 0 else 0.0  # FLOPs are spent on every position, padding too
  m["tflops_per_sec"] = flops / 1e12
  if peak_flops:
    m["mfu"] = flops / (peak_flops * jax.device_count())
  return m


def train_loop(
  state,
  step_fn,
  batcher,
  batch_sharding,
  *,
  num_steps: int,
  writer=None,
  checkpointer=None,
  save_state=None,
  log_every: int = 1,
  flops_token: float = 0.0,
  peak_flops: float = 0.0,
  hooks=(),
  progress: bool = True,
  before_step=None,
):
  """Runs steps state.step .. num_steps-1.

  Metrics of step t are fetched after step t+1 is dispatched, so the host never stalls the device.
  Returns (state, history, stopped_by_signal). `save_state(state)` gives the tree to checkpoint;
  `before_step(step, state) -> state` may refresh method state (e.g. re-estimate a direction).
  """
  from tqdm.auto import tqdm

  start = int(jax.device_get(state.step))
  history: list[dict] = []
  pending = None
  t_last = time.perf_counter()
  bar = tqdm(
    total=num_steps, initial=start, disable=not progress or jax.process_index() != 0, desc="train", mininterval=1.0
  )

  def consume(step, metrics, positions, dt):
    m = step_metrics(step, metrics, positions, dt, flops_token, peak_flops)
    history.append(m)
    if writer is not None and (step % log_every == 0 or step == num_steps - 1):
      writer.write(step, m)
    bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_sec']:.0f}")
    for hook in hooks:
      hook(step, m)

  stopped = False
  vote = StopVote() if jax.process_count() > 1 else None
  with StopSignal() as stop:
    for step in range(start, num_steps):
      batch = batcher.global_batch(step, batch_sharding)
      if before_step is not None:
        state = before_step(step, state)
      state, metrics = step_fn(state, batch)
      if pending is not None:
        now = time.perf_counter()
        consume(*pending, now - t_last)
        t_last = now
      pending = (step, metrics, sum(x.size for k, x in traverse_util.flatten_dict(batch).items() if k[-1] == "tokens"))
      bar.update(1)
      done = step + 1
      if vote is None:
        stopped = stop.received is not None
      else:  # every process must stop at the same step, or the others hang in a collective
        stopped = vote.cast(stop.received is not None)
      if checkpointer is not None and (stopped or checkpointer.should_save(done)):
        if pending is not None:  # never checkpoint a state whose loss we have not checked
          jax.block_until_ready(metrics)
          now = time.perf_counter()
          consume(*pending, now - t_last)
          t_last, pending = now, None
        checkpointer.save(done, save_state(state), {"step": done, "data_position": done})
      if stopped:
        break
    if pending is not None:
      jax.block_until_ready(pending[1])
      consume(*pending, time.perf_counter() - t_last)
  bar.close()
  return state, history, stopped
