"""The stage runner: one contract for every training stage of every defence and pipeline.

A `StageSpec` says what to train (the model it starts from, the data, the loss, optimiser overrides, a
frozen model for the step, method state); `run_stage` trains it on the shared train step, checkpoints and
resumes it, exports workdir/<stage>/model and returns a `StageResult`. A finished stage (its exported
model exists) is reused, not retrained. A stage interrupted by SIGTERM/SIGINT raises `Stopped` after its
checkpoint is saved: the one way a stage says it stopped.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from flax import nnx

from reft_jax import distributed as dist
from reft_jax.checkpoint import Checkpointer
from reft_jax.config import buckets, with_updates
from reft_jax.data import sft
from reft_jax.data.load import load
from reft_jax.files import write_atomic
from reft_jax.losses import make_lm_loss
from reft_jax.metrics import MetricWriter
from reft_jax.model import Transformer, save_hf
from reft_jax.model.build import build_model
from reft_jax.optim import make_optimizer
from reft_jax.train import (
  NonFiniteLoss,
  batch_shardings,
  flops_per_token,
  init_train_state,
  jit_step,
  make_train_step,
  split_model,
  train_loop,
  trainable_subset,
  with_trainable,
)

log = logging.getLogger(__name__)


class Stopped(Exception):
  """A stage was interrupted by SIGTERM/SIGINT; its checkpoint is saved and a rerun resumes it."""


@dataclasses.dataclass
class MethodState:
  """A method's extra train state (TrainState.extras), how a step's aux updates it, and a host-side
  hook run before every step (train.make_train_step / train_loop)."""

  extras: dict | None = None
  update: Callable | None = None  # (extras, aux) -> (extras, aux), inside the jitted step
  before_step: Callable | None = None  # (step, state) -> state, on the host


@dataclasses.dataclass
class StageSpec:
  """One training stage.

  init: the HF directory it starts from ("" = the config's model: model.hf_path, or a random init).
  data: a TokenizedSet, or a MixedBatcher of named parts. loss: loss(model, batch, ctx) -> (sum, count,
  aux) (default: the LM loss). train: overrides of c.train (e.g. the alignment budget, teacher.*).
  frozen: a model passed into every step as ctx.frozen (a teacher): sharded like the trained one, never
  optimised or checkpointed. setup(model) -> MethodState: method state from the initial model.
  finish(model, extras): artefacts written after training, before the export. record: fields for
  results.json.
  """

  name: str
  data: Any
  init: str = ""
  loss: Callable | None = None
  train: dict = dataclasses.field(default_factory=dict)
  frozen: Transformer | None = None
  setup: Callable[[Transformer], MethodState] | None = None
  finish: Callable[[Transformer, dict], None] | None = None
  record: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class StageResult:
  model_dir: str
  history: list  # per-step metrics ([] when the stage was reused)
  model: Transformer | None = None  # the trained model (None when reused)


@dataclasses.dataclass
class Env:
  """What every stage of one run shares: the config, the mesh, the tokenizer, the base model and the
  directory of the stages shared across cells (alignment stages, teachers)."""

  c: ml_collections.ConfigDict
  mesh: Any
  rules: Any
  tokenizer: Any
  base_path: str
  shared_dir: str

  def load(self, spec: str, limit: int = 0) -> list[sft.Example]:
    return load(self.c, spec, limit)

  def tokenize(self, examples: list[sft.Example], seq_len: int = 0) -> sft.TokenizedSet:
    return sft.tokenize(examples, self.tokenizer, seq_len or self.c.data.seq_len, self.c.data.template)


def model_dir(root: str, stage: str) -> str:
  """Where a stage exports its final model (a HF directory)."""
  return os.path.join(root, stage, "model")


def finished(root: str, stage: str) -> bool:
  # save_hf writes config.json last, so its presence means the stage finished.
  return os.path.exists(os.path.join(model_dir(root, stage), "config.json"))


def stage_seconds(*roots: str) -> dict[str, float]:
  """{stage: wall seconds} from the summary.json of every stage directory under the roots (a stage reused
  from an earlier run reports that run's time): results.json's per-stage timing line."""
  out = {}
  for root in dict.fromkeys(roots):
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else ():
      path = os.path.join(root, name, "summary.json")
      if os.path.isfile(path):
        with open(path) as f:
          seconds = json.load(f).get("wall_seconds")
        if isinstance(seconds, (int, float)):
          out[name] = round(float(seconds), 1)
  return out


def reusable_work(workdir: str) -> list[str]:
  """What a rerun in workdir reuses instead of redoing: finished stages (<stage>/model) and checkpoints
  (<stage>/checkpoints/<step>), as paths under workdir (a cell's stages one level down)."""
  out = []
  for path, dirs, files in os.walk(workdir):
    rel = os.path.relpath(path, workdir)
    depth = 0 if rel == "." else rel.count(os.sep) + 1
    if os.path.basename(path) == "model" and depth >= 2 and "config.json" in files:
      out.append(rel)
    if os.path.basename(path) == "checkpoints":
      out += [os.path.join(rel, d) for d in sorted((d for d in dirs if d.isdigit()), key=int)]
    if depth >= 3 or os.path.basename(path) in ("model", "checkpoints", "tensorboard", "eval"):
      dirs[:] = []  # <cell>/<stage>/<model|checkpoints> is as deep as stages go
  return sorted(out)


_ON_START: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar("on_start", default=None)


@contextlib.contextmanager
def on_first_start(fn: Callable[[], None]):
  """Runs fn() once, when the first stage of this run starts training (main writes config.json then, so a run
  that fails before any training, or reuses every stage, leaves the saved one as it was)."""
  done = []

  def once():
    if not done:
      done.append(True)
      fn()

  token = _ON_START.set(once)
  try:
    yield
  finally:
    _ON_START.reset(token)


def run_stage(env: Env, root: str, spec: StageSpec) -> StageResult:
  """Trains `spec` under root/<name> (or reuses it when finished); raises Stopped on a signal."""
  if finished(root, spec.name):
    return StageResult(model_dir(root, spec.name), [])
  if _ON_START.get() is not None:
    _ON_START.get()()
  c = with_updates(
    env.c, **({"model.hf_path": spec.init} if spec.init else {}), **{f"train.{k}": v for k, v in spec.train.items()}
  )
  model = build_model(c, env.mesh, env.rules, env.tokenizer)
  state = spec.setup(model) if spec.setup else MethodState()
  model, history, stopped, extras = train_stage(
    c,
    root,
    spec.name,
    model,
    spec.data,
    spec.loss or make_lm_loss(c.train.loss_chunk),
    env.mesh,
    env.rules,
    frozen=spec.frozen,
    extras=state.extras,
    update_extras=state.update,
    before_step=state.before_step,
  )
  if stopped:
    raise Stopped(spec.name)
  if spec.finish:
    spec.finish(model, extras)
  return StageResult(save_hf(model, model_dir(root, spec.name), env.tokenizer), history, model)


def train_stage(
  c: ml_collections.ConfigDict,
  workdir: str,
  stage: str,
  model: Transformer,
  data: sft.TokenizedSet | sft.MixedBatcher,
  loss_fn,
  mesh,
  rules,
  hooks=(),
  *,
  frozen: Transformer | None = None,
  extras: dict | None = None,
  update_extras=None,
  before_step=None,
):
  """The loop under run_stage: trains `model` with `loss_fn` on `data` under c.train; checkpoints to
  workdir/<stage>/checkpoints and resumes from there. hooks: train_loop's per-step callbacks.
  Returns (trained model, metrics history, stopped_by_signal, final TrainState.extras)."""
  t = c.train
  stage_dir = os.path.join(workdir, stage)
  graphdef, params = split_model(model)
  optim_keys = ("lr", "num_steps", "warmup_steps", "schedule", "weight_decay", "grad_clip", "b1", "b2", "mode")
  tx, schedule, labels = make_optimizer(params, **{k: t[k] for k in optim_keys}, trainable_regex=t.trainable_regex)
  state, state_sh = init_train_state(params, tx, mesh, extras)
  batcher, seq_len = _batcher(c, data)
  batch_sh = batch_shardings(batcher.local_batch(0), mesh, rules)
  frozen_graphdef, frozen_params = split_model(frozen) if frozen is not None else (None, None)
  step = make_train_step(graphdef, tx, loss_fn, schedule, labels, t.grad_accum, frozen_graphdef, update_extras)
  if frozen is None:
    step_fn = jit_step(step, state_sh, batch_sh, mesh, None, rules)
  else:  # the frozen model rides along as an argument: sharded like the student, never donated
    jitted = jit_step(step, state_sh, batch_sh, mesh, jax.tree.map(lambda x: x.sharding, frozen_params), rules)
    step_fn = lambda s, b: jitted(s, b, frozen_params)
  ckpt = Checkpointer(
    os.path.join(stage_dir, "checkpoints"), c.checkpoint.every_steps, c.checkpoint.max_to_keep, c.checkpoint.async_save
  )
  state = _resume(ckpt, state, labels, stage)
  writer = MetricWriter(stage_dir, tensorboard=c.log.tensorboard)
  start = time.perf_counter()
  try:
    state, history, stopped = train_loop(
      state,
      step_fn,
      batcher,
      batch_sh,
      num_steps=t.num_steps,
      writer=writer,
      checkpointer=ckpt,
      save_state=lambda s: trainable_subset(s, labels),
      log_every=c.log.every_steps,
      flops_token=flops_per_token(model.cfg, seq_len),
      peak_flops=c.log.peak_flops,
      hooks=hooks,
      progress=c.log.progress,
      before_step=before_step,
    )
    if not stopped:
      ckpt.save(t.num_steps, trainable_subset(state, labels), {"step": t.num_steps, "data_position": t.num_steps})
  except NonFiniteLoss as e:  # the state that step started from is finite but leads nowhere: not a resume point
    ckpt.discard(e.step, f"holds the state whose next step was not finite (step {e.step})")
    raise
  finally:
    ckpt.close()
    writer.close()
  if history:
    _write_summary(stage_dir, stage, t.num_steps, history, time.perf_counter() - start, stopped)
  return nnx.merge(graphdef, state.params), history, stopped, state.extras


def _resume(ckpt: Checkpointer, state, labels: dict, stage: str):
  """The state from the newest checkpoint that restores (unchanged when there is none)."""
  try:
    restored = ckpt.restore_latest(trainable_subset(state, labels))
  except ValueError:
    ckpt.close()
    raise
  if restored is None:
    return state
  step, subset, meta = restored
  log.info("%s: resumed from step %d (data position %s)", stage, step, meta["data_position"])
  return with_trainable(state, subset)


def _batcher(c, data) -> tuple:
  """(batcher, padded length): one TokenizedSet batched by c.train.batch_size, or a MixedBatcher as it is."""
  if isinstance(data, sft.TokenizedSet):
    return sft.Batcher(data, c.train.batch_size, seed=c.seed, buckets=buckets(c)), data.tokens.shape[1]
  return data, max(b.data.tokens.shape[1] for b in data.parts.values())


def _write_summary(stage_dir: str, stage: str, steps: int, history: list, seconds: float, stopped: bool):
  rates = sorted(h["tokens_per_sec"] for h in history[1:]) or [0.0]
  summary = {
    "stage": stage,
    "steps": steps,
    "final_loss": history[-1]["loss"],
    "wall_seconds": seconds,
    "tokens_per_sec": rates[len(rates) // 2],
    "stopped_by_signal": stopped,
  }
  if dist.is_primary():
    write_atomic(os.path.join(stage_dir, "summary.json"), json.dumps(summary, indent=2))
