"""GPU benchmark: reft-jax's real steps on a 1B-class Llama, one JSON, time-boxed (issue 18, point 4).

  bash benchmarks/device.sh --out $OUT/device.json     # one H200: <= 8 min, wheels + PYTHONPATH set up
  bash benchmarks/device.sh --smoke                    # tiny shapes end to end (CPU: ~90 s, 2 busy cores)
  python benchmarks/device.py --sections=peak,gen      # the python entry (reft_jax must import)

Shape (default): Llama-3.2-1B (16 layers, d 2048, 32/8 heads of 64, SwiGLU 8192, vocab 128,256, tied
embeddings; 1.24B parameters), random weights, bf16 compute with float32 master weights, cuDNN flash
attention (model.attention=cudnn), layers under lax.scan, batch 8 x 1024 tokens.

Sections, each in its own process, so that one section's device-memory peak is its own and a time box
kills only that section (its partial record survives: compile time, first step):
  peak, peak_end  the matmul peak: --peak_reps chained n x n x n jnp.dot in the compute dtype inside one
                  jit (lax.fori_loop: no dispatch gaps), best of 10, at the start and at the end;
                  MFU is against the larger of the two (or --peak_flops when given)
  sft_full/_lora  the SFT step: make_train_step + jit_step (forward, backward, AdamW), full fine-tuning
                  or LoRA (r 8 on every projection, the smollm2/llama presets' adapters)
  reft_full/_lora the ReFT student step: CE on the user batch + KL to the frozen teacher on the alignment
                  batch (methods.reft.student_loss; the teacher in bf16 without adapters, as load_frozen)
  filter          the teacher's filter pass: refusal.prompt_features at layer L/2 (prompts/s)
  gen             generate.generate: KV-cache greedy decoding, prefill included (new tokens/s)

Per section: compile time (train steps: trace + lower and XLA compile of the AOT step; forward passes:
first call - median call), median step time over up to --steps timed steps (fewer when the time box is
short), tokens/s, achieved FLOP/s and MFU, device peak memory (jax memory_stats' peak_bytes_in_use; on
CPU the process's max RSS instead). FLOPs: 6N + 12 L T D_attn per trained token (reft_jax.train.
flops_per_token; N = non-embedding parameters + the head), 4N + 12 L T D_attn under LoRA (frozen weights
get no weight gradient: optim.py's set_to_zero lets XLA drop it; the adapters' own FLOPs are left out),
2N + 4 L T D_attn per forward-only token; causal attention counted in full, as is usual for MFU.

When cuDNN attention fails in a section (an error, not a time-out), the section is rerun once with XLA
attention (dpa) and the JSON keeps the cuDNN error; after a training section has failed that way, later
training sections go straight to dpa. Off GPU, cudnn runs as dpa (noted in the record).

The JSON is rewritten after every section (status "running", then "complete", "partial" or "killed"
when the driver is stopped from outside); the last lines printed are one markdown table. --smoke: tiny
shapes, float32, every section's time box 60 s, and the workers compile with LLVM -O0 on XLA:CPU (the
smoke run checks the flow, not the speed).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import common  # noqa: E402

SCHEMA = "reft-jax device benchmark v1"
# name -> (kind, time box in seconds for the real run); the order is the run order.
SECTIONS = {
  "peak": ("peak", 45),
  "sft_full": ("train", 75),
  "sft_lora": ("train", 65),
  "reft_full": ("train", 90),
  "reft_lora": ("train", 80),
  "filter": ("forward", 50),
  "gen": ("forward", 60),
  "peak_end": ("peak", 30),
}
SMOKE_BOX_S = 60  # every section's time box under --smoke
MIN_START_S = 10  # a section is skipped when less than this is left of the run's budget
LORA_TARGETS = "q,k,v,o,gate,up,down"
# Tiny shapes for --smoke; explicit flags still win.
SMOKE = dict(
  layers=2,
  d=64,
  heads=4,
  kv_heads=2,
  head_dim=16,
  ffn=128,
  vocab=512,
  batch=2,
  seq=32,
  steps=2,
  filter_prompts=8,
  filter_seq=32,
  filter_batch=4,
  gen_batch=2,
  gen_prompt=8,
  gen_new=4,
  peak_n=256,
  peak_reps=4,
  dtype="float32",
  budget_s=240.0,
  out=os.path.join(HERE, "results", "device_smoke.json"),
)


def parse_args(argv=None):
  b = common.str2bool
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--smoke", action="store_true", help="tiny shapes, float32: the whole run in seconds")
  ap.add_argument("--out", default=os.path.join(HERE, "results", "device.json"))
  ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {tuple(SECTIONS)}")
  ap.add_argument("--budget_s", type=float, default=440.0, help="the whole run's wall-clock budget")
  # model: Llama-3.2-1B's shape
  ap.add_argument("--layers", type=int, default=16)
  ap.add_argument("--d", type=int, default=2048)
  ap.add_argument("--heads", type=int, default=32)
  ap.add_argument("--kv_heads", type=int, default=8)
  ap.add_argument("--head_dim", type=int, default=64)
  ap.add_argument("--ffn", type=int, default=8192)
  ap.add_argument("--vocab", type=int, default=128256)
  ap.add_argument("--tie_embeddings", type=b, default=True)
  ap.add_argument("--rope_theta", type=float, default=500000.0)
  # how it runs
  ap.add_argument("--dtype", default="bfloat16", help="compute dtype (master weights stay float32)")
  ap.add_argument("--attention", default="cudnn", help="einsum | dpa | cudnn (model.attention)")
  ap.add_argument("--scan", type=b, default=True, help="layers under lax.scan (compile once per block)")
  ap.add_argument("--remat", default="none", help="none | full | dots | dots_no_batch")
  ap.add_argument("--loss_chunk", type=int, default=0, help="train.loss_chunk (0: full [B, T, V] logits)")
  ap.add_argument("--lora_rank", type=int, default=8)
  ap.add_argument("--lora_targets", default=LORA_TARGETS)
  # work per section
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=1024)
  ap.add_argument("--steps", type=int, default=10, help="timed steps at most (median)")
  ap.add_argument("--filter_prompts", type=int, default=1024)
  ap.add_argument("--filter_seq", type=int, default=256)
  ap.add_argument("--filter_batch", type=int, default=128)
  ap.add_argument("--gen_batch", type=int, default=16)
  ap.add_argument("--gen_prompt", type=int, default=128)
  ap.add_argument("--gen_new", type=int, default=64)
  ap.add_argument("--peak_n", type=int, default=8192)
  ap.add_argument("--peak_reps", type=int, default=20)
  ap.add_argument("--peak_flops", type=float, default=0.0, help="MFU denominator in FLOP/s; 0 = measured")
  # one section in this process (what the driver runs)
  ap.add_argument("--section", default="", help=argparse.SUPPRESS)
  ap.add_argument("--deadline", type=float, default=math.inf, help=argparse.SUPPRESS)  # time.time()
  ap.add_argument("--result", default="", help=argparse.SUPPRESS)
  argv = sys.argv[1:] if argv is None else list(argv)
  if "--smoke" in argv:
    ap.set_defaults(**SMOKE)
  args = ap.parse_args(argv)
  names = [s for s in args.sections.split(",") if s]
  bad = [s for s in names + ([args.section] if args.section else []) if s not in SECTIONS]
  if bad:
    ap.error(f"unknown section {bad[0]!r}; choose from {tuple(SECTIONS)}")
  if args.attention not in ("einsum", "dpa", "cudnn"):
    ap.error(f"--attention={args.attention!r}: einsum, dpa or cudnn")
  if args.steps < 1:
    ap.error("--steps must be >= 1")
  return args


# ---------------------------------------------------------------- FLOPs and step counts (pure)


def model_config(args):
  from reft_jax.model import ModelConfig

  return ModelConfig(
    family="llama",
    vocab_size=args.vocab,
    hidden_size=args.d,
    intermediate_size=args.ffn,
    num_layers=args.layers,
    num_heads=args.heads,
    num_kv_heads=args.kv_heads,
    head_dim=args.head_dim,
    rms_norm_eps=1e-5,
    rope_theta=args.rope_theta,
    tie_embeddings=args.tie_embeddings,
    max_position_embeddings=max(2048, args.seq, args.filter_seq, args.gen_prompt + args.gen_new),
  )


def train_flops_per_token(cfg, seq: int, mode: str) -> float:
  """6N + 12 L T D_attn (full); under LoRA the frozen weights' gradients (2N) are never computed."""
  from reft_jax.train import flops_per_token

  f = flops_per_token(cfg, seq)
  if mode == "lora":
    f -= 2.0 * (cfg.num_params(include_embeddings=False) + cfg.vocab_size * cfg.hidden_size)
  return f


def section_flops(name: str, cfg, args) -> tuple[float, float, str]:
  """(FLOPs per step, work units per step, unit) of a section's step."""
  import steps

  if name in ("filter", "gen"):
    if name == "filter":
      n, t = args.filter_prompts, args.filter_seq
      return steps.forward_flops_per_token(cfg, t, cfg.num_layers // 2, head=False) * n * t, n, "prompts"
    t = args.gen_prompt + args.gen_new
    flops = steps.forward_flops_per_token(cfg, t) * args.gen_batch * t
    return flops, args.gen_batch * args.gen_new, "new tokens"
  bench, mode = name.split("_")
  bt = args.batch * args.seq
  train = train_flops_per_token(cfg, args.seq, mode)
  if bench == "sft":
    return train * bt, bt, "tokens"
  # user + alignment batch trained, the teacher's forward over the alignment batch
  return train * 2 * bt + steps.forward_flops_per_token(cfg, args.seq) * bt, 2 * bt, "tokens"


def timed_steps(max_steps: int, step_s: float, remaining_s: float, reserve_s: float = 5.0) -> int:
  """How many timed steps fit in what is left of a section's time box (at least 1, at most max_steps)."""
  fit = (remaining_s - reserve_s - 2 * step_s) / max(step_s + 0.05, 1e-6)  # measure() sleeps 50 ms a step
  return int(max(1, min(max_steps, fit))) if math.isfinite(fit) else max_steps


# ---------------------------------------------------------------- one section (worker process)


def _device_memory(jax) -> dict:
  stats = jax.devices()[0].memory_stats() or {}
  gib = lambda k: stats[k] / 2**30 if k in stats else None
  return {
    "device_peak_gib": gib("peak_bytes_in_use"),
    "device_in_use_gib": gib("bytes_in_use"),
    "device_limit_gib": gib("bytes_limit"),
  }


def _max_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def resolve_attention(requested: str, backend: str) -> tuple[str, str]:
  """cuDNN's kernel exists on GPUs only: elsewhere the section runs XLA attention and says so."""
  if requested == "cudnn" and backend != "gpu":
    return "dpa", f"cudnn needs a GPU; XLA attention (dpa) on {backend}"
  return requested, ""


def section_peak(args, rec: dict, save) -> None:
  import jax
  import jax.numpy as jnp
  import numpy as np

  dev = jax.devices()[0]
  rec.update(
    backend=jax.default_backend(),
    device_kind=dev.device_kind,
    device_count=jax.device_count(),
    **common.versions("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"),
  )
  n, reps, dtype = args.peak_n, args.peak_reps, jnp.dtype(args.dtype)
  k1, k2 = jax.random.split(jax.random.key(0))
  x = jax.random.normal(k1, (n, n), jnp.float32).astype(dtype)
  # w ~ N(0, 1/n) keeps x's scale through the chain: random data, never zeros or infinities.
  w = (jax.random.normal(k2, (n, n), jnp.float32) / np.sqrt(n)).astype(dtype)
  # Each product feeds the next, so XLA cannot hoist or drop any of them.
  chain = jax.jit(lambda x, w: jax.lax.fori_loop(0, reps, lambda i, x: jnp.dot(x, w), x))
  t0 = time.perf_counter()
  out = chain(x, w).block_until_ready()
  rec["compile_s"] = time.perf_counter() - t0
  times = []
  for _ in range(10):
    t0 = time.perf_counter()
    out = chain(x, w).block_until_ready()
    times.append(time.perf_counter() - t0)
  flops = 2.0 * n**3 * reps
  rec.update(
    n=n,
    reps=reps,
    dtype=str(dtype),
    best_s=min(times),
    times=times,
    flops_per_s=flops / min(times),
    tflops=flops / min(times) / 1e12,
    finite=bool(jnp.isfinite(out.astype(jnp.float32)).all()),
    **_device_memory(jax),
  )
  save()


def _run_options(args, attention: str, mode: str, frozen: bool):
  from reft_jax.model import LoraConfig, RunOptions

  if frozen:  # what model_build.load_frozen builds: weights in the compute dtype, no adapters, no remat
    return RunOptions(dtype=args.dtype, param_dtype=args.dtype, scan_layers=args.scan, attention=attention)
  lora = None
  if mode == "lora":
    lora = LoraConfig(
      rank=args.lora_rank, alpha=2.0 * args.lora_rank, targets=tuple(t for t in args.lora_targets.split(",") if t)
    )
  return RunOptions(
    dtype=args.dtype, param_dtype="float32", scan_layers=args.scan, remat=args.remat, lora=lora, attention=attention
  )


def init_params(cfg, options, seed: int):
  """(graphdef, params) of a fresh model, initialised inside one jit (as experiment.py builds random
  weights): one compile instead of one per parameter shape."""
  import jax
  from flax import nnx

  from reft_jax.model import Transformer, abstract_model

  graphdef, _ = nnx.split(abstract_model(cfg, options))
  init = lambda: nnx.to_pure_dict(nnx.state(Transformer(cfg, options, rngs=nnx.Rngs(params=seed))))
  params = jax.jit(init)()
  return graphdef, params


def _count(tree) -> int:
  import jax

  return int(sum(x.size for x in jax.tree.leaves(tree)))


def train_runner(name: str, cfg, args, attention: str, rec: dict, save) -> common.Runner:
  """The framework's real step, as stages.train_stage builds it: make_optimizer (full or LoRA
  labels), init_train_state, make_train_step, jit_step; compiled ahead of time (the time is recorded)."""
  import jax
  import numpy as np

  import steps
  from reft_jax import losses
  from reft_jax import sharding as shd
  from reft_jax.defences import reft
  from reft_jax.optim import TRAINABLE, make_optimizer
  from reft_jax.train import batch_shardings, init_train_state, jit_step, make_train_step

  bench, mode = name.split("_")
  mesh = shd.make_mesh(1, -1, 1, devices=jax.devices()[:1])
  rng = np.random.default_rng(0)
  t0 = time.perf_counter()
  graphdef, params = init_params(cfg, _run_options(args, attention, mode, False), seed=0)
  tx, sched, labels = make_optimizer(
    params, lr=1e-5, num_steps=10**6, schedule="constant", weight_decay=0.01, grad_clip=1.0, mode=mode
  )
  state, state_sh = init_train_state(params, tx, mesh)
  trainable = [x for x, l in zip(jax.tree.leaves(params), jax.tree.leaves(labels)) if l == TRAINABLE]
  rec.update(params=_count(params), trainable_params=int(sum(x.size for x in trainable)))
  frozen_graphdef = frozen = frozen_sh = None
  if bench == "sft":
    batch, loss_fn = steps.lm_batch(rng, args), losses.make_lm_loss(args.loss_chunk)
  else:
    batch = {"user": steps.lm_batch(rng, args), "align": steps.lm_batch(rng, args)}
    loss_fn = reft.student_loss(1.0, 1.0, False, args.loss_chunk)
    frozen_graphdef, frozen = init_params(cfg, _run_options(args, attention, mode, True), seed=1)
    frozen_sh = jax.tree.map(lambda x: x.sharding, frozen)
  batch_sh = batch_shardings(batch, mesh)
  batch = jax.device_put(batch, batch_sh)
  jax.block_until_ready((state, batch, frozen))
  rec["init_s"] = time.perf_counter() - t0
  step_fn = make_train_step(graphdef, tx, loss_fn, sched, labels, 1, frozen_graphdef)
  step = jit_step(step_fn, state_sh, batch_sh, mesh, frozen_sh)
  extra = () if frozen is None else (frozen,)
  t0 = time.perf_counter()
  lowered = step.lower(state, batch, *extra)
  rec["trace_lower_s"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  compiled = lowered.compile()
  rec["xla_compile_s"] = time.perf_counter() - t0
  rec["compile_s"] = rec["trace_lower_s"] + rec["xla_compile_s"]
  mem = compiled.memory_analysis()
  if mem is not None:
    for k in ("temp", "argument", "output", "alias"):
      v = getattr(mem, f"{k}_size_in_bytes", None)
      rec[f"xla_{k}_gib"] = None if v is None else v / 2**30
  save()
  box = {"state": state}

  def run():
    box["state"], metrics = compiled(box["state"], batch, *extra)
    return metrics

  def block(metrics):
    rec["loss"] = float(jax.device_get(metrics["loss"]))  # the host read waits for the step
    return metrics

  return common.Runner(run, block, rec["compile_s"])


def forward_runner(name: str, cfg, args, attention: str, rec: dict) -> common.Runner:
  """The filter pass or greedy generation, each through its own cached jitted function; both return host
  arrays, so a call's time covers the device work (and the transfers a real run has too)."""
  import jax
  import numpy as np
  from flax import nnx

  from reft_jax import generate, refusal
  from reft_jax.data import sft

  t0 = time.perf_counter()
  graphdef, params = init_params(cfg, _run_options(args, attention, "full", True), seed=0)
  model = nnx.merge(graphdef, jax.block_until_ready(params))
  rec.update(init_s=time.perf_counter() - t0, params=cfg.num_params())
  rng = np.random.default_rng(1)
  if name == "filter":
    n, t = args.filter_prompts, args.filter_seq
    tokens = rng.integers(4, args.vocab, size=(n, t)).astype(np.int32)
    last = np.full((n,), t - 1, np.int32)
    data = sft.TokenizedSet(tokens, np.zeros_like(tokens), np.ones_like(tokens), 0, last)
    layer = cfg.num_layers // 2
    rec.update(prompts=n, prompt_len=t, batch=args.filter_batch, layer=layer)

    def run():
      h = refusal.prompt_features(model, data, layer, batch_size=args.filter_batch)
      assert h.shape == (n, cfg.hidden_size), h.shape
      return h
  else:
    b, p, new = args.gen_batch, args.gen_prompt, args.gen_new
    tokens = rng.integers(4, args.vocab, size=(b, p)).astype(np.int32)
    rec.update(batch=b, prompt_len=p, new_tokens=new)

    def run():  # eos_id=-1: every row decodes all `new` tokens
      out = generate.generate(model, tokens, np.ones_like(tokens), max_new_tokens=new, eos_id=-1, pad_id=0)
      assert out.shape == (b, new), out.shape
      return out

  return common.Runner(run, lambda x: x)


def run_section(args) -> dict:
  """Runs args.section in this process; the record is saved to args.result after every milestone."""
  import jax

  # The weights are random numbers whose quality does not matter; threefry's init compiles ~3x slower.
  jax.config.update("jax_default_prng_impl", "unsafe_rbg")
  start = time.perf_counter()
  rec: dict = {"section": args.section, "status": "running", "pid": os.getpid()}

  def save():
    rec["wall_s"] = time.perf_counter() - start
    if args.result:
      _write_json(args.result, rec)

  save()
  try:
    kind = SECTIONS[args.section][0]
    if kind == "peak":
      section_peak(args, rec, save)
    else:
      attention, note = resolve_attention(args.attention, jax.default_backend())
      rec.update(attention=attention, dtype=args.dtype, **({"attention_note": note} if note else {}))
      cfg = model_config(args)
      flops, units, unit = section_flops(args.section, cfg, args)
      rec.update(flops_per_step=flops, units_per_step=units, unit=unit)
      if kind == "train":
        rec.update(batch=args.batch, seq=args.seq, scan=args.scan, remat=args.remat, loss_chunk=args.loss_chunk)
        runner = train_runner(args.section, cfg, args, attention, rec, save)
      else:
        runner = forward_runner(args.section, cfg, args, attention, rec)
      save()
      first = _timed(lambda: runner.block(runner.run()))  # compiles when the function jits on first call
      rec["first_call_s"] = first
      save()
      est = _timed(lambda: runner.block(runner.run()))
      n = timed_steps(args.steps, est, args.deadline - time.time())
      m = common.measure({args.section: runner}, warmup=1, steps=n)[args.section]
      step_s = m["step_s"]
      rec.update(
        steps_timed=n,
        times=m["times"],
        step_s=step_s,
        step_ms=1000 * step_s,
        units_per_s=units / step_s,
        flops_per_s=flops / step_s,
        tflops=flops / step_s / 1e12,
        rss_delta_mb=m["rss_delta_mb"],
        max_rss_mb=_max_rss_mb(),
        **_device_memory(jax),
      )
      if kind == "forward":  # its first call compiled
        rec["compile_s"] = max(first - step_s, 0.0)
      if args.section == "gen":
        # per decode step of the whole batch, prefill included
        rec["ms_per_new_token"] = 1000 * step_s / args.gen_new
        # every decode step reads all weights once: a lower bound on the bandwidth reached
        rec["weight_read_tb_per_s"] = cfg.num_params() * _itemsize(args.dtype) * args.gen_new / step_s / 1e12
    rec["status"] = "ok"
  except BaseException as e:  # noqa: BLE001 -- the record must say what stopped the section
    rec.update(status="error", error=f"{type(e).__name__}: {e}"[:4000], traceback=traceback.format_exc()[-4000:])
    save()
    raise
  save()
  return rec


def _itemsize(dtype: str) -> int:
  return {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]


def _timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


# ---------------------------------------------------------------- driver (no jax: the GPU is the workers')


def _write_json(path: str, obj) -> None:
  """Atomic: a reader (or a kill) never sees half a file."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
  with os.fdopen(fd, "w") as f:
    json.dump(_strict(obj), f, indent=1, default=str)
  os.replace(tmp, path)


def _strict(x):
  """Non-finite floats as strings ("nan", "inf"): the file stays strict JSON and keeps them visible."""
  if isinstance(x, float) and not math.isfinite(x):
    return str(x)
  if isinstance(x, dict):
    return {k: _strict(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_strict(v) for v in x]
  return x


_CHILD: dict = {}  # the worker running now: {"proc", "result"}


def _on_signal(signum, frame):
  """The driver is stopped (an outer timeout, Ctrl-C): the worker, in a session of its own, goes too."""
  proc = _CHILD.get("proc")
  if proc is not None and proc.poll() is None:
    os.killpg(proc.pid, signal.SIGKILL)
  raise SystemExit(128 + signum)


def run_child(cmd: list[str], limit_s: float, result_path: str, env_extra: dict | None = None) -> dict:
  """Runs one worker with a time box; its output is echoed; returns its record (partial on a time-out)."""
  env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
  env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
  t0 = time.perf_counter()
  proc = subprocess.Popen(
    cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env, start_new_session=True
  )  # its own process group: a time-out kills all of it
  _CHILD.update(proc=proc, result=result_path)
  tail: collections.deque = collections.deque(maxlen=30)

  def pump():
    for line in proc.stdout:
      sys.stdout.write("    | " + line)
      tail.append(line.rstrip())

  reader = threading.Thread(target=pump, daemon=True)
  reader.start()
  timed_out = False
  try:
    rc = proc.wait(timeout=limit_s)
  except subprocess.TimeoutExpired:
    timed_out = True
    os.killpg(proc.pid, signal.SIGKILL)
    rc = proc.wait()
  reader.join(timeout=5)
  _CHILD.clear()
  rec = _read_record(result_path)
  rec["wall_s"] = time.perf_counter() - t0
  rec["time_box_s"] = limit_s
  if timed_out:
    rec.update(status="timeout", error=f"killed after its time box of {limit_s:.0f} s")
  elif rc != 0 or rec.get("status") != "ok":
    rec["status"] = "error"
    rec.setdefault("error", f"exit code {rc}")
    rec["log_tail"] = list(tail)[-12:]
  return rec


def _read_record(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def run_with_fallback(run, name: str, attention: str, left_s) -> dict:
  """run(attention) -> record. A cuDNN section that errors (not a time-out) is rerun once with XLA
  attention while time is left; the record keeps the cuDNN error."""
  rec = run(attention)
  if rec.get("status") == "error" and attention == "cudnn" and SECTIONS[name][0] != "peak" and left_s() >= MIN_START_S:
    retry = run("dpa")
    retry["cudnn_error"] = rec.get("error")
    retry["cudnn_attempt_s"] = rec.get("wall_s")
    return retry
  return rec


def derive(out: dict) -> None:
  """MFU of every section against the given peak or the larger measured one."""
  secs = out["sections"]
  measured = [
    secs[p]["flops_per_s"]
    for p in ("peak", "peak_end")
    if secs.get(p, {}).get("status") == "ok" and secs[p].get("flops_per_s")
  ]
  peak = out["args"]["peak_flops"] or (max(measured) if measured else None)
  out["peak_flops"] = peak
  out["peak_source"] = "given" if out["args"]["peak_flops"] else ("measured" if peak else None)
  for name, r in secs.items():
    if SECTIONS[name][0] != "peak" and r.get("flops_per_s") and peak:
      r["mfu"] = r["flops_per_s"] / peak
    if r.get("params") and "params" not in out["model"]:
      out["model"]["params"] = r["params"]


def _nvidia_smi() -> str | None:
  if not shutil.which("nvidia-smi"):
    return None
  q = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.draw,temperature.gpu"
  try:
    r = subprocess.run(
      ["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
    )
    return r.stdout.strip() or r.stderr.strip()
  except (OSError, subprocess.SubprocessError) as e:
    return f"nvidia-smi failed: {e}"


def environment() -> dict:
  return {
    "python": platform.python_version(),
    "cpu": common.cpu_model(),
    "cores": common.num_cores(),
    "loadavg_start": os.getloadavg()[0],
    "nvidia_smi_start": _nvidia_smi(),
    **{k: os.environ.get(k, "") for k in ("XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION", "JAX_PLATFORMS")},
    **common.versions(
      "jax",
      "jaxlib",
      "jax-cuda13-plugin",
      "jax-cuda12-plugin",
      "flax",
      "optax",
      "orbax-checkpoint",
      "transformers",
      "torch",
      "numpy",
      "ml-collections",
    ),
  }


COLUMNS = [
  ("name", "section", ""),
  ("status", "status", ""),
  ("attention", "attention", ""),
  ("step_ms", "ms/step", ".1f"),
  ("units_per_s", "units/s", ",.0f"),
  ("unit", "unit", ""),
  ("tflops", "TFLOP/s", ".3g"),
  ("mfu_pct", "MFU %", ".1f"),
  ("compile_s", "compile s", ".1f"),
  ("device_peak_gib", "peak GiB", ".1f"),
  ("wall_s", "wall s", ".0f"),
]


def drive(args, argv: list[str]) -> int:
  start = time.perf_counter()
  names = [s for s in SECTIONS if s in args.sections.split(",")]  # run in SECTIONS' order
  box = {n: SMOKE_BOX_S if args.smoke else SECTIONS[n][1] for n in names}
  out = {
    "schema": SCHEMA,
    "status": "running",
    "smoke": args.smoke,
    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    "command": " ".join([os.path.relpath(__file__, ROOT), *argv]),
    "args": {k: v for k, v in vars(args).items() if k not in ("section", "deadline", "result")},
    "env": environment(),
    "model": {
      k: getattr(args, k) for k in ("layers", "d", "heads", "kv_heads", "head_dim", "ffn", "vocab", "tie_embeddings")
    },
    "time_boxes_s": box,
    "sections": {},
  }
  _write_json(args.out, out)
  print(f"device benchmark -> {args.out}; sections {names}; budget {args.budget_s:.0f} s", flush=True)
  left = lambda: args.budget_s - (time.perf_counter() - start)
  cudnn_train_failed = ""
  env_extra = {}
  if args.smoke and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    # the smoke run checks the flow, not the speed: LLVM's -O0 compiles XLA:CPU steps ~3x faster
    env_extra["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
  out["worker_env"] = env_extra
  workdir = tempfile.mkdtemp(prefix="device_bench_")
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, _on_signal)
  try:
    for name in names:
      kind = SECTIONS[name][0]
      out["current"] = name  # a run killed from outside still says where it stopped
      _write_json(args.out, out)
      if left() < MIN_START_S:
        out["sections"][name] = {"status": "skipped", "error": f"run budget of {args.budget_s:.0f} s spent"}
        continue
      attention = args.attention
      note = ""
      if kind == "train" and attention == "cudnn" and cudnn_train_failed:
        attention, note = "dpa", f"cudnn skipped: it failed in {cudnn_train_failed}"

      def run(att, name=name):
        limit = max(1.0, min(box[name], left()))
        path = os.path.join(workdir, f"{name}_{att}.json")
        cmd = [
          sys.executable,
          os.path.abspath(__file__),
          *argv,
          "--section",
          name,
          "--attention",
          att,
          "--deadline",
          f"{time.time() + limit:.1f}",
          "--result",
          path,
        ]
        print(f"[{time.perf_counter() - start:6.1f} s] {name} ({att}, time box {limit:.0f} s)", flush=True)
        return run_child(cmd, limit, path, env_extra)

      rec = run_with_fallback(run, name, attention, left)
      if note:
        rec["attention_note"] = note
      if kind == "train" and rec.get("cudnn_error") and rec.get("status") == "ok":
        cudnn_train_failed = name
      out["sections"][name] = rec
      derive(out)
      _write_json(args.out, out)
  except SystemExit:  # stopped from outside: keep what the running section had written
    name = out.pop("current", "")
    if name:
      rec = _read_record(_CHILD.get("result", "")) if _CHILD.get("result") else {}
      out["sections"][name] = {**rec, "status": "killed", "error": "the driver was stopped"}
    out.update(status="killed", wall_s=time.perf_counter() - start)
    derive(out)
    _write_json(args.out, out)
    raise
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  derive(out)
  out.pop("current", None)
  ok = all(r.get("status") == "ok" for r in out["sections"].values())
  out["status"] = "complete" if ok else "partial"
  out["wall_s"] = time.perf_counter() - start
  out["env"].update(loadavg_end=os.getloadavg()[0], nvidia_smi_end=_nvidia_smi())
  _write_json(args.out, out)
  rows = [{"name": n, **r, "mfu_pct": 100 * r["mfu"] if r.get("mfu") else None} for n, r in out["sections"].items()]
  for r in rows:
    if SECTIONS[r["name"]][0] == "peak" and r.get("status") == "ok":
      r["unit"] = f"{r['dtype']} {r['n']}^3 matmul"
  print()
  print(common.markdown_table(rows, COLUMNS))
  peak = out["peak_flops"]
  against = f"{peak / 1e12:.1f} TFLOP/s ({out['peak_source']})" if peak else "no peak"
  print(f"\n{out['status']} in {out['wall_s']:.0f} s; MFU against {against}; wrote {args.out}")
  return 0 if ok else 1


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  if args.section:
    rec = run_section(args)
    print(f"section {rec['section']}: {rec['status']} in {rec['wall_s']:.1f} s", flush=True)
    return 0
  return drive(args, argv)


if __name__ == "__main__":
  sys.exit(main())
