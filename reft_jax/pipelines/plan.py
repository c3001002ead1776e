"""Memory plans: what one training step needs per device on a given accelerator, before renting it.

  python -m reft_jax plan --config=configs/default.py:llama2_7b --workdir=/tmp/plan \
      [--config.plan.hardware=v5e-8] [--config.plan.stage=student] [--config.plan.compile=False]
  python benchmarks/memory_plans.py              # every 7B-class preset x every hardware, one table

Each hardware's devices form the configured mesh (mesh.data/fsdp/tensor, -1 = the rest: fsdp over
all devices by default). Per device:

  exact, from jax.eval_shape (abstract model and optimizer state) and the sharding rules' shard shapes:
    params   the trained model: frozen base + LoRA adapters (LoRA also on its own column)
    teacher  ReFT's student stage: the frozen teacher passed into every step (merged, no LoRA, loaded
             as ReFT loads it, model/build.py:load_frozen: compute dtype, layers scanned as configured)
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
import os
import sys
import time

import numpy as np

from reft_jax import sharding as shd
from reft_jax.losses import resolve_chunk
from reft_jax.model import PRESETS, ModelConfig

from reft_jax.pipelines.memory import (  # noqa: F401  (the plan's vocabulary, re-exported)
  GiB,
  HARDWARE,
  STAGES,
  FIT_FRACTION,
  Hardware,
  StageSpec,
  abstract_mesh,
  activation_bytes,
  compiled_bytes,
  cpu_devices,
  ensure_cpu_devices,
  exact_bytes,
  gather_bytes,
  grad_bytes,
  parse_hardware,
)


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

  from reft_jax.config import with_updates
  from reft_jax.model.build import run_options

  stage = stage or plan_stages(c)[0]
  t = c.train
  if stage == "teacher":  # c.train with the alignment budget, as defences/sft.py:alignment_budget
    t = ml_collections.ConfigDict({**c.train.to_dict(), **c.teacher.to_dict()})
  mode = mode or t.mode
  options = run_options(with_updates(c, **{"train.mode": mode}))
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
    # plans are for accelerators; the teacher's loss is unchunked
    loss_chunk=resolve_chunk(t.get("loss_chunk", 0), cfg.vocab_size, on_cpu=False) if stage != "teacher" else 0,
    trainable_regex=t.trainable_regex,
    # ReFT's student stage loads the teacher with model/build.py:load_frozen: weights in the compute dtype, layers
    # scanned as configured, no LoRA, no remat
    teacher=(
      dataclasses.replace(options, param_dtype=options.dtype, lora=None, remat="none")
      if stage == "student" and c.reft.topk <= 0
      else None
    ),
    topk=c.reft.topk,
    layer=(c.reft.layer or cfg.num_layers // 2) if c.reft.layer >= 0 else cfg.num_layers,  # -1: at most the last
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
    raise ValueError(f"config.plan.stage={c.plan.stage!r}: {bad[0]!r} is not one of {STAGES} (or '' for the method's)")
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


# ---------------------------------------------------------------- plans


def plan_row(
  spec: StageSpec, hw: Hardware, mesh_cfg: tuple[int, int, int], rules, compile: bool, cache: dict | None = None
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
      f"; teacher forward in the step ({spec.teacher.dtype}, {'scanned' if spec.teacher.scan_layers else 'unscanned'})"
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
  from reft_jax.config import ConfigError
  from reft_jax.pipelines.validate import validate

  try:
    hardware = parse_hardware(c.plan.hardware)
    modes = plan_modes(c)
    stages = plan_stages(c)
    rules = shd.parse_rules(c.mesh.rules)
    if c.plan.compile:
      ensure_cpu_devices(max(h.devices for h in hardware))
    try:
      validate(c)
    except ConfigError as e:
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
