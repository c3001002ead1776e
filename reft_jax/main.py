"""Entry point.

  python -m reft_jax [train] --config=configs/default.py:tiny --workdir=DIR [--config.x=y]
  python -m reft_jax eval --config=... --workdir=DIR [--config.eval.model_path=HF_DIR]
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file[:preset]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and results")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "call jax.distributed.initialize() (multi-host TPU/GPU)")


COMMANDS = ("train", "eval")


def main(argv) -> int:
  command = argv[1] if len(argv) > 1 else "train"
  if command not in COMMANDS or len(argv) > 2:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; the command is one of {COMMANDS}")
  from absl import logging as absl_logging

  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file it writes at INFO
  # Our own INFO lines get their own handler (absl's root handler now drops INFO).
  handler = logging.StreamHandler()
  handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
  ours = logging.getLogger("reft_jax")
  ours.setLevel(logging.INFO)
  ours.addHandler(handler)
  ours.propagate = False
  import jax

  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  from reft_jax import config as config_lib
  from reft_jax.methods import analyze, demo, reft, sft

  c = _CONFIG.value
  if c is None or not _WORKDIR.value:
    raise app.UsageError("--config and --workdir are required")
  try:
    config_lib.validate(c)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  config_lib.dump(c, _WORKDIR.value)
  ours.info("jax %s on %d %s device(s); workdir %s", jax.__version__, jax.device_count(),
               jax.devices()[0].platform, _WORKDIR.value)
  from reft_jax.train import NonFiniteLoss

  try:
    if c.model.gguf:  # converted once into a HF directory, which every stage then reads
      from reft_jax.model.gguf import converted_dir

      c.model.hf_path = converted_dir(c.model.gguf)
    if command == "eval":
      return _eval(c, _WORKDIR.value)
    out = {"sft": sft.run, "pretrain": sft.run, "reft": reft.run, "demo": demo.run_demo,
           "sweep": demo.run_sweep, "analyze": analyze.run}[c.method](c, _WORKDIR.value)
  except (ValueError, FileNotFoundError, NonFiniteLoss) as e:
    # Bad input (data file, checkpoint, ...) or a diverged run: one clear line; the traceback goes
    # to workdir/error.log for debugging.
    with open(os.path.join(_WORKDIR.value, "error.log"), "w") as f:
      traceback.print_exc(file=f)
    print(f"error: {e}", file=sys.stderr)
    return 1
  if out["stopped"]:
    print(f"stopped by signal; checkpoint saved in {_WORKDIR.value}. Rerun the same command to "
          "resume.")
    return 0
  if "results" in out:
    _print_results(_WORKDIR.value)
  h = out["history"]
  print(f"done: {len(h)} steps, final loss {h[-1]['loss']:.4f}; outputs in {_WORKDIR.value}" if h else
        f"done (finished stages were reused); outputs in {_WORKDIR.value}")
  return 0


def _eval(c, workdir: str) -> int:
  from reft_jax import experiment
  from reft_jax.data.tokenizer import load_tokenizer
  from reft_jax.model import load_hf

  path = c.eval.model_path or os.path.join(workdir, c.method, "model")
  if not os.path.isdir(path):
    print(f"error: no model to evaluate at {path} (set --config.eval.model_path)", file=sys.stderr)
    return 2
  mesh, rules = experiment.setup_mesh(c)
  model = load_hf(path, c.model.dtype, mesh, rules=rules)
  experiment.evaluate_and_record(c, workdir, model, load_tokenizer(path), mesh, c.eval.name or "eval",
                                 {"model_path": path})
  _print_results(workdir)
  return 0


def _print_results(workdir: str) -> None:
  import json

  from reft_jax.eval.run import format_table

  with open(os.path.join(workdir, "results.json")) as f:
    print(format_table(json.load(f)["runs"]))


def _parse_flags(argv):
  # config_flags raises KeyError/AttributeError deep inside ml_collections for an unknown key:
  # turn every override error into one line that names the flag.
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    message = str(e)
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    bad = [a for a in argv[1:] if str(e).strip("\"'") in a] or argv[1:]
    message = f"{bad[0]}: {type(e).__name__} {e} (unknown config key or wrong type)"
  print(f"error: bad flag {message}", file=sys.stderr)
  sys.exit(2)


def run():
  """Console script `reft-jax`."""
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
