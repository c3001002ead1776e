"""Step benchmarks: reft-jax against plain PyTorch + transformers on one tiny Llama config and batch.

  .venv/bin/python benchmarks/steps.py                               # baseline, < 3 min on 2 CPU cores
  .venv/bin/python benchmarks/steps.py --variants=baseline,bf16,chunked_loss,dpa,scan,remat \\
      --torch=false                                                  # the speed options, JAX only

Benchmarks (each: median step latency, throughput, achieved FLOP/s, MFU, compile time, peak memory).
Every run of a benchmark (JAX variants, torch eager, torch.compile) is built and warmed up alone, then
the timed steps go round-robin over them, so that other load on a shared machine hits all alike; on CPU
each run has its own process (--isolate; in one process a JAX step right after a torch step ran up to
twice its time alone):
  sft     forward + backward + AdamW update through reft_jax.train.make_train_step / jit_step and
          losses.lm_loss (tokens/s = B * T per step)
  reft    the ReFT student step: CE on a user batch + KL to a frozen teacher on an alignment batch
          (methods.reft.student_loss; tokens/s = 2 * B * T per step, FLOPs include the teacher forward)
  filter  the teacher's filter pass: refusal.prompt_features with the early stop at layer L/2 (prompts/s)
  gen     greedy decoding with the KV cache: generate.generate, B prompts of T/2 tokens + T/2 new tokens
          (new tokens/s; prefill included in the time)

Variants (JAX; '+' combines them, e.g. bf16+chunked_loss): baseline (the default config: train.loss_chunk=-1,
the fused head from a 16k vocabulary), unchunked (full [B, T, V] logits), bf16 (bfloat16 compute, float32
master weights), chunked_loss (losses.chunked_*: head + loss over --loss_chunk positions at a time;
chunkN: N positions, e.g. chunk16),
dpa (jax.nn.dot_product_attention), cudnn (its cuDNN flash kernel, GPU), splash (the Pallas TPU kernel;
interpreted, far slower, off TPU; generation uses XLA attention), scan (layers under lax.scan), remat (full
rematerialisation), remat_dots (save matmul outputs), fused (q/k/v and gate/up as one matmul each:
model.fuse_projections=true), teacher_lora (reft: the frozen teacher keeps unmerged LoRA adapters; by default it
is merged, as the pipeline loads it), chunk_head_grad (the chunked head's projection backward in every chunk, as
on accelerators; on CPU it runs once after the chunks by default). filter/gen only run variants that change a
forward pass.

FLOPs: 6 N + 12 L T D_attn per trained token (reft_jax.train.flops_per_token; N = non-embedding
parameters + the LM head), a third of it per forward-only token; the filter counts its L/2 blocks and no
head. MFU: achieved FLOP/s over --peak_flops, or (0) over the best float32 rate of a jitted / torch
2048^3 matmul, measured at the start and at the end of this run (the largest; bf16 variants are still
measured against this float32 peak). Memory: CPU, the process's peak RSS growth during the steps
(sampled, after malloc_trim) and, for jitted steps, XLA's temp buffer size; GPU, the device's
peak_bytes_in_use.

The process re-executes once with the CLI's allocator setting (reft_jax.hugepages: glibc's huge-page
tunable; REFT_JAX_HUGE_PAGES=0 turns it off), which JAX and torch then share.

Prints one markdown table and writes benchmarks/results/steps.json.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import sys
import time
from unittest import mock

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

FEATURES = (
  "baseline",
  "unchunked",
  "bf16",
  "chunked_loss",
  "dpa",
  "cudnn",
  "splash",
  "scan",
  "remat",
  "remat_dots",
  "fused",
  "teacher_lora",
  "chunk_head_grad",
)
# what a forward-only pass (filter, generation) sees
FORWARD_FEATURES = ("bf16", "dpa", "cudnn", "splash", "scan", "fused")
BENCHES = ("sft", "reft", "filter", "gen")


def parse_args(argv=None):
  b = common.str2bool
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--d", type=int, default=256, help="hidden size")
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--kv_heads", type=int, default=4)
  ap.add_argument("--ffn", type=int, default=688)
  ap.add_argument("--vocab", type=int, default=32000)
  ap.add_argument("--tie", type=b, default=False, help="tied input/output embeddings")
  ap.add_argument("--lora_rank", type=int, default=0, help="> 0: LoRA of this rank on every projection (alpha 2r)")
  ap.add_argument(
    "--shape", choices=("default", "smollm2"), default="default", help="smollm2: SmolLM2-135M's shape with LoRA"
  )
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--steps", type=int, default=5, help="timed steps (median), interleaved across runs")
  ap.add_argument("--benches", default=",".join(BENCHES))
  ap.add_argument("--variants", default="baseline", help=f"comma list of '+'-joined {FEATURES}")
  ap.add_argument("--loss_chunk", type=int, default=16, help="positions per chunk for chunked_loss")
  ap.add_argument("--filter_prompts", type=int, default=128)
  ap.add_argument("--filter_batch", type=int, default=64)
  ap.add_argument("--torch", type=b, default=True, help="run the PyTorch + transformers side")
  ap.add_argument("--torch_compile", type=b, default=True, help="also torch.compile (sft, reft, filter)")
  ap.add_argument("--torch_attn", default="sdpa", help="transformers attn_implementation")
  ap.add_argument(
    "--torch_threads",
    default="auto",
    help="comma list of torch intra-op thread counts, one torch run each; auto = the cores this process "
    "may use. On a shared machine 1 thread can beat 2 by far (threads wait for descheduled peers)",
  )
  ap.add_argument(
    "--isolate",
    default="auto",
    help="true: every run in its own process, timed round-robin (common.measure_isolated); false: all in "
    "this one; auto = true on CPU, where JAX and torch in one process slow each other down, false on an "
    "accelerator, where each process would claim the device's memory",
  )
  ap.add_argument("--peak_flops", type=float, default=0.0, help="per-device peak FLOP/s; 0 = measure")
  ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "steps.json"))
  args = ap.parse_args(argv)
  if args.shape == "smollm2":  # 30 layers, d 576, 9/3 heads, vocab 49,152, tied; the preset's LoRA and batch
    args.__dict__.update(layers=30, d=576, heads=9, kv_heads=3, ffn=1536, vocab=49152, tie=True, lora_rank=8)
    args.__dict__.update(batch=4, seq=192)
  args.isolate = _isolate(args.isolate)
  if args.warmup < 1 or args.steps < 1:
    ap.error("--warmup and --steps must be >= 1 (the first call compiles)")
  for v in args.variants.split(","):
    bad = [f for f in v.split("+") if f not in FEATURES and not re.fullmatch(r"chunk\d+", f)]
    if bad:
      ap.error(f"--variants: unknown {bad}; choose from {FEATURES}")
  bad = [x for x in args.benches.split(",") if x not in BENCHES]
  if bad:
    ap.error(f"--benches: unknown {bad}; choose from {BENCHES}")
  return args


def _isolate(value: str) -> bool:
  if value != "auto":
    return common.str2bool(value)
  import jax

  return jax.default_backend() == "cpu"


# ---------------------------------------------------------------- shared shapes and FLOPs


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
    head_dim=args.d // args.heads,
    rms_norm_eps=1e-6,
    tie_embeddings=args.tie,
  )


def forward_flops_per_token(cfg, seq: int, layers: int | None = None, head: bool = True) -> float:
  """2 N + 4 L T D_attn for a forward pass through `layers` blocks (+ the head)."""
  layers = cfg.num_layers if layers is None else layers
  per_layer = (cfg.num_params(include_embeddings=False) - cfg.hidden_size) / cfg.num_layers
  n = layers * per_layer + (cfg.vocab_size * cfg.hidden_size if head else 0)
  return 2 * n + 4 * layers * seq * cfg.num_heads * cfg.head_dim


def bench_flops(bench: str, cfg, args) -> tuple[float, float, str]:
  """(FLOPs per step, work units per step, unit name)."""
  from reft_jax.train import flops_per_token

  b, t = args.batch, args.seq
  train = flops_per_token(cfg, t)
  if args.lora_rank:  # frozen weights: no weight-gradient matmuls (2 N of the 6 N)
    train -= 2 * (cfg.num_params(include_embeddings=False) + cfg.vocab_size * cfg.hidden_size)
  if bench == "sft":
    return train * b * t, b * t, "tok/s"
  if bench == "reft":
    return train * 2 * b * t + flops_per_token(cfg, t) / 3 * b * t, 2 * b * t, "tok/s"
  if bench == "filter":
    layer = cfg.num_layers // 2
    return (
      forward_flops_per_token(cfg, t, layer, head=False) * args.filter_prompts * t,
      args.filter_prompts,
      "prompts/s",
    )
  return forward_flops_per_token(cfg, t) * b * t, b * (t - t // 2), "new tok/s"


def lm_batch(rng, args) -> dict:
  """Random tokens, no padding, loss on the last 3/4 of every row (the 'response')."""
  tokens = rng.integers(4, args.vocab, size=(args.batch, args.seq)).astype(np.int32)
  loss = np.zeros_like(tokens)
  loss[:, args.seq // 4 :] = 1
  return {"tokens": tokens, "attention_mask": np.ones_like(tokens), "loss_mask": loss}


def variant_options(name: str, args):
  from reft_jax.model import LoraConfig, RunOptions
  from reft_jax.model.layers import LORA_TARGETS

  f = set(name.split("+"))
  remat = "full" if "remat" in f else "dots" if "remat_dots" in f else "none"
  opts = RunOptions(
    dtype="bfloat16" if "bf16" in f else "float32",
    param_dtype="float32",
    scan_layers="scan" in f,
    remat=remat,
    attention=next((a for a in ("dpa", "cudnn", "splash") if a in f), "einsum"),
    fuse_projections="fused" in f,
    lora=LoraConfig(args.lora_rank, 2.0 * args.lora_rank, LORA_TARGETS) if args.lora_rank else None,
  )
  sizes = [int(x[5:]) for x in f if re.fullmatch(r"chunk\d+", x)]
  # the default config's loss: train.loss_chunk=-1 (auto: chunked from a 16k vocabulary)
  return opts, (sizes[0] if sizes else args.loss_chunk if "chunked_loss" in f else 0 if "unchunked" in f else -1)


# ---------------------------------------------------------------- JAX


def _device_peak_mb(jax) -> float | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats["peak_bytes_in_use"] / 2**20 if "peak_bytes_in_use" in stats else None


def jax_train(bench: str, cfg, opts, chunk: int, args, teacher_lora: bool = False) -> common.Runner:
  """The framework's real step: make_optimizer, init_train_state, make_train_step, jit_step."""
  import jax

  from reft_jax import losses
  from reft_jax import sharding as shd
  from reft_jax.defences import reft
  from reft_jax.model import init_model
  from reft_jax.optim import make_optimizer
  from reft_jax.train import batch_shardings, init_train_state, jit_step, make_train_step, split_model

  mesh = shd.make_mesh(1, -1, 1)
  rng = np.random.default_rng(0)
  graphdef, params = split_model(init_model(cfg, opts, seed=0))
  tx, sched, labels = make_optimizer(
    params,
    lr=1e-4,
    num_steps=10**6,
    schedule="constant",
    weight_decay=0.01,
    grad_clip=1.0,
    mode="lora" if args.lora_rank else "full",
  )
  state, state_sh = init_train_state(params, tx, mesh)
  frozen_graphdef = frozen = frozen_sh = None
  if bench == "sft":
    batch, loss_fn = lm_batch(rng, args), losses.make_lm_loss(chunk)
  else:
    batch = {"user": lm_batch(rng, args), "align": lm_batch(rng, args)}
    loss_fn = reft.student_loss(1.0, 1.0, False, chunk)
    # The pipeline's teacher is merged, without adapters (model/build.py:load_frozen); teacher_lora keeps
    # them, as a LoRA-trained teacher would compute unmerged.
    teacher_opts = opts if teacher_lora else dataclasses.replace(opts, lora=None)
    frozen_graphdef, frozen = split_model(init_model(cfg, teacher_opts, seed=1))
    frozen_sh = jax.tree.map(lambda x: x.sharding, frozen)
  batch_sh = batch_shardings(batch, mesh)
  batch = jax.device_put(batch, batch_sh)
  step = jit_step(
    make_train_step(graphdef, tx, loss_fn, sched, labels, 1, frozen_graphdef), state_sh, batch_sh, mesh, frozen_sh
  )
  extra = () if frozen is None else (frozen,)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch, *extra).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  box = {"state": state}

  def run():
    box["state"], metrics = compiled(box["state"], batch, *extra)
    return metrics

  xla_temp = getattr(mem, "temp_size_in_bytes", 0) / 2**20 if mem else None
  return common.Runner(
    run, jax.block_until_ready, compile_s, {"xla_temp_mb": xla_temp}, lambda: {"device_peak_mb": _device_peak_mb(jax)}
  )


def jax_forward(bench: str, cfg, opts, args) -> common.Runner:
  """The filter pass (refusal.prompt_features) or greedy generation (generate.generate), each through
  its own jitted, cached function; compile time = first call - median call."""
  import jax

  from reft_jax import generate, refusal
  from reft_jax.data import sft
  from reft_jax.model import init_model

  model = init_model(cfg, opts, seed=0)
  rng = np.random.default_rng(1)
  if bench == "filter":
    n, t = args.filter_prompts, args.seq
    tokens = rng.integers(4, args.vocab, size=(n, t)).astype(np.int32)
    data = sft.TokenizedSet(tokens, np.zeros_like(tokens), np.ones_like(tokens), 0, np.full((n,), t - 1, np.int32))
    run = lambda: refusal.prompt_features(model, data, cfg.num_layers // 2, batch_size=args.filter_batch)
  else:
    p = args.seq // 2
    tokens = rng.integers(4, args.vocab, size=(args.batch, p)).astype(np.int32)
    run = lambda: generate.generate(
      model, tokens, np.ones_like(tokens), max_new_tokens=args.seq - p, eos_id=-1, pad_id=0
    )
  return common.Runner(run, jax.block_until_ready, after_warmup=lambda: {"device_peak_mb": _device_peak_mb(jax)})


# ---------------------------------------------------------------- PyTorch + transformers


def torch_config(args, layers: int | None = None):
  from transformers import LlamaConfig

  return LlamaConfig(
    vocab_size=args.vocab,
    hidden_size=args.d,
    intermediate_size=args.ffn,
    num_hidden_layers=layers or args.layers,
    num_attention_heads=args.heads,
    num_key_value_heads=args.kv_heads,
    head_dim=args.d // args.heads,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    tie_word_embeddings=args.tie,
    attn_implementation=args.torch_attn,
  )


def _adamw(torch, model):
  """AdamW with its state allocated now (a zero-lr step), so that memory deltas compare with JAX's
  train state, which holds the moments before the first step."""
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=0.0, weight_decay=0.01, fused=True)
  for p in params:
    p.grad = torch.zeros_like(p)
  opt.step()
  opt.zero_grad(set_to_none=True)
  opt.param_groups[0]["lr"] = 1e-4
  return params, opt


def torch_train(bench: str, args, compile_: bool, device: str) -> common.Runner:
  import torch
  import torch.nn.functional as F
  from transformers import LlamaForCausalLM

  torch.manual_seed(0)
  student = LlamaForCausalLM(torch_config(args)).to(device).train()
  if args.lora_rank:
    import peft

    from reft_jax.model.layers import LORA_TARGETS

    targets = [f"{t}_proj" for t in LORA_TARGETS]
    lora = peft.LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0, target_modules=targets)
    student = peft.get_peft_model(student, lora)
  params, opt = _adamw(torch, student)
  rng = np.random.default_rng(0)
  as_t = lambda b: {k: torch.from_numpy(v).long().to(device) for k, v in b.items()}

  def ce_sum(logits, tokens, loss_mask):
    w = loss_mask[:, 1:].float()
    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, args.vocab), tokens[:, 1:].reshape(-1), reduction="none")
    return (nll * w.reshape(-1)).sum(), w.sum().clamp(min=1)

  if bench == "sft":
    inputs = (as_t(lm_batch(rng, args)),)

    def loss_fn(u):
      s, n = ce_sum(
        student(input_ids=u["tokens"], attention_mask=u["attention_mask"]).logits, u["tokens"], u["loss_mask"]
      )
      return s / n
  else:
    teacher = LlamaForCausalLM(torch_config(args)).to(device).eval().requires_grad_(False)
    inputs = (as_t(lm_batch(rng, args)), as_t(lm_batch(rng, args)))

    def loss_fn(u, a):
      s, n = ce_sum(
        student(input_ids=u["tokens"], attention_mask=u["attention_mask"]).logits, u["tokens"], u["loss_mask"]
      )
      log_s = F.log_softmax(
        student(input_ids=a["tokens"], attention_mask=a["attention_mask"]).logits[:, :-1].float(), dim=-1
      )
      with torch.no_grad():
        log_t = F.log_softmax(
          teacher(input_ids=a["tokens"], attention_mask=a["attention_mask"]).logits[:, :-1].float(), dim=-1
        )
      wa = a["loss_mask"][:, 1:].float()
      kl = (torch.exp(log_t) * (log_t - log_s)).sum(-1)
      return s / n + (kl * wa).sum() / wa.sum().clamp(min=1)

  fn = torch.compile(loss_fn) if compile_ else loss_fn

  def step():
    loss = fn(*inputs)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  return _torch_timed(torch, step, args, device, block=lambda x: x.item())


def torch_forward(bench: str, args, compile_: bool, device: str) -> common.Runner:
  import torch
  from transformers import LlamaForCausalLM, LlamaModel

  torch.manual_seed(0)
  rng = np.random.default_rng(1)
  if bench == "filter":
    # Same shapes as the early-stopped JAX pass: only the first L/2 blocks exist.
    model = LlamaModel(torch_config(args, layers=args.layers // 2)).to(device).eval()
    fwd = torch.compile(model) if compile_ else model
    tokens = torch.from_numpy(rng.integers(4, args.vocab, size=(args.filter_prompts, args.seq))).to(device)
    mask = torch.ones_like(tokens)

    def step():
      out = []
      with torch.inference_mode():
        for i in range(0, len(tokens), args.filter_batch):
          h = fwd(input_ids=tokens[i : i + args.filter_batch], attention_mask=mask[i : i + args.filter_batch])
          out.append(h.last_hidden_state[:, -1].float())
      return torch.cat(out)
  else:
    model = LlamaForCausalLM(torch_config(args)).to(device).eval()
    model.generation_config.eos_token_id = None  # always max_new_tokens, as eos_id=-1 in JAX
    p = args.seq // 2
    tokens = torch.from_numpy(rng.integers(4, args.vocab, size=(args.batch, p))).to(device)

    def step():
      with torch.inference_mode():
        out = model.generate(
          input_ids=tokens,
          attention_mask=torch.ones_like(tokens),
          max_new_tokens=args.seq - p,
          do_sample=False,
          pad_token_id=0,
        )
      assert out.shape[1] == args.seq, out.shape
      return out

  return _torch_timed(torch, step, args, device, block=lambda x: x.cpu())


def torch_threads(args) -> list[int]:
  if args.torch_threads == "auto":
    return [common.num_cores()]
  return [int(n) for n in args.torch_threads.split(",")]


def with_threads(torch, n: int, runner: common.Runner) -> common.Runner:
  """The runner with torch's intra-op thread count set to n for each of its calls."""
  run = runner.run
  runner.run = lambda: (torch.set_num_threads(n), run())[1]
  return runner


def _torch_timed(torch, step, args, device, block) -> common.Runner:
  if device != "cuda":
    return common.Runner(step, block)
  torch.cuda.reset_peak_memory_stats()
  return common.Runner(
    step,
    lambda x: (block(x), torch.cuda.synchronize()),
    after_warmup=lambda: {"device_peak_mb": torch.cuda.max_memory_allocated() / 2**20},
  )


# ---------------------------------------------------------------- driver


def environment(args) -> dict:
  import jax

  env = {
    "cpu": common.cpu_model(),
    "cores": common.num_cores(),
    "jax_backend": jax.default_backend(),
    "device": str(jax.devices()[0].device_kind),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
    "loadavg_start": os.getloadavg()[0],
    **common.versions("jax", "jaxlib", "flax", "optax", "numpy"),
  }
  if args.torch:
    env.update(common.versions("torch", "transformers"))
  return env


def torch_device(args) -> str:
  if not args.torch:
    return "cpu"
  import torch

  return "cuda" if torch.cuda.is_available() else "cpu"


def runner_names(bench: str, args) -> list[tuple[str, str]]:
  """(impl, variant) of every run of one benchmark: the JAX variants, then torch eager / compile."""
  names = []
  for variant in args.variants.split(","):
    feats = set(variant.split("+")) - {"baseline"}
    if bench in ("filter", "gen") and feats and not feats & set(FORWARD_FEATURES):
      continue  # the same forward as baseline
    names.append(("jax", variant))
  if args.torch:
    for n in torch_threads(args):
      names.append(("torch eager", f"fp32, {n} thr"))
      if args.torch_compile and bench != "gen":
        names.append(("torch compile", f"fp32, {n} thr"))
  return names


def build_runner(bench: str, impl: str, variant: str, cfg, args) -> common.Runner:
  train = bench in ("sft", "reft")
  if impl == "jax":
    opts, chunk = variant_options(variant, args)
    if not train:
      return jax_forward(bench, cfg, opts, args)
    from reft_jax import losses

    feats = variant.split("+")
    # chunk_head_grad: losses' switch, read when jax_train traces the step, set to the per-chunk backward
    per_chunk = mock.patch.object(losses, "_defer_projection_grad", lambda: False)
    with per_chunk if "chunk_head_grad" in feats else contextlib.nullcontext():
      return jax_train(bench, cfg, opts, chunk, args, teacher_lora="teacher_lora" in feats)
  import torch

  fn = torch_train if train else torch_forward
  threads = int(re.search(r"(\d+) thr", variant).group(1))
  return with_threads(torch, threads, fn(bench, args, impl == "torch compile", torch_device(args)))


def run_all(args) -> dict:
  import jax

  cfg = model_config(args)
  env = environment(args)
  print(" | ".join(f"{k} {v}" for k, v in env.items()))
  print(
    f"model: llama L={cfg.num_layers} d={cfg.hidden_size} heads={cfg.num_heads}/{cfg.num_kv_heads} "
    f"ffn={cfg.intermediate_size} vocab={cfg.vocab_size} ({cfg.num_params() / 1e6:.1f}M params); "
    f"batch {args.batch} x {args.seq}; median of {args.steps} steps after {args.warmup} warmup"
  )
  device = torch_device(args)
  if args.torch:
    import torch

    torch.set_num_threads(common.num_cores())  # for the matmul peak

  def measure_peaks():
    p = {"jax_matmul": common.jax_matmul_flops()}
    if args.torch:
      p["torch_matmul"] = common.torch_matmul_flops(device=device)
    return p

  peaks_start = measure_peaks()

  rows = []

  def record(bench, impl, variant, r):
    flops, units, unit = bench_flops(bench, cfg, args)
    r = {
      "bench": bench,
      "impl": impl,
      "variant": variant,
      "step_ms": 1000 * r["step_s"],
      "throughput": units / r["step_s"],
      "unit": unit,
      "gflops": flops / r["step_s"] / 1e9,
      **r,
    }
    rows.append(r)
    print(
      f"  {bench:6s} {impl:13s} {variant:24s} {r['step_ms']:8.1f} ms  {r['throughput']:9.1f} {unit}  "
      f"{r['gflops']:6.1f} GFLOP/s  compile {r['compile_s']:.1f}s"
      + (f"  cpu {1000 * r['step_cpu_s']:.0f} ms" if "step_cpu_s" in r else ""),
      flush=True,
    )

  for bench in args.benches.split(","):
    names = runner_names(bench, args)  # (impl, variant), all timed in interleaved rounds
    if args.isolate:
      keys = ["|".join((bench, impl, variant)) for impl, variant in names]
      res = common.measure_isolated(os.path.abspath(__file__), args.argv, keys, args.warmup, args.steps)
      res = {tuple(k.split("|")[1:]): r for k, r in res.items()}
    else:
      res = common.measure({n: build_runner(bench, *n, cfg, args) for n in names}, args.warmup, args.steps)
      jax.clear_caches()
    for (impl, variant), r in res.items():
      record(bench, impl, variant, r)

  # The peak: the best matmul rate at the start or the end (other load on the cores lowers either).
  peaks_end = measure_peaks()
  peaks = {k: max(v, peaks_end[k]) for k, v in peaks_start.items()}
  peak = args.peak_flops or max(peaks.values())
  print(
    "float32 2048^3 matmul, best of start/end: "
    + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items())
    + f"; MFU against {peak / 1e9:.1f} GFLOP/s"
    + (" (given)" if args.peak_flops else "")
  )
  for r in rows:
    r["mfu_pct"] = 100 * r["gflops"] * 1e9 / peak
  for r in rows:  # JAX throughput over torch's, same bench
    for mode in ("torch eager", "torch compile"):
      refs = [x["throughput"] for x in rows if x["bench"] == r["bench"] and x["impl"] == mode]
      if r["impl"] == "jax" and refs:  # against torch's best thread count
        r["vs_" + mode.replace(" ", "_")] = r["throughput"] / max(refs)
  return {
    "args": vars(args),
    "env": env,
    "peak_flops": peak,
    "measured_peaks": {"start": peaks_start, "end": peaks_end},
    "model": {
      k: getattr(cfg, k)
      for k in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")
    },
    "rows": rows,
  }


COLUMNS = [
  ("bench", "bench", ""),
  ("impl", "impl", ""),
  ("variant", "variant", ""),
  ("step_ms", "ms/step", ".1f"),
  ("throughput", "throughput", ".1f"),
  ("unit", "unit", ""),
  ("gflops", "GFLOP/s", ".1f"),
  ("mfu_pct", "MFU %", ".1f"),
  ("compile_s", "compile s", ".1f"),
  ("rss_delta_mb", "RSS Δ MB", ".0f"),
  ("xla_temp_mb", "XLA temp MB", ".0f"),
  ("device_peak_mb", "device peak MB", ".0f"),
  ("vs_torch_eager", "× torch eager", ".2f"),
  ("vs_torch_compile", "× torch compile", ".2f"),
]


def main(argv=None):
  worker, argv = common.worker_name(argv)
  args = parse_args(argv)
  args.argv = argv  # what a worker process is started with
  if worker is not None:  # one run of measure_isolated, in its own process
    bench, impl, variant = worker.split("|")
    return common.serve(lambda: build_runner(bench, impl, variant, model_config(args), args), args.warmup)
  t0 = time.perf_counter()
  out = run_all(args)
  out["wall_s"] = time.perf_counter() - t0
  out["env"]["loadavg_end"] = os.getloadavg()[0]  # other processes on the cores skew every timing
  cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in out["rows"])]
  print()
  print(common.markdown_table(out["rows"], cols))
  print(
    f"\ntotal {out['wall_s']:.0f} s; 1-min load average {out['env']['loadavg_start']:.1f} at the start, "
    f"{out['env']['loadavg_end']:.1f} at the end ({out['env']['cores']} cores)"
  )
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(out, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  from reft_jax import hugepages

  hugepages.reexec_with_huge_pages(sys.orig_argv[1:])  # the CLI's allocator setting, for JAX and torch alike
  main()
