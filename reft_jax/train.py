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
from reft_jax.optim import TRAINABLE


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict  # pure nested dict of arrays (nnx.to_pure_dict of the model's state)
  opt_state: Any


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


def init_train_state(params: dict, tx: optax.GradientTransformation, mesh) -> tuple[TrainState, Any]:
  """The train state and its shardings; optimizer moments are born sharded like their params."""
  opt_sh = opt_state_shardings(jax.eval_shape(tx.init, params), params, mesh)
  opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
  state = TrainState(jax.device_put(jnp.zeros((), jnp.int32), shd.replicated(mesh)), params,
                     opt_state)
  return state, jax.tree.map(lambda x: x.sharding, state)


def _microbatches(batch: dict, n: int) -> dict:
  # Strided split (row j goes to micro-batch j % n) keeps every micro-batch spread over all
  # data-parallel devices instead of living on the first few.
  def split(x):
    if x.shape[0] % n:
      raise ValueError(f"batch size {x.shape[0]} is not divisible by grad_accum={n}")
    return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def make_train_step(graphdef, tx, loss_fn: Callable, schedule, labels: dict, grad_accum: int = 1):
  """Builds the pure step; call `jit_step` on it to compile with shardings and donation."""

  def loss_sum(params, batch):
    total, count, aux = loss_fn(nnx.merge(graphdef, params), batch)
    return total, (count, aux)

  grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

  def train_step(state: TrainState, batch: dict):
    if grad_accum == 1:
      (total, (count, aux)), grads = grad_fn(state.params, batch)
    else:
      def body(carry, mb):
        (t, (c, a)), g = grad_fn(state.params, mb)
        acc_t, acc_c, acc_g, acc_a = carry
        return (acc_t + t, acc_c + c, jax.tree.map(jnp.add, acc_g, g),
                jax.tree.map(jnp.add, acc_a, a)), None

      mbs = _microbatches(batch, grad_accum)
      (_, (_, aux0)), _ = jax.eval_shape(grad_fn, state.params, jax.tree.map(lambda x: x[0], mbs))
      zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.params),
               jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), aux0))
      (total, count, grads, aux), _ = jax.lax.scan(body, zeros, mbs)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)  # mean over all response tokens of the batch
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    trainable = jax.tree.map(lambda g, l: g if l == TRAINABLE else jnp.zeros(()), grads, labels)
    metrics = {"loss": total / denom, "loss_tokens": count,
               "tokens": jnp.sum(batch["attention_mask"]).astype(jnp.float32),
               "grad_norm": optax.global_norm(trainable),
               "lr": schedule(state.step), **aux}
    return TrainState(state.step + 1, params, opt_state), metrics

  return train_step


def jit_step(step_fn, state_shardings, batch_sharding, mesh):
  return jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, shd.replicated(mesh)), donate_argnums=0)


# ---------------------------------------------------------------- checkpointed subset of the state

def trainable_subset(state: TrainState, labels: dict) -> dict:
  """What a checkpoint holds: step, trainable parameters and optimizer state (frozen weights are
  rebuilt from their source, e.g. the base checkpoint, so a LoRA checkpoint stays small)."""
  flat_p = traverse_util.flatten_dict(state.params)
  flat_l = traverse_util.flatten_dict(labels)
  params = {k: v for k, v in flat_p.items() if flat_l[k] == TRAINABLE}
  return {"step": state.step, "params": traverse_util.unflatten_dict(params),
          "opt_state": state.opt_state}


def with_trainable(state: TrainState, subset: dict) -> TrainState:
  flat = traverse_util.flatten_dict(state.params)
  flat.update(traverse_util.flatten_dict(subset["params"]))
  return TrainState(subset["step"], traverse_util.unflatten_dict(flat), subset["opt_state"])


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
  pass


def flops_per_token(model_cfg, seq_len: int) -> float:
  """Training FLOPs per token: 6 N (matmuls, fwd+bwd) + 12 L T D_attn (attention scores)."""
  n = model_cfg.num_params(include_embeddings=False) + model_cfg.vocab_size * model_cfg.hidden_size
  attn = 12 * model_cfg.num_layers * seq_len * model_cfg.num_heads * model_cfg.head_dim
  return 6.0 * n + attn


def train_loop(state, step_fn, batcher, batch_sharding, *, num_steps: int, writer=None,
               checkpointer=None, save_state=None, log_every: int = 1, flops_token: float = 0.0,
               peak_flops: float = 0.0, hooks=(), progress: bool = True):
  """Runs steps state.step .. num_steps-1.

  Metrics of step t are fetched after step t+1 is dispatched, so the host never stalls the device.
  Returns (state, history, stopped_by_signal). `save_state(state)` gives the tree to checkpoint.
  """
  from tqdm.auto import tqdm

  start = int(jax.device_get(state.step))
  history: list[dict] = []
  pending = None
  t_last = time.perf_counter()
  bar = tqdm(total=num_steps, initial=start, disable=not progress or jax.process_index() != 0,
             desc="train", mininterval=1.0)

  def consume(step, metrics, positions, dt):
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not math.isfinite(m["loss"]):
      raise NonFiniteLoss(f"loss became {m['loss']} at step {step}; stopping without saving "
                          "(the last checkpoint is intact). Lower train.lr or check the data.")
    m["step"] = step
    m["tokens_per_sec"] = m["tokens"] / dt if dt > 0 else 0.0  # real (non-padding) tokens
    # FLOPs are spent on every position, padding included.
    flops = flops_token * positions / dt if dt > 0 else 0.0
    m["tflops_per_sec"] = flops / 1e12
    if peak_flops:
      m["mfu"] = flops / (peak_flops * jax.device_count())
    history.append(m)
    if writer is not None and (step % log_every == 0 or step == num_steps - 1):
      writer.write(step, m)
    bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_sec']:.0f}")
    for hook in hooks:
      hook(step, m)

  stopped = False
  with StopSignal() as stop:
    for step in range(start, num_steps):
      batch = batcher.global_batch(step, batch_sharding)
      state, metrics = step_fn(state, batch)
      if pending is not None:
        now = time.perf_counter()
        consume(*pending, now - t_last)
        t_last = now
      pending = (step, metrics, batch["tokens"].size)
      bar.update(1)
      done = step + 1
      if stop.received is not None:
        stopped = True
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


def host_params(params: dict) -> dict:
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params)
