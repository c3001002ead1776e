"""Entry point.

  python -m reft_jax [train] --config=configs/default.py:tiny --workdir=DIR [--config.x=y]
  python -m reft_jax eval --config=... --workdir=DIR [--config.eval.model_path=HF_DIR]
  python -m reft_jax plan --config=... --workdir=DIR [--config.plan.hardware=v5e-8]  (memory plan)
  python -m reft_jax screen --config=... --workdir=DIR --config.screen.teacher=REFT_WORKDIR \
      --config.data.source=upload.jsonl  (screen an upload, no training; exit 0 accept, 3 reject)

Several processes (a TPU pod, GPU hosts, or processes on one machine) run the same command with
--distributed; on Cloud TPU, SLURM and Open MPI the job is detected, elsewhere give
--coordinator_address/--num_processes/--process_id (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback

from absl import app, flags
from ml_collections import config_flags

from reft_jax import hugepages

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file[:preset]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and results")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "join a multi-process job: jax.distributed.initialize()")
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", "", "host:port of process 0 (default: $JAX_COORDINATOR_ADDRESS or detected)"
)
_NUM_PROCESSES = flags.DEFINE_integer(
  "num_processes", 0, "processes in the job (default: $JAX_NUM_PROCESSES or detected)"
)
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "this process's index (default: $JAX_PROCESS_ID or detected)")
_VERBOSE = flags.DEFINE_bool("verbose", False, "on an error, print the full traceback (always in workdir/error.log)")


COMMANDS = ("train", "eval", "plan", "screen")


def main(argv) -> int:
  command = argv[1] if len(argv) > 1 else "train"
  if command not in COMMANDS or len(argv) > 2:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; the command is one of {COMMANDS}")
  _setup_logging()
  from reft_jax import distributed as dist

  # Explicit job flags imply --distributed; either way it must precede any device use.
  if _DISTRIBUTED.value or _COORDINATOR.value or _NUM_PROCESSES.value or _PROCESS_ID.value >= 0:
    dist.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  c = _CONFIG.value
  if c is None or not _WORKDIR.value:
    raise app.UsageError("--config and --workdir are required")
  if command == "plan":  # shapes only: before anything starts JAX's devices (it simulates its own)
    from reft_jax.pipelines import plan

    return plan.main(c, _WORKDIR.value)
  return execute(c, _WORKDIR.value, command, _VERBOSE.value)


def execute(c, workdir: str, command: str = "train", verbose: bool = False) -> int:
  """Everything after the flags, for a config already built (tests and notebooks call it directly):
  preflight, validation and the workdir's checks (exit 2), the run (exit 1 on any error: one line, the
  traceback in workdir/error.log and, with verbose, on stderr), the results table; the exit status."""
  from reft_jax import distributed as dist
  from reft_jax import files
  from reft_jax.config import ConfigError
  from reft_jax.pipelines import preflight, screen
  from reft_jax.pipelines.validate import validate
  from reft_jax.stages import Stopped

  try:
    # Hub names and the judge first: offline, a missing checkpoint or dataset fails now, not after training.
    if command == "screen" or c.method == "screen":  # the teacher is its only model: no base, no eval
      screen.prepare(c)
    preflight.check(c, command)
    validate(c)
    files.check_workdir(workdir)  # a file, read-only or full: before any state is touched
  except (preflight.PreflightError, ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except OSError as e:
    print(f"error: {files.describe(e)}", file=sys.stderr)
    return 2
  try:
    with files.workdir_lock(workdir) if dist.is_primary() else contextlib.nullcontext():
      return _run(c, workdir, command)
  except files.WorkdirBusy as e:  # no error.log: the workdir is the other run's
    print(f"error: {e}", file=sys.stderr)
    return 2
  except Stopped:
    print(f"stopped by signal; checkpoint saved in {workdir}. Rerun the same command to resume.")
    return 0
  except Exception as e:  # the one error boundary: whatever failed, one line here and the traceback in a file
    return _report(e, workdir, verbose)


def _run(c, workdir: str, command: str) -> int:
  import jax

  from reft_jax import distributed as dist
  from reft_jax.config import dump
  from reft_jax.model.build import model_dir
  from reft_jax.pipelines import screen
  from reft_jax.stages import on_first_start

  ours = logging.getLogger("reft_jax")
  fresh = True
  if command != "eval":  # eval trains nothing: it neither checks nor writes config.json
    refused, fresh = _against_saved_config(c, workdir)
    if refused:
      return 2
  if c.compile_cache:  # compiled executables persist across runs: a rerun or resume skips compiling
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(c.compile_cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  ours.info(
    "jax %s on %d %s device(s), process %d of %d; workdir %s",
    jax.__version__,
    jax.device_count(),
    jax.devices()[0].platform,
    jax.process_index(),
    jax.process_count(),
    workdir,
  )
  if c.model.attention == "splash" and jax.default_backend() != "tpu":
    ours.warning(
      "model.attention=splash on %s: the Pallas TPU kernel runs in its interpreter, correct but "
      "far slower (use einsum, dpa or cudnn off TPU)",
      jax.default_backend(),
    )
  record = c.copy_and_resolve_references()  # as given: the GGUF conversion below changes model.hf_path
  # config.json is written when the first stage starts training, by process 0 (the workdir is shared), and
  # only in a workdir that holds no work made before (there it records that work's config).
  with on_first_start(lambda: dump(record, workdir) if fresh and dist.is_primary() else None):
    if c.model.gguf:  # converted once into a HF directory, which every stage then reads
      c.model.hf_path = model_dir(c.model.gguf)
    if command == "eval":
      return _eval(c, workdir)
    out = run_method(c, workdir)
  if c.method == "screen":  # the decision is the exit status: a provider's pipeline branches on it
    if dist.is_primary():
      print(f"screen: {screen.describe(out['summary'])}; report in {os.path.join(workdir, 'screen')}")
    return out["exit_code"]
  if "results" in out and dist.is_primary():
    _print_results(workdir)
  h = out.get("history")
  print(
    f"done: {len(h)} steps, final loss {h[-1]['loss']:.4f}; outputs in {workdir}"
    if h
    else f"done (finished stages were reused); outputs in {workdir}"
    if out.get("reused")
    else f"done; outputs in {workdir}"
  )
  return 0


def _against_saved_config(c, workdir: str) -> tuple[bool, bool]:
  """Compares c with workdir/config.json when the workdir holds work a rerun would reuse. Returns (refused,
  fresh): refused (the line printed) when they differ in a field that changes results under
  resume_policy=strict; fresh when there is no such work, so the first stage (re)writes config.json."""
  from reft_jax.config import differences, read_saved
  from reft_jax.stages import reusable_work

  work = reusable_work(workdir)
  saved = read_saved(workdir) if work else None
  if saved is None:
    return False, True
  diff = differences(saved, c)
  if diff and c.resume_policy == "strict":
    print(
      f"error: {workdir} holds work made with another config ({'; '.join(diff)}); rerun with the saved "
      "settings, use a new --workdir, or reuse that work as it is with --config.resume_policy=reuse",
      file=sys.stderr,
    )
    return True, False
  if diff:
    logging.getLogger("reft_jax").warning(
      "resume_policy=reuse: the config differs from %s (%s); reused as they are: %s (config.json keeps "
      "the saved config)",
      os.path.join(workdir, "config.json"),
      "; ".join(diff),
      ", ".join(work),
    )
  return False, False


def _report(e: Exception, workdir: str, verbose: bool) -> int:
  """Exit 1 with one line on stderr: the error's own message for a known kind (bad input, a diverged run, a
  file system error), its type and first line otherwise; the traceback goes to workdir/error.log (and, with
  verbose, to stderr)."""
  import jax

  from reft_jax import distributed as dist
  from reft_jax import files
  from reft_jax.train import NonFiniteLoss

  tb = traceback.format_exc()
  known = isinstance(e, (OSError, ValueError, NonFiniteLoss))  # ours: bad input, named; a diverged run; a disk
  line = files.describe(e) if isinstance(e, OSError) else str(e) if known else f"{type(e).__name__}: {e}"
  line = (line.strip().splitlines() or [type(e).__name__])[0]
  path = os.path.join(workdir, "error.log" if dist.is_primary() else f"error.{jax.process_index()}.log")
  try:
    files.write_atomic(path, tb)
    if not known:
      line += f" (an internal error; the traceback is in {path}: please report it)"
  except OSError as w:  # a full or read-only disk: say so rather than fail again
    line += f" (the traceback could not be saved: {files.describe(w)}; --verbose prints it)"
  print(f"error: {line}", file=sys.stderr)
  if verbose:
    print(tb, file=sys.stderr, end="")
  return 1


def run_method(c, workdir: str) -> dict:
  """Runs c.method (a pipeline, or any registered defence) on a validated config; raises stages.Stopped."""
  from reft_jax import defences
  from reft_jax.pipelines import alignment, analyze, demo, robustness, screen, suite, train

  # reft.alignment="build": the real-model alignment set
  if c.method in ("demo", "sweep", "robustness", *defences.names()):
    c = alignment.prepare(c, workdir)
  pipelines = {
    "sft": train.run,
    "pretrain": train.run,
    "demo": demo.run_demo,
    "sweep": demo.run_sweep,
    "robustness": robustness.run,
    "analyze": analyze.run,
    "screen": screen.run,
  }
  return pipelines.get(c.method, suite.run_one)(c, workdir)


def _setup_logging() -> logging.Logger:
  from absl import logging as absl_logging

  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file it writes at INFO
  # Our own INFO lines get their own handler (absl's root handler now drops INFO).
  handler = logging.StreamHandler()
  handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
  ours = logging.getLogger("reft_jax")
  ours.setLevel(logging.INFO)
  ours.addHandler(handler)
  ours.propagate = False
  return ours


def _eval(c, workdir: str) -> int:
  from reft_jax import distributed as dist
  from reft_jax.data.tokenizer import load_tokenizer
  from reft_jax.eval.record import evaluate_and_record
  from reft_jax.model import load_hf
  from reft_jax.model.build import setup_mesh

  path = c.eval.model_path or os.path.join(workdir, c.method, "model")
  if not os.path.isdir(path):
    print(f"error: no model to evaluate at {path} (set --config.eval.model_path)", file=sys.stderr)
    return 2
  mesh, rules = setup_mesh(c)
  model = load_hf(path, c.model.dtype, mesh, rules=rules)
  evaluate_and_record(c, workdir, model, load_tokenizer(path), mesh, c.eval.name or "eval", {"model_path": path})
  if dist.is_primary():
    _print_results(workdir)
  return 0


def _print_results(workdir: str) -> None:
  import json

  from reft_jax.eval.run import format_table

  with open(os.path.join(workdir, "results.json")) as f:
    print(format_table(json.load(f)["runs"]))


def _parse_flags(argv):
  # config_flags raises KeyError/AttributeError deep inside ml_collections for an unknown key, and a broken
  # config file as a traceback inside the flag's message: turn each into one line that names the flag.
  message = _config_file_problem(argv)
  if message is None:
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      lines = [line for line in str(e).splitlines() if line.strip()]
      # ml_collections wraps the config file's own error (the last line) in its traceback
      message = lines[0] if len(lines) < 2 else f"{lines[0].split(': Error whilst')[0]}: {lines[-1].strip()}"
      message = message.removeprefix("flag ")  # absl's own prefix: the line already says "bad flag"
    except (KeyError, AttributeError, TypeError, ValueError) as e:
      bad = [a for a in argv[1:] if str(e).strip("\"'") in a] or argv[1:]
      message = f"{bad[0]}: {type(e).__name__} {e} (unknown config key or wrong type)"
    except Exception as e:  # the config file itself failed (a NameError, an ImportError, ...)
      message = f"--config: the config file failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
  print(f"error: bad flag {message}", file=sys.stderr)
  sys.exit(2)


def _config_file_problem(argv) -> str | None:
  """What is wrong with --config's file before ml_collections runs it (it reports these as tracebacks)."""
  values = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")]
  if not values:
    return None
  path = values[-1].split(":", 1)[0]
  if os.path.isdir(path):
    return f"--config={values[-1]}: {path} is a directory, not a config file (e.g. configs/default.py:tiny)"
  try:
    with open(path, "rb") as f:
      compile(f.read().decode("utf-8"), path, "exec")
  except OSError as e:
    return f"--config={values[-1]}: {e.strerror or e}"
  except UnicodeDecodeError as e:
    return f"--config={values[-1]}: {path} is not UTF-8 text ({e.reason} at byte {e.start})"
  except (SyntaxError, ValueError) as e:  # ValueError: null bytes
    where = f"{path}:{e.lineno}" if isinstance(e, SyntaxError) else path
    return f"--config={values[-1]}: {where}: not valid Python ({getattr(e, 'msg', e)})"
  return None


def run():
  """Console script `reft-jax`."""
  # before JAX is imported: the allocator reads the tunable when the process starts
  hugepages.reexec_with_huge_pages(hugepages.cli_command(sys.orig_argv))
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
