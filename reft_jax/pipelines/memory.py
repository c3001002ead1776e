"""Per-device memory of one training step: the accelerators, what a step holds (`StageSpec`), and its
bytes (exact from shapes and shardings, analytic estimates, XLA's compiled memory analysis). The plan
pipeline (plan.py) builds the specs from a config and prints the table."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, traverse_util
from jax.sharding import AbstractMesh, AxisType

from reft_jax import sharding as shd
from reft_jax.model import ModelConfig, RunOptions, abstract_model

GiB = 2**30
STAGES = ("sft", "teacher", "student")
FIT_FRACTION = 0.9  # above this share of HBM a plan is "tight": allocator fragmentation, runtime buffers


@dataclasses.dataclass(frozen=True)
class Hardware:
  name: str
  devices: int
  hbm_bytes: int  # per device
  label: str


HARDWARE = {
  h.name: h
  for h in (
    Hardware("v4-8", 4, 32 * GiB, "TPU v4-8: 4 chips x 32 GiB"),
    Hardware("v5e-8", 8, 16 * GiB, "TPU v5e-8: 8 chips x 16 GiB"),
    Hardware("v5p-8", 4, 95 * GiB, "TPU v5p-8: 4 chips x 95 GiB"),
    Hardware("h100", 1, 80 * GiB, "1 x H100 80 GB"),
    Hardware("8xh100", 8, 80 * GiB, "8 x H100 80 GB"),
  )
}


def parse_hardware(spec: str) -> list[Hardware]:
  """'all' or comma-separated names; an unknown name fails with one line naming it."""
  names = list(HARDWARE) if spec.strip() == "all" else [s.strip() for s in spec.split(",") if s.strip()]
  bad = [n for n in names if n not in HARDWARE] or ([] if names else [spec])
  if bad:
    raise ValueError(
      f"config.plan.hardware={spec!r}: unknown hardware {bad[0]!r}; use 'all' or "
      f"comma-separated names from {tuple(HARDWARE)}"
    )
  return [HARDWARE[n] for n in names]


# ---------------------------------------------------------------- what one step holds


@dataclasses.dataclass(frozen=True)
class StageSpec:
  """One training stage's step: the model, what trains, the batch and the losses' settings."""

  label: str  # e.g. the preset
  model: ModelConfig
  options: RunOptions
  mode: str  # full | lora | regex
  stage: str  # sft | teacher | student
  parts: tuple[tuple[str, int, int], ...]  # batch parts (name, global batch, length); "" = a flat batch
  grad_accum: int = 1
  loss_chunk: int = 0  # > 0: LM head + loss over this many positions at a time (train.loss_chunk)
  trainable_regex: str = ""
  teacher: RunOptions | None = None  # student stage: the frozen teacher in the step (None: cached top-k)
  topk: int = 0
  layer: int = 0  # teacher stage: the refusal-feature layer
  optim: tuple[tuple[str, Any], ...] = ()  # make_optimizer keywords that shape its state

  @property
  def micro_parts(self) -> tuple[tuple[str, int, int], ...]:
    """The parts of one micro-batch (every part runs through the trained model)."""
    return tuple((name, b // self.grad_accum, t) for name, b, t in self.parts)


# ---------------------------------------------------------------- exact per-device bytes


def abstract_mesh(sizes: tuple[int, int, int]) -> AbstractMesh:
  """A mesh of the hardware's shape without its devices: enough for shard shapes."""
  return AbstractMesh(tuple(sizes), shd.MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def _with_shardings(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_params(cfg: ModelConfig, options: RunOptions, mesh, rules) -> tuple[nnx.GraphDef, dict]:
  """(graphdef, pure dict of ShapeDtypeStructs carrying their NamedShardings on `mesh`)."""
  graphdef, state = nnx.split(abstract_model(cfg, options))
  return graphdef, _with_shardings(nnx.to_pure_dict(state), shd.state_shardings(state, mesh, rules))


def abstract_train_state(spec: StageSpec, mesh, rules):
  """(graphdef, TrainState of ShapeDtypeStructs with shardings, optimizer, schedule, labels), built
  with the same functions as stages.train_stage."""
  from reft_jax.optim import make_optimizer
  from reft_jax.train import TrainState, opt_state_shardings

  graphdef, params = abstract_params(spec.model, spec.options, mesh, rules)
  tx, sched, labels = make_optimizer(
    params, lr=1e-4, num_steps=100, mode=spec.mode, trainable_regex=spec.trainable_regex, **dict(spec.optim)
  )
  bare = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  opt = jax.eval_shape(tx.init, bare)
  opt = _with_shardings(opt, opt_state_shardings(opt, params, mesh))
  rep = shd.replicated(mesh)
  extras = (
    {"R": jax.ShapeDtypeStruct((spec.model.hidden_size,), jnp.float32, sharding=rep)} if spec.stage == "teacher" else {}
  )
  state = TrainState(jax.ShapeDtypeStruct((), jnp.int32, sharding=rep), params, opt, extras)
  return graphdef, state, tx, sched, labels


def shard_bytes(x) -> int:
  """Bytes of one (abstract or real) array on one device: its shard's size (the full size when
  replicated)."""
  return x.dtype.itemsize * math.prod(x.sharding.shard_shape(x.shape))


def tree_bytes(tree) -> int:
  return sum(shard_bytes(x) for x in jax.tree.leaves(tree))


def exact_bytes(spec: StageSpec, mesh, rules) -> dict[str, int]:
  """Per-device bytes of what the step holds between steps: parameters (LoRA separately), the frozen
  teacher and the optimizer state."""
  from reft_jax.optim import TRAINABLE

  _, state, _, _, labels = abstract_train_state(spec, mesh, rules)
  flat = traverse_util.flatten_dict(state.params)
  flat_labels = traverse_util.flatten_dict(labels)
  teacher = 0
  if spec.teacher is not None:
    teacher = tree_bytes(abstract_params(spec.model, spec.teacher, mesh, rules)[1])
  return {
    "params": sum(shard_bytes(x) for x in flat.values()),
    "lora": sum(shard_bytes(x) for k, x in flat.items() if k[-1] in ("lora_a", "lora_b")),
    "trainable": sum(shard_bytes(x) for k, x in flat.items() if flat_labels[k] == TRAINABLE),
    "teacher": teacher,
    "opt": tree_bytes(state.opt_state),
  }


# ---------------------------------------------------------------- analytic estimates


def _split(n: int, k: int) -> int:
  # A dimension over k devices when k divides it, else replicated (as sharding.logical_to_spec does).
  return n // k if k > 1 and n % k == 0 else n


def layer_activations(
  cfg: ModelConfig, b: int, t: int, c: int, tp: int, lora_rank: int = 0, lora_targets: int = 0, flash: bool = False
) -> dict[str, int]:
  """Bytes one decoder layer keeps for its backward pass, per remat policy, for b sequences of t
  tokens on one device (c: compute dtype bytes; heads and the MLP split over `tp` tensor devices):

    full           x                                   the layer's input (the scan carry)
    dots_no_batch  x + proj                            + the outputs of q, k, v, o, gate, up, down (and
                                                       the LoRA down-projections)
    dots           x + proj + scores                   + the attention einsums: f32 scores b*H*t*t*4
                                                       and probs @ v
    none           x + proj + scores + rest            + f32 norm inputs, f32 RoPE copies, softmax
                                                       probs, the MLP activation and product
  (flash: a fused attention kernel keeps no t x t matrices.)
  """
  d, f, hd = cfg.hidden_size, _split(cfg.intermediate_size, tp), cfg.head_dim
  h, kv = _split(cfg.num_heads, tp), _split(cfg.num_kv_heads, tp)
  n = b * t
  quad = 0 if flash else b * h * t * t
  x = n * d * c
  proj = n * c * ((h + 2 * kv) * hd + d + 2 * f + d + lora_rank * lora_targets)
  scores = quad * 4 + n * h * hd * c
  norms = 4 if cfg.sandwich_norms else 2
  rest = n * d * norms * (4 + c) + n * (h + kv) * hd * (4 + c) + quad * (4 + c) + 2 * n * f * c
  return {"full": x, "dots_no_batch": x + proj, "dots": x + proj + scores, "none": x + proj + scores + rest}


def logits_bytes(cfg: ModelConfig, n: int, c: int, tp: int) -> int:
  """The [n, V] logits in the compute dtype, their f32 log-softmax and its f32 gradient (the
  teacher's: its f32 log-softmax and probabilities); + an f32 copy under a final soft-cap."""
  return n * _split(cfg.vocab_size, tp) * (c + 8 + 4 * bool(cfg.final_logit_softcap))


def _per_device(batch: int, dp: int) -> int:
  return -(-batch // dp)


def activation_bytes(spec: StageSpec, sizes: tuple[int, int, int]) -> int:
  """act = sum over the batch parts that train (per device: b = batch / (data*fsdp) sequences of T):
    L * layer_activations[remat] + 2 * layer_activations['none'] (one layer recomputed and
    differentiated at a time) + logits_bytes
  + the student stage's teacher (forward only, in its own dtype): one layer's working set + logits."""
  cfg, o = spec.model, spec.options
  data, fsdp, tp = sizes
  c = jnp.dtype(o.dtype).itemsize
  flash = getattr(o, "attention", "einsum") in ("cudnn", "splash")
  lora = (o.lora.rank, len(o.lora.targets)) if o.lora else (0, 0)
  total = 0
  for name, batch, t in spec.micro_parts:
    b = _per_device(batch, data * fsdp)
    head = b * (min(spec.loss_chunk, t) if spec.loss_chunk > 0 else t)  # positions with live logits
    layer = layer_activations(cfg, b, t, c, tp, *lora, flash=flash)
    total += cfg.num_layers * layer[o.remat] + 2 * layer["none"] + logits_bytes(cfg, head, c, tp)
    if name == "align" and spec.teacher is not None:
      ct = jnp.dtype(spec.teacher.dtype).itemsize
      total += layer_activations(cfg, b, t, ct, tp)["none"] + logits_bytes(cfg, head, ct, tp)
  return total


def _layer_and_rest_bytes(cfg: ModelConfig, options: RunOptions, tp: int, dtype_bytes: int):
  """(one layer's weights, the other weights: embeddings, head, norms), gathered over data/fsdp and
  split over tensor only, in `dtype_bytes` per element."""
  _, params = abstract_params(cfg, options, abstract_mesh((1, 1, tp)), None)
  layer = rest = 0
  for k, x in traverse_util.flatten_dict(params).items():
    elems = math.prod(x.sharding.shard_shape(x.shape))
    if k[0] == "blocks":
      layer += elems // cfg.num_layers * dtype_bytes
    else:
      rest += elems * dtype_bytes
  return layer, rest


def gather_bytes(spec: StageSpec, sizes: tuple[int, int, int]) -> int:
  """FSDP working copies: the running layer's weights all-gathered (param dtype, when data*fsdp > 1)
  and cast (compute dtype, when it differs), twice (forward and backward, or the prefetched next
  layer), and the embedding/head once; the teacher's forward adds its own layer and embedding."""
  data, fsdp, tp = sizes
  total = 0
  for options, twice in ((spec.options, 2), (spec.teacher, 1)):
    if options is None:
      continue
    p, c = jnp.dtype(options.param_dtype).itemsize, jnp.dtype(options.dtype).itemsize
    per_elem = p * (data * fsdp > 1) + c * (c != p)
    if per_elem:
      layer, rest = _layer_and_rest_bytes(spec.model, options, tp, 1)
      total += (twice * layer + rest) * per_elem
  return total


def grad_bytes(spec: StageSpec, sizes: tuple[int, int, int], trainable: int) -> int:
  """The gradients and the optimizer's update tree (2 x the trainable parameters per device); full
  fine-tuning also holds one layer's full gradient before its reduce-scatter over data/fsdp."""
  data, fsdp, tp = sizes
  extra = 0
  if spec.mode == "full" and data * fsdp > 1:
    p = jnp.dtype(spec.options.param_dtype).itemsize
    extra = _layer_and_rest_bytes(spec.model, spec.options, tp, p)[0]
  return 2 * trainable + extra


# ---------------------------------------------------------------- the compiled step


def abstract_batch(spec: StageSpec, mesh, rules) -> dict:
  """ShapeDtypeStructs of the batch the stage's batcher yields, sharded over the batch axes."""

  def part(name, b, t):
    shapes = {"tokens": (b, t), "loss_mask": (b, t), "attention_mask": (b, t)}
    if spec.stage == "teacher":
      shapes.update(last_prompt=(b,), is_harmful=(b,))
    out = {
      k: jax.ShapeDtypeStruct(s, jnp.int32, sharding=shd.batch_sharding(mesh, rules, len(s))) for k, s in shapes.items()
    }
    if name == "align" and spec.topk > 0:
      sh = shd.batch_sharding(mesh, rules, 3)
      out["topk_logits"] = jax.ShapeDtypeStruct((b, t, spec.topk), jnp.float32, sharding=sh)
      out["topk_ids"] = jax.ShapeDtypeStruct((b, t, spec.topk), jnp.int32, sharding=sh)
    return out

  if spec.parts[0][0] == "":
    return part(*spec.parts[0])
  return {name: part(name, b, t) for name, b, t in spec.parts}


def _loss(spec: StageSpec):
  """The stage's loss and extras update, as the methods build them (beta/lam/... do not change memory)."""
  from reft_jax.losses import make_lm_loss
  from reft_jax.defences import reft

  if spec.stage == "sft":
    return make_lm_loss(spec.loss_chunk), None
  if spec.stage == "teacher":
    return reft.teacher_loss(spec.layer, 1.0), reft.ema_update(0.0)
  return reft.student_loss(1.0, 1.0, spec.topk > 0, spec.loss_chunk), None


def compiled_bytes(spec: StageSpec, mesh, rules) -> dict[str, float]:
  """Lowers and compiles the real train step (train.make_train_step + jit_step, state donated) from
  abstract arguments on `mesh`'s devices; returns XLA's per-device memory analysis and the time."""
  from reft_jax.train import jit_step, make_train_step

  start = time.perf_counter()
  graphdef, state, tx, sched, labels = abstract_train_state(spec, mesh, rules)
  batch = abstract_batch(spec, mesh, rules)
  loss_fn, update_extras = _loss(spec)
  frozen_graphdef = frozen = frozen_sh = None
  if spec.teacher is not None:
    frozen_graphdef, frozen = abstract_params(spec.model, spec.teacher, mesh, rules)
    frozen_sh = jax.tree.map(lambda x: x.sharding, frozen)
  step = make_train_step(graphdef, tx, loss_fn, sched, labels, spec.grad_accum, frozen_graphdef, update_extras)
  sh = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
  jitted = jit_step(step, sh(state), sh(batch), mesh, frozen_sh, rules)
  args = (state, batch) if frozen is None else (state, batch, frozen)
  lowered = jitted.lower(*args)
  lowered_at = time.perf_counter()
  m = lowered.compile().memory_analysis()
  out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp", "generated_code")}
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  out["seconds"] = time.perf_counter() - start
  out["compile_seconds"] = time.perf_counter() - lowered_at  # XLA alone (what a compilation cache skips)
  return out


def cpu_devices(n: int) -> list | None:
  """n CPU devices to compile on, or None when fewer exist (see `ensure_cpu_devices`)."""
  try:
    devices = jax.devices("cpu")
  except RuntimeError:
    return None
  return devices[:n] if len(devices) >= n else None


def ensure_cpu_devices(n: int) -> None:
  """Asks for n simulated CPU devices; only possible before JAX starts its backends (otherwise the
  compiled columns of larger meshes stay empty, with a note)."""
  forced = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
  if forced and int(forced.group(1)) >= n:
    return
  try:
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError:  # the backends already started: compile where enough devices exist
    pass
