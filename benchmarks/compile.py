"""Compile time and compiled memory of a real train step at a real model's depth: unrolled vs scanned
layers, remat, what buffer donation saves, and a cold vs warm persistent compilation cache.

  python benchmarks/compile.py                               # the smollm2 preset's ReFT student step
  python benchmarks/compile.py --preset llama2_7b --stage sft --variants scan --devices 8

Every measurement runs in a fresh process (no in-memory JAX caches) and compiles the step that
training runs (plan.compiled_bytes: train.make_train_step + jit_step from abstract arguments; no weights
are loaded). "cache cold/warm" compile the same step twice with `compile_cache=DIR` (main.py's
jax_compilation_cache_dir) in two processes: the second reads the executable instead of compiling.
Donation is read off the same compile: XLA reports the bytes the donated state aliases
(`alias`), which a step without donation holds twice. Prints one table and writes
benchmarks/results/compile.json. Timings belong here, not in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = {  # name -> config overrides on top of the preset
  "unrolled": {"model.scan_layers": False, "model.remat": "none"},
  "scan": {"model.scan_layers": True, "model.remat": "none"},
  "scan_remat": {"model.scan_layers": True, "model.remat": "full"},
  "unrolled_remat": {"model.scan_layers": False, "model.remat": "full"},
  "scan_chunked_loss": {"model.scan_layers": True, "model.remat": "none", "train.loss_chunk": 16},
}
ARCH = {"smollm2": "smollm2_135m"}  # presets that load a file: the architecture preset to plan with


def worker(args) -> dict:
  """Compiles one step in this process; returns plan.compiled_bytes' numbers."""
  if args.devices > 1:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
  import jax

  if args.cache_dir:
    jax.config.update("jax_compilation_cache_dir", args.cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  from configs.default import get_config
  from reft_jax.pipelines import plan
  from reft_jax import sharding as shd

  c = get_config(args.preset)
  c.model.arch = ARCH.get(args.preset, c.model.arch)
  c.model.hf_path = ""
  for key, value in VARIANTS[args.variant].items():
    section, field = key.split(".")
    c[section][field] = value
  spec = plan.stage_spec(c, stage=args.stage)
  mesh = shd.make_mesh(1, -1, 1, devices=jax.devices()[: args.devices])
  out = plan.compiled_bytes(spec, mesh, shd.DEFAULT_RULES)
  out["describe"] = plan.describe(spec)
  return out


def run_worker(args, variant: str, cache_dir: str = "") -> dict:
  cmd = [
    sys.executable,
    __file__,
    "--worker",
    "--preset",
    args.preset,
    "--stage",
    args.stage,
    "--variant",
    variant,
    "--devices",
    str(args.devices),
    "--cache_dir",
    cache_dir,
  ]
  root = os.path.dirname(HERE)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
  r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root)
  if r.returncode:
    raise SystemExit(f"worker {variant} failed:\n{r.stderr[-3000:]}")
  return json.loads(r.stdout.strip().splitlines()[-1])


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--preset", default="smollm2", help="a configs/default.py preset")
  ap.add_argument("--stage", default="student", choices=("sft", "teacher", "student"))
  ap.add_argument(
    "--variants", default="unrolled,scan,scan_remat,scan_chunked_loss", help=f"comma list of {tuple(VARIANTS)}"
  )
  ap.add_argument("--cache", default="scan", help="variant to compile cold then warm ('' to skip)")
  ap.add_argument("--devices", type=int, default=1)
  ap.add_argument("--out", default=os.path.join(HERE, "results", "compile.json"))
  ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--variant", default="scan", help=argparse.SUPPRESS)
  ap.add_argument("--cache_dir", default="", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.worker:
    print(json.dumps(worker(args)))
    return
  bad = [v for v in args.variants.split(",") + ([args.cache] if args.cache else []) if v not in VARIANTS]
  if bad:
    ap.error(f"unknown variant {bad[0]!r}; choose from {tuple(VARIANTS)}")

  rows = []
  for v in args.variants.split(","):
    rows.append({"variant": v, **run_worker(args, v)})
    print(f"  {v}: {rows[-1]['seconds']:.1f} s", flush=True)
  if args.cache:
    with tempfile.TemporaryDirectory() as d:
      for label in ("cache cold", "cache warm"):
        rows.append({"variant": f"{args.cache}, {label}", **run_worker(args, args.cache, d)})
        print(f"  {rows[-1]['variant']}: {rows[-1]['seconds']:.1f} s", flush=True)

  mib = lambda b: f"{b / 2**20:,.0f}"
  print(f"\n{args.preset} {args.stage} step on {args.devices} CPU device(s): {rows[0]['describe']}\n")
  print("| variant | trace + lower s | XLA compile s | total s | temp MiB | peak MiB | donated (alias) MiB |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(
      f"| {r['variant']} | {r['seconds'] - r['compile_seconds']:.1f} | {r['compile_seconds']:.1f} | "
      f"{r['seconds']:.1f} | {mib(r['temp'])} | {mib(r['peak'])} | {mib(r['alias'])} |"
    )
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"preset": args.preset, "stage": args.stage, "devices": args.devices, "rows": rows}, f, indent=1)
  print(f"\nwrote {args.out}")


if __name__ == "__main__":
  main()
