"""Memory plans: what one training step needs per device on a given accelerator, before renting it.

  python -m reft_jax plan --config=configs/default.py:llama2_7b --workdir=/tmp/plan \
      [--config.plan.hardware=v5e-8] [--config.plan.stage=student] [--config.plan.compile=False]
  python benchmarks/memory_plans.py              # every 7B-class preset x every hardware, one table

Each hardware's devices form the configured mesh (mesh.data/fsdp/tensor, -1 = the rest: fsdp over
all devices by default). Per device:

  exact, from jax.eval_shape (abstract model and optimizer state) and the sharding rules' shard shapes:
    params   the trained model: frozen base + LoRA adapters (LoRA also on its own column)
    teacher  ReFT's student stage: the frozen teacher passed into every step (merged, no LoRA, loaded
             as reft.run loads it, experiment.load_frozen: compute dtype, layers scanned as configured)
    opt      optimizer state: Adam's moments of the trainable parameters (frozen ones keep none)
  analytic (estimates, formulas in `activation_bytes` / `gather_bytes` / `grad_bytes`):
    grads    the gradients and the optimizer's updates of the trainable parameters (2 copies); full
             fine-tuning adds one gathered layer's gradient before its reduce-scatter
    act      activations kept for the backward pass under the remat policy, one layer's working set
             and the logits (see `activation_bytes`)
    gather   FSDP: the weights of the running layer all-gathered and cast to the compute dtype
  compiled, from XLA's memory_analysis of the real jitted train step lowered from abstract arguments
  (nothing is allocated) on simulated CPU devices:
    temp     temporary buffers: everything that is neither an argument nor an output
    peak     arguments + outputs - donated (aliased) + temp
  XLA:CPU is a proxy for TPU/GPU: its fusion and scheduling differ, and it may keep f32 copies around
  bf16 ops. The verdict uses the compiled peak when there is one, else the analytic total.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from jax.sharding import AbstractMesh, AxisType

from reft_jax import sharding as shd
from reft_jax.model import PRESETS, ModelConfig, RunOptions, abstract_model

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


def model_config(c) -> ModelConfig:
  """The architecture: a local HF directory's config.json, else the `model.arch` preset (a hub name in
  model.hf_path is not downloaded for a plan)."""
  path = os.path.expanduser(c.model.hf_path)
  if path and os.path.exists(os.path.join(path, "config.json")):
    from reft_jax.model import read_hf_config

    return read_hf_config(path)
  return PRESETS[c.model.arch]


def stage_spec(c, mode: str | None = None, stage: str | None = None, label: str = "") -> StageSpec:
  """The StageSpec of config `c` (train.* / teacher.* / reft.* / data.seq_len), as the methods build it;
  alignment batches are planned at their length cap (a real batch is trimmed to its longest example)."""
  import ml_collections

  from reft_jax import config as config_lib
  from reft_jax.methods.suite import with_updates

  stage = stage or plan_stages(c)[0]
  t = c.train
  if stage == "teacher":  # c.train with the teacher's own overrides, as reft.teacher_train_config
    t = ml_collections.ConfigDict({**c.train.to_dict(), **c.teacher.to_dict()})
  mode = mode or t.mode
  options = config_lib.run_options(with_updates(c, **{"train.mode": mode}))
  align_len = c.reft.get("align_seq_len", 0) or c.data.seq_len  # as reft.align_seq_len
  if stage == "sft":
    parts = (("", t.batch_size, c.data.seq_len),)
  elif stage == "teacher":
    half = max(t.batch_size // 2, 1)
    parts = (("harmful", half, align_len), ("harmless", half, align_len))
  else:
    parts = (("user", t.batch_size, c.data.seq_len), ("align", c.reft.align_batch_size, align_len))
  cfg = model_config(c)
  optim = (("weight_decay", t.weight_decay), ("grad_clip", t.grad_clip), ("b1", t.b1), ("b2", t.b2))
  return StageSpec(
    label=label or _label(c),
    model=cfg,
    options=options,
    mode=mode,
    stage=stage,
    parts=parts,
    grad_accum=t.grad_accum,
    loss_chunk=t.get("loss_chunk", 0) if stage != "teacher" else 0,  # the teacher's loss is unchunked
    trainable_regex=t.trainable_regex,
    # reft.run loads the teacher with experiment.load_frozen: weights in the compute dtype, layers
    # scanned as configured, no LoRA, no remat
    teacher=(dataclasses.replace(options, param_dtype=options.dtype, lora=None, remat="none")
             if stage == "student" and c.reft.topk <= 0 else None),
    topk=c.reft.topk,
    layer=c.reft.layer or cfg.num_layers // 2,
    optim=optim,
  )


def _label(c) -> str:
  path = os.path.expanduser(c.model.hf_path)
  return os.path.basename(os.path.normpath(path)) if path and os.path.isdir(path) else c.model.arch


def plan_stages(c) -> list[str]:
  """plan.stage (comma-separated), or the method's heaviest stage: ReFT's student, else SFT."""
  from reft_jax import config as config_lib

  stages = config_lib.csv_list(c.plan.stage) or ["student" if c.method == "reft" else "sft"]
  bad = [s for s in stages if s not in STAGES]
  if bad:
    raise ValueError(
      f"config.plan.stage={c.plan.stage!r}: {bad[0]!r} is not one of {STAGES} (or '' for the method's)"
    )
  return stages


def plan_modes(c) -> list[str]:
  """plan.modes, or the config's train.mode plus full fine-tuning as the alternative row."""
  from reft_jax import config as config_lib
  from reft_jax.optim import MODES

  modes = config_lib.csv_list(c.plan.modes) or list(dict.fromkeys([c.train.mode, "full"]))
  bad = [m for m in modes if m not in MODES]
  if bad:
    raise ValueError(f"config.plan.modes={c.plan.modes!r}: {bad[0]!r} is not one of {MODES}")
  return modes


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
  with the same functions as experiment.train_stage."""
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
    {"R": jax.ShapeDtypeStruct((spec.model.hidden_size,), jnp.float32, sharding=rep)}
    if spec.stage == "teacher"
    else {}
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
  cfg: ModelConfig,
  b: int,
  t: int,
  c: int,
  tp: int,
  lora_rank: int = 0,
  lora_targets: int = 0,
  flash: bool = False,
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
      k: jax.ShapeDtypeStruct(s, jnp.int32, sharding=shd.batch_sharding(mesh, rules, len(s)))
      for k, s in shapes.items()
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
  from reft_jax.methods import reft

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
  step = make_train_step(
    graphdef, tx, loss_fn, sched, labels, spec.grad_accum, frozen_graphdef, update_extras
  )
  sh = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
  jitted = jit_step(step, sh(state), sh(batch), mesh, frozen_sh, rules)
  args = (state, batch) if frozen is None else (state, batch, frozen)
  lowered = jitted.lower(*args)
  lowered_at = time.perf_counter()
  m = lowered.compile().memory_analysis()
  out = {
    k: int(getattr(m, f"{k}_size_in_bytes"))
    for k in ("argument", "output", "alias", "temp", "generated_code")
  }
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


# ---------------------------------------------------------------- plans


def plan_row(
  spec: StageSpec,
  hw: Hardware,
  mesh_cfg: tuple[int, int, int],
  rules,
  compile: bool,
  cache: dict | None = None,
) -> dict:
  """One table row: exact, analytic and (optionally) compiled per-device bytes of `spec` on `hw`.
  `cache` shares compilations between hardware of the same mesh."""
  sizes = shd.mesh_shape(*mesh_cfg, hw.devices)
  dp = sizes[0] * sizes[1]
  for name, b, _ in spec.parts:  # the step's input is split over the batch axes: as in a real run
    if b % dp:
      raise ValueError(f"{name or 'the'} batch of {b} is not divisible by data*fsdp={dp}")
  exact = exact_bytes(spec, abstract_mesh(sizes), rules)
  analytic = {
    "grads": grad_bytes(spec, sizes, exact["trainable"]),
    "act": activation_bytes(spec, sizes),
    "gather": gather_bytes(spec, sizes),
  }
  total = exact["params"] + exact["teacher"] + exact["opt"] + sum(analytic.values())
  row = {
    "preset": spec.label,
    "hardware": hw.name,
    "mesh": "x".join(map(str, sizes)),
    "mode": spec.mode,
    "stage": spec.stage,
    **exact,
    **analytic,
    "total": total,
    "hbm": hw.hbm_bytes,
    "compiled": None,
    "note": "",
  }
  if compile:
    key = (spec, sizes, str(rules))
    if cache is not None and key in cache:
      row["compiled"] = dict(cache[key], seconds=0.0, reused=True)
    else:
      devices = cpu_devices(hw.devices)
      if devices is None:
        row["note"] = f"not compiled: needs {hw.devices} CPU devices (set jax_num_cpu_devices first)"
      else:
        row["compiled"] = compiled_bytes(spec, shd.make_mesh(*sizes, devices=devices), rules)
        if cache is not None:
          cache[key] = row["compiled"]
  need = row["compiled"]["peak"] if row["compiled"] else total
  row["use"] = need / hw.hbm_bytes
  row["fits"] = "yes" if row["use"] <= FIT_FRACTION else "tight" if row["use"] <= 1 else "no"
  return row


def plan_rows(
  specs: list[StageSpec], hardware: list[Hardware], mesh_cfg, rules, compile: bool = True, log=None
) -> tuple[list[dict], list[str]]:
  """Rows for every spec x hardware; hardware that cannot host the mesh or the batch is skipped with a
  note instead of failing the whole table."""
  rows, notes, cache = [], [], {}
  for spec in specs:
    for hw in hardware:
      what = f"{spec.label} {spec.stage} {spec.mode} on {hw.name}"
      try:
        row = plan_row(spec, hw, mesh_cfg, rules, compile, cache)
      except ValueError as e:
        notes.append(f"{what}: skipped ({e})")
        continue
      rows.append(row)
      if row["note"]:
        notes.append(f"{what}: {row['note']}")
      if log is not None:
        comp = row["compiled"] or {}
        how = (
          "analytic only"
          if not comp
          else "reused an identical step"
          if comp.get("reused")
          else (f"compiled in {comp['seconds']:.1f} s")
        )
        log(f"{what}: {how}")
  return rows, notes


COLUMNS = [
  ("preset", "preset"),
  ("hardware", "hardware"),
  ("mesh", "mesh d×f×t"),
  ("stage", "stage"),
  ("mode", "mode"),
  ("params", "params"),
  ("lora", "LoRA"),
  ("teacher", "teacher"),
  ("opt", "opt"),
  ("grads", "grads*"),
  ("act", "act*"),
  ("gather", "gather*"),
  ("total", "total*"),
  ("temp", "temp†"),
  ("peak", "peak†"),
  ("hbm", "HBM"),
  ("use", "use"),
  ("fits", "fits"),
]


def format_table(rows: list[dict]) -> str:
  """A markdown table; sizes in GiB (MiB when everything is small)."""
  big = max((r["total"] for r in rows), default=0) >= 0.1 * GiB
  unit, name = (GiB, "GiB") if big else (2**20, "MiB")

  def cell(r, key):
    comp = r["compiled"]
    v = comp.get(key) if key in ("temp", "peak") and comp else r.get(key)
    if v is None:
      return "—"
    if key == "use":
      return f"{100 * v:.0f}%"
    if isinstance(v, (int, float)):
      return f"{v / unit:.2f}"
    return str(v)

  lines = [
    f"per-device {name}; params/LoRA/teacher/opt: exact (eval_shape + shardings); "
    "*: analytic estimate; †: compiled (XLA:CPU memory_analysis, a proxy for TPU/GPU)",
    "| " + " | ".join(h for _, h in COLUMNS) + " |",
    "|" + "---|" * len(COLUMNS),
  ]
  for r in rows:
    lines.append("| " + " | ".join(cell(r, k) for k, _ in COLUMNS) + " |")
  return "\n".join(lines)


def describe(spec: StageSpec) -> str:
  o, cfg = spec.options, spec.model
  lora = f"LoRA r={o.lora.rank} on {','.join(o.lora.targets)}" if o.lora else "no LoRA"
  parts = " + ".join(f"{b}{' ' + n if n else ''} x {t}" for n, b, t in spec.parts)
  extra = f", loss_chunk={spec.loss_chunk}" if spec.loss_chunk > 0 else ""
  if spec.stage == "student":
    extra += (
      f"; teacher forward in the step ({spec.teacher.dtype}, "
      f"{'scanned' if spec.teacher.scan_layers else 'unscanned'})"
      if spec.teacher
      else f"; cached teacher top-{spec.topk}"
    )
  return (
    f"{spec.label}: {cfg.family}, {cfg.num_params() / 1e9:.2f}B params, {spec.stage} stage, batch "
    f"{parts} tokens (grad_accum {spec.grad_accum}), {o.dtype} compute / {o.param_dtype} params, "
    f"remat={o.remat}, scan_layers={o.scan_layers}, attention={getattr(o, 'attention', 'einsum')}, "
    f"{lora}{extra}"
  )


FOOTER = (
  f"fits: yes <= {FIT_FRACTION:.0%} of HBM < tight <= 100% < no, judged on peak† where compiled, "
  "else total*.\n†: XLA:CPU on simulated devices, a proxy: it computes bf16 dots in f32 (converting "
  "both operands) and fuses and schedules unlike TPU/GPU, so temp† is usually on the high side.\n"
  "On GPU, JAX preallocates 75% of memory by default: set XLA_PYTHON_CLIENT_MEM_FRACTION=.95 "
  "for a plan near the limit."
)


def main(c, workdir: str) -> int:
  """`python -m reft_jax plan`: prints the table, writes workdir/plan.md and plan.json."""
  from reft_jax import config as config_lib

  try:
    hardware = parse_hardware(c.plan.hardware)
    modes = plan_modes(c)
    stages = plan_stages(c)
    rules = shd.parse_rules(c.mesh.rules)
    if c.plan.compile:
      ensure_cpu_devices(max(h.devices for h in hardware))
    try:
      config_lib.validate(c)
    except config_lib.ConfigError as e:
      if not str(e).startswith("config.mesh:"):  # the mesh is resolved per hardware below
        raise
    specs = [stage_spec(c, m, s) for s in stages for m in modes]
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  start = time.perf_counter()
  mesh_cfg = (c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
  rows, notes = plan_rows(
    specs, hardware, mesh_cfg, rules, c.plan.compile, log=lambda s: print(s, file=sys.stderr, flush=True)
  )
  if not rows:
    print(f"error: {notes[0] if notes else 'nothing to plan'}", file=sys.stderr)
    return 2
  text = "\n".join([*(describe(s) for s in specs), "", format_table(rows), "", FOOTER, *notes])
  print(text)
  print(f"plan: {len(rows)} rows in {time.perf_counter() - start:.1f} s", file=sys.stderr)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "plan.md"), "w") as f:
    f.write(text + "\n")
  with open(os.path.join(workdir, "plan.json"), "w") as f:
    json.dump(
      {"rows": rows, "notes": notes, "specs": [describe(s) for s in specs]},
      f,
      indent=2,
      default=lambda x: np.asarray(x).tolist(),
    )
  return 0
