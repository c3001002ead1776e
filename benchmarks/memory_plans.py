"""Memory plans for the 7B-class presets on every hardware, in one table (see reft_jax/pipelines/plan.py).

  python benchmarks/memory_plans.py [--presets llama2_7b,llama3_8b,qwen2_7b,gemma2_9b] [--hardware all]
      [--stage student] [--modes lora,full] [--compile false] [--set train.batch_size=8 ...]

llama3_8b has no run preset: it is planned with llama2_7b's training settings on its architecture.
Prints the table and writes benchmarks/results/memory_plans.{md,json}. Compiling a 7B step on simulated
CPU devices takes tens of seconds (hardware with the same mesh share one); --compile false gives the
exact and analytic columns in seconds.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = ("llama2_7b", "llama3_8b", "qwen2_7b", "gemma2_9b")


def _bool(s: str) -> bool:
  if s.lower() not in ("1", "0", "true", "false", "yes", "no"):
    raise argparse.ArgumentTypeError(f"{s!r} is not a boolean")
  return s.lower() in ("1", "true", "yes")


def load_config(preset: str):
  spec = importlib.util.spec_from_file_location("default_config", os.path.join(ROOT, "configs", "default.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("llama2_7b" if preset == "llama3_8b" else preset)
  c.model.arch = preset
  return c


def with_overrides(c, items: list[str]):
  """--set a.b=value, typed like the config's current value."""
  from reft_jax.config import with_updates

  updates = {}
  for item in items:
    key, _, value = item.partition("=")
    node = c
    for part in key.split("."):
      node = node[part]
    kind = type(node)
    updates[key] = _bool(value) if kind is bool else kind(value)
  return with_updates(c, **updates)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--presets", default=",".join(PRESETS))
  ap.add_argument("--hardware", default="all")
  ap.add_argument("--stage", default="student", help="sft | teacher | student")
  ap.add_argument("--modes", default="lora,full")
  ap.add_argument("--compile", type=_bool, default=True)
  ap.add_argument("--set", action="append", default=[], help="config override a.b=value (repeatable)")
  ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
  args = ap.parse_args()

  from reft_jax.pipelines import plan

  hardware = plan.parse_hardware(args.hardware)
  if args.compile:  # before anything starts JAX's backends
    plan.ensure_cpu_devices(max(h.devices for h in hardware))
  import jax

  start = time.perf_counter()
  rows, notes, described = [], [], []
  for preset in args.presets.split(","):
    c = with_overrides(load_config(preset.strip()), args.set)
    specs = [plan.stage_spec(c, mode, args.stage) for mode in args.modes.split(",")]
    described += [plan.describe(s) for s in specs]
    r, n = plan.plan_rows(
      specs,
      hardware,
      (c.mesh.data, c.mesh.fsdp, c.mesh.tensor),
      plan.shd.parse_rules(c.mesh.rules),
      args.compile,
      log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    rows += r
    notes += n
  wall = time.perf_counter() - start
  compile_s = sum(r["compiled"]["seconds"] for r in rows if r["compiled"])
  env = (
    f"jax {jax.__version__}; compiled on {len(jax.devices('cpu'))} simulated CPU devices"
    if args.compile
    else f"jax {jax.__version__}; not compiled (--compile false)"
  )
  timing = f"{len(rows)} rows in {wall:.0f} s ({compile_s:.0f} s compiling); {env}"
  text = "\n".join([*described, "", plan.format_table(rows), "", plan.FOOTER, *notes, timing])
  print(text)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "memory_plans.md"), "w") as f:
    f.write(text + "\n")
  with open(os.path.join(args.out, "memory_plans.json"), "w") as f:
    json.dump({"rows": rows, "notes": notes, "specs": described, "wall_seconds": wall}, f, indent=2)


if __name__ == "__main__":
  main()
