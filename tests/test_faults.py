"""Faults a user hits: each fails with one line and a nonzero exit, and never loses or changes the work a
finished stage wrote (its files stay byte-identical). The README's "Guarantees when things go wrong" names
these tests."""

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest

from helpers import ROOT, load_config_module, tiny_config
from reft_jax import config as config_lib
from reft_jax import files
from reft_jax.checkpoint import Checkpointer
from reft_jax.main import execute
from reft_jax.train import NonFiniteLoss, train_loop

# ---------------------------------------------------------------- helpers


def _run(capsys, c, workdir, command="train", verbose=False):
  """execute in this process: (exit code, stdout, stderr)."""
  code = execute(c, str(workdir), command, verbose)
  out = capsys.readouterr()
  return code, out.out, out.err


def _one_line(err: str) -> str:
  """The error line, asserting it is the only thing on stderr (progress and log lines go elsewhere)."""
  lines = [l for l in err.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
  assert "Traceback" not in err
  return lines[0]


def _snapshot(workdir) -> dict:
  """sha256 of every file under workdir but the lock (it names the run holding it)."""
  out = {}
  for root, _, names in os.walk(workdir):
    for n in names:
      path = os.path.join(root, n)
      if n != ".lock" and os.path.isfile(path):
        out[os.path.relpath(path, workdir)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
  return out


def _unchanged(before: dict, workdir) -> None:
  after = _snapshot(workdir)
  changed = sorted(k for k in before if after.get(k) != before[k])
  assert not changed, f"changed or lost: {changed}"


def _config(**overrides):
  return tiny_config(**{"train.num_steps": 4, "checkpoint.every_steps": 2, **overrides})


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished 4-step tiny run (checkpoints 2 and 4, an exported model); tests copy it before changing it."""
  workdir = tmp_path_factory.mktemp("finished")
  assert execute(_config(), str(workdir)) == 0
  assert sorted(os.listdir(workdir / "sft" / "checkpoints")) == ["2", "4"]
  return workdir


def _copy(finished, tmp_path, drop_model=True):
  """A copy of the finished run; without its exported model the stage resumes from its checkpoints."""
  workdir = tmp_path / "run"
  shutil.copytree(finished, workdir)
  if drop_model:
    shutil.rmtree(workdir / "sft" / "model")
  return workdir


# ---------------------------------------------------------------- 1. diverged states are never saved


class _Saves:
  """A checkpointer that records what train_loop asks it to save."""

  def __init__(self):
    self.steps = []

  def should_save(self, step):
    return True

  def save(self, step, tree, meta):
    self.steps.append(step)


def _loop(nan_at: int, key: str):
  def step_fn(state, batch):
    bad = state.step == nan_at
    metrics = {"loss": 1.0, "grad_norm": 1.0, "tokens": 4.0, "lr": 0.1}
    metrics[key] = float("nan") if bad else metrics[key]
    return types.SimpleNamespace(step=state.step + 1), metrics

  batcher = types.SimpleNamespace(global_batch=lambda step, sh: {"tokens": np.zeros((1, 4), np.int32)})
  saves = _Saves()
  with pytest.raises(NonFiniteLoss) as e:
    train_loop(
      types.SimpleNamespace(step=0), step_fn, batcher, None, num_steps=6, checkpointer=saves,
      save_state=lambda s: s, progress=False,
    )  # fmt: skip
  return str(e.value), saves.steps


@pytest.mark.parametrize("key", ["grad_norm", "loss"])
def test_a_nan_gradient_or_loss_stops_before_its_state_is_saved(key):
  # A NaN gradient at step 2 with a finite loss (lr=1e6 on tiny) breaks the state after step 2: the
  # checkpoint of step 3 would hold it. The loop checks step 2's metrics before that save and stops.
  message, saved = _loop(nan_at=2, key=key)
  assert saved == [1, 2]
  assert f"{key.replace('_', ' ')} became nan at step 2" in message and "\n" not in message


def test_the_checkpoint_a_diverged_step_started_from_is_set_aside(tmp_path, caplog):
  # lr=1e6: step 1's update leaves finite but huge weights (checkpoint 2), whose gradient at step 2 is NaN;
  # resuming from checkpoint 2 at any lr would diverge again, so train_stage sets it aside.
  ckpt = _orbax(tmp_path, [1, 2])
  with caplog.at_level(logging.WARNING, logger="reft_jax"):
    ckpt.discard(2, "holds the state whose next step was not finite (step 2)")
    ckpt.discard(5, "never saved: nothing to do")
  step, _, _ = ckpt.restore_latest({"w": jnp.zeros(4)})
  ckpt.close()
  assert step == 1 and os.listdir(tmp_path / "checkpoints.corrupt") == ["2"]
  assert [r.getMessage().split(";")[0] for r in caplog.records if r.name.startswith("reft_jax")] == [
    f"checkpoint {tmp_path}/checkpoints/2 holds the state whose next step was not finite (step 2)"
  ]


# ---------------------------------------------------------------- 3. corrupt checkpoints


def _orbax(tmp_path, steps, bad=()):
  ckpt = Checkpointer(str(tmp_path / "checkpoints"), max_to_keep=5, async_save=False)
  for s in steps:
    w = jnp.full((4,), jnp.nan if s in bad else float(s))
    ckpt.save(s, {"w": w}, {"step": s, "data_position": s})
  return ckpt


def _corrupt(step_dir, how: str) -> None:
  """Damages a saved checkpoint as a crash, a full disk or a careless user would."""
  data = sorted((os.path.join(r, n) for r, _, ns in os.walk(step_dir) for n in ns), key=os.path.getsize, reverse=True)
  if how == "emptied":
    for name in os.listdir(step_dir):
      p = os.path.join(step_dir, name)
      shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
  elif how == "deleted":
    for p in data:  # every data file of the state
      if os.sep + "state" + os.sep in p:
        os.remove(p)
  else:  # truncated: every file of the state cut in half
    for p in data:
      if os.sep + "state" + os.sep in p:
        os.truncate(p, os.path.getsize(p) // 2)


@pytest.mark.parametrize("how", ["deleted", "truncated", "emptied"])
def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog, how):
  ckpt = _orbax(tmp_path, [2, 4])
  ckpt.close()
  good = _snapshot(tmp_path / "checkpoints" / "2")
  _corrupt(tmp_path / "checkpoints" / "4", how)
  ckpt = Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  with caplog.at_level(logging.WARNING, logger="reft_jax"):
    step, tree, meta = ckpt.restore_latest({"w": jnp.zeros(4)})
  ckpt.close()
  assert step == 2 and meta["step"] == 2 and np.asarray(tree["w"]).tolist() == [2.0] * 4
  warning = [r.getMessage() for r in caplog.records if r.name.startswith("reft_jax") and r.levelno == logging.WARNING]
  assert len(warning) == 1 and "checkpoint" in warning[0] and "/4 does not restore" in warning[0], warning
  # Set aside, not deleted; the good one untouched.
  assert os.path.isdir(tmp_path / "checkpoints.corrupt" / "4")
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
  _unchanged(good, tmp_path / "checkpoints" / "2")


def test_a_diverged_checkpoint_is_skipped_and_when_none_restores_nothing_is_moved(tmp_path):
  ckpt = _orbax(tmp_path, [2, 4], bad={4})  # an older version saved a NaN state
  step, _, _ = ckpt.restore_latest({"w": jnp.zeros(4)})
  assert step == 2
  ckpt.close()
  ckpt = _orbax(tmp_path / "all_bad", [2], bad={2})
  with pytest.raises(ValueError) as e:
    ckpt.restore_latest({"w": jnp.zeros(4)})
  ckpt.close()
  assert "no checkpoint restores (2: holds NaN/inf values" in str(e.value) and "\n" not in str(e.value)
  assert os.listdir(tmp_path / "all_bad" / "checkpoints") == ["2"]


@pytest.mark.slow  # compiles a train step (or starts five processes): ~20 s on 2 cores
def test_a_rerun_resumes_past_a_corrupt_checkpoint_and_a_torn_metrics_line(finished, tmp_path, capsys):
  workdir = _copy(finished, tmp_path)
  _corrupt(workdir / "sft" / "checkpoints" / "4", "truncated")
  metrics = workdir / "sft" / "metrics.jsonl"
  with open(metrics, "a") as f:
    f.write('{"stage": "train", "step": 4, "lo')  # a run killed mid-line
  code, out, err = _run(capsys, _config(), workdir)
  assert code == 0, err[-3000:]
  assert "done: 2 steps" in out  # steps 2 and 3 again, from checkpoint 2
  steps = [json.loads(line)["step"] for line in open(metrics)]  # every line parses
  assert steps == [0, 1, 2, 3, 2, 3]
  assert sorted(os.listdir(workdir / "sft" / "checkpoints")) == ["2", "4"]
  assert os.listdir(workdir / "sft" / "checkpoints.corrupt") == ["4"]


def test_an_interrupted_export_is_redone_from_the_final_checkpoint(finished, tmp_path, capsys):
  workdir = _copy(finished, tmp_path, drop_model=False)
  os.remove(workdir / "sft" / "model" / "config.json")  # save_hf writes it last: the export was cut short
  before = _snapshot(workdir / "sft" / "checkpoints")
  code, _, err = _run(capsys, _config(), workdir)
  assert code == 0, err[-3000:]
  assert _snapshot(workdir / "sft" / "model") == _snapshot(finished / "sft" / "model")  # the same export
  _unchanged(before, workdir / "sft" / "checkpoints")


# ---------------------------------------------------------------- 2. config drift


def test_a_rerun_with_settings_that_change_results_is_refused(finished, capsys):
  before = _snapshot(finished)
  code, _, err = _run(capsys, _config(**{"train.num_steps": 8, "train.lr": 0.1}), finished)
  line = _one_line(err)
  assert code == 2 and "train.lr: 0.003 -> 0.1; train.num_steps: 4 -> 8" in line and "resume_policy=reuse" in line
  _unchanged(before, finished)


def test_a_rerun_may_change_free_fields_and_reuse_says_what_it_reuses(finished, capsys, caplog):
  before = _snapshot(finished)
  free = _config(**{"log.every_steps": 3, "checkpoint.every_steps": 1, "eval.batch_size": 4})
  code, out, err = _run(capsys, free, finished)
  assert code == 0 and "finished stages were reused" in out, err[-3000:]
  with caplog.at_level(logging.WARNING, logger="reft_jax"):
    code, out, err = _run(capsys, _config(**{"train.lr": 0.1, "resume_policy": "reuse"}), finished)
  assert code == 0 and "finished stages were reused" in out, err[-3000:]
  (warning,) = [r.getMessage() for r in caplog.records if "resume_policy=reuse" in r.getMessage()]
  assert "train.lr: 0.003 -> 0.1" in warning and "sft/checkpoints/2, sft/checkpoints/4, sft/model" in warning
  _unchanged(before, finished)  # config.json included: it records how the reused work was made


def test_a_failing_eval_or_rerun_leaves_config_json_alone(finished, tmp_path, capsys):
  before = _snapshot(finished)
  eval_c = _config(**{"eval.model_path": str(tmp_path / "missing")})
  code, _, err = _run(capsys, eval_c, finished, command="eval")
  assert code == 2 and "no model to evaluate" in _one_line(err)
  _unchanged(before, finished)
  # In a fresh workdir a run that fails before any stage starts writes no config.json.
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": \n')
  code, _, err = _run(capsys, _config(**{"data.source": str(bad)}), tmp_path / "fresh")
  assert code == 1 and str(bad) in _one_line(err)
  assert not (tmp_path / "fresh" / "config.json").exists() and (tmp_path / "fresh" / "error.log").exists()


def test_invalid_json_in_the_saved_config_is_one_line(finished, tmp_path, capsys):
  workdir = _copy(finished, tmp_path, drop_model=False)
  for text in (b'{"train": {"lr": 0.0', b"\xff\xfe not utf-8"):
    (workdir / "config.json").write_bytes(text)
    before = _snapshot(workdir)
    code, _, err = _run(capsys, _config(), workdir)
    assert code == 1 and f"{workdir}/config.json: not a readable config" in _one_line(err)
    assert "Traceback" in open(workdir / "error.log").read()
    before.pop("error.log", None)
    _unchanged(before, workdir)


# ---------------------------------------------------------------- 6. disks, workdirs, concurrent runs


@pytest.mark.slow  # compiles a train step (or starts five processes): ~20 s on 2 cores
def test_a_full_disk_stops_in_one_line_and_keeps_the_checkpoint(finished, tmp_path, capsys):
  workdir = _copy(finished, tmp_path)
  shutil.rmtree(workdir / "sft" / "checkpoints" / "4")
  good = _snapshot(workdir / "sft" / "checkpoints")
  os.remove(workdir / "sft" / "metrics.jsonl")
  os.symlink("/dev/full", workdir / "sft" / "metrics.jsonl")  # every write: ENOSPC
  code, _, err = _run(capsys, _config(), workdir)
  line = _one_line(err)
  assert code == 1 and "metrics.jsonl: No space left on device (the disk is full" in line
  assert "Traceback" in open(workdir / "error.log").read()
  _unchanged(good, workdir / "sft" / "checkpoints")
  assert sorted(os.listdir(workdir / "sft" / "checkpoints")) == ["2"]


def test_a_failed_append_or_write_leaves_no_partial_line_or_file(tmp_path, monkeypatch):
  path = tmp_path / "m.jsonl"
  path.write_text('{"step": 0}\n')
  real_write = os.write

  def half_then_full(fd, data):  # the disk fills in the middle of a line
    real_write(fd, bytes(data[: len(data) // 2]))
    raise OSError(errno.ENOSPC, "No space left on device")

  fd = os.open(path, os.O_WRONLY | os.O_APPEND)
  monkeypatch.setattr(os, "write", half_then_full)
  with pytest.raises(OSError):
    files.append_line(fd, '{"step": 1, "loss": 2.5}\n')
  monkeypatch.undo()
  os.close(fd)
  assert path.read_text() == '{"step": 0}\n'
  # A torn tail from a killed run is cut on reopening; whole lines stay.
  path.write_text('{"step": 0}\n{"step": 1}\n{"st')
  assert files.repair_tail(str(path)) == 4 and path.read_text() == '{"step": 0}\n{"step": 1}\n'
  assert files.repair_tail(str(path)) == 0
  # An atomic write that fails leaves the old file whole.
  target = tmp_path / "summary.json"
  target.write_text("old")
  with pytest.raises(TypeError):
    files.write_atomic(str(target), None)
  assert target.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["m.jsonl", "summary.json"]


def test_a_workdir_that_is_a_file_or_read_only_is_one_line(tmp_path, capsys):
  a_file = tmp_path / "file"
  a_file.write_text("keep me")
  code, _, err = _run(capsys, _config(), a_file)
  assert code == 2 and f"{a_file}: --workdir is a file" in _one_line(err)
  assert a_file.read_text() == "keep me"
  code, _, err = _run(capsys, _config(), a_file / "sub")
  assert code == 2 and "Not a directory" in _one_line(err)
  if os.geteuid() != 0:  # root writes through file modes
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    code, _, err = _run(capsys, _config(), ro)
    assert code == 2 and "--workdir cannot be written: Permission denied" in _one_line(err)
  if not os.access("/sys", os.W_OK) or _read_only("/sys"):  # a read-only mount
    code, _, err = _run(capsys, _config(), "/sys/reft_jax_probe")
    assert code == 2 and "--workdir cannot be written" in _one_line(err)


def _read_only(mount: str) -> bool:
  return any(line.split()[1] == mount and "ro" in line.split()[3].split(",") for line in open("/proc/mounts"))


def test_a_second_run_on_the_same_workdir_is_refused(finished, capsys):
  before = _snapshot(finished)
  fd = os.open(finished / ".lock", os.O_RDWR | os.O_CREAT)  # another run holds the lock
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    code, _, err = _run(capsys, _config(), finished)
  finally:
    os.close(fd)
  assert code == 2 and "another run is using this workdir" in _one_line(err)
  _unchanged(before, finished)


# ---------------------------------------------------------------- 5 and 7. bad models and tokenizers


def _model_copy(finished, tmp_path, keep_tokenizer=True):
  model = tmp_path / "model"
  shutil.copytree(finished / "sft" / "model", model)
  if not keep_tokenizer:
    for name in os.listdir(model):
      if name.startswith(("tokenizer", "special_tokens")):
        os.remove(model / name)
  return model


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_broken_safetensors_file_is_one_line(finished, tmp_path, capsys, damage):
  model = _model_copy(finished, tmp_path)
  weights = model / "model.safetensors"
  size = weights.stat().st_size
  if damage == "truncated":
    os.truncate(weights, size // 2)
  else:
    weights.write_bytes(b"" if damage == "empty" else os.urandom(4096))
  code, _, err = _run(capsys, _config(**{"model.hf_path": str(model)}), tmp_path / "run")
  assert code == 1 and f"{weights}: not a readable .safetensors file" in _one_line(err)
  assert "Traceback" in open(tmp_path / "run" / "error.log").read()


def test_invalid_json_in_a_model_config_is_one_line(finished, tmp_path, capsys):
  model = _model_copy(finished, tmp_path)
  (model / "config.json").write_text('{"hidden_size": 64,')
  code, _, err = _run(capsys, _config(**{"model.hf_path": str(model)}), tmp_path / "run")
  assert code == 1 and "config.json" in _one_line(err)


@pytest.mark.parametrize("words", [20, 2000])
def test_a_tokenizer_that_does_not_match_the_model_is_caught_at_load(finished, tmp_path, capsys, words):
  from reft_jax.data.tokenizer import build_word_tokenizer

  other = str(tmp_path / "other_tok")
  build_word_tokenizer([" ".join(f"w{i}" for i in range(words))], other)
  model = _model_copy(finished, tmp_path)
  c = _config(**{"model.hf_path": str(model), "model.tokenizer": other})
  code, _, err = _run(capsys, c, tmp_path / "run")
  assert code == 1 and "is not the tokenizer of model.hf_path" in _one_line(err)
  if words > 100:  # more tokens than embedding rows, and no tokenizer of the model's own to compare with
    bare = _model_copy(finished, tmp_path / "bare", keep_tokenizer=False)
    c = _config(**{"model.hf_path": str(bare), "model.tokenizer": other})
    code, _, err = _run(capsys, c, tmp_path / "run2")
    assert code == 1 and "embedding rows: they do not belong together" in _one_line(err)


# ---------------------------------------------------------------- 4. the ReFT filter's guard rails


def test_the_filter_refuses_too_few_kept_examples_and_warns_when_it_drops_most(tmp_path, caplog):
  from reft_jax.defences.reft_filter import check_kept, filter_user_data
  from reft_jax.data import sft

  c = tiny_config(**{"train.batch_size": 8})
  user = [sft.Example(f"prompt {i}", "answer") for i in range(64)]
  (tmp_path / "filter").mkdir()

  def filtered(kept):  # the filter's recorded outcome: reused, and checked, on every rerun
    summary = {"n": 64, "kept": len(kept), "tau": 0.1, "kept_indices": kept}
    (tmp_path / "filter" / "summary.json").write_text(json.dumps(summary))
    return filter_user_data(c, str(tmp_path), None, None, None, user, None)

  with pytest.raises(ValueError, match=r"kept 2 of 64 user examples .* fewer than reft.min_kept=8"):
    filtered([0, 1])
  with caplog.at_level(logging.WARNING, logger="reft_jax"):
    kept, _ = filtered(list(range(20)))
  assert len(kept) == 20
  assert any("dropped 44 of 64" in r.getMessage() and "reft.warn_dropped=50%" in r.getMessage() for r in caplog.records)
  assert any("reft.tau / reft.layer" in r.getMessage() for r in caplog.records)
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="reft_jax"):  # the guardrail's audit names its guard instead
    check_kept(c, {"n": 64, "kept": 20, "tau": 0.5}, "guardrail_filter")
  assert any(
    "guardrail_filter: dropped 44" in r.getMessage() and "guardrail.*" in r.getMessage() for r in caplog.records
  )
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="reft_jax"):
    filtered(list(range(40)))
  assert not any("dropped" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- 7. the command line


def _cli(args, workdir):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, "-m", "reft_jax", f"--workdir={workdir}", *args],
    cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
  )  # fmt: skip


@pytest.mark.slow  # compiles a train step (or starts five processes): ~20 s on 2 cores
def test_bad_config_files_are_one_line_each(tmp_path):
  syntax = tmp_path / "syntax.py"
  syntax.write_text("def get_config(:\n")
  binary = tmp_path / "binary.py"
  binary.write_bytes(b"\xff\xfe\x00garbage")
  presets = load_config_module().PRESETS
  cases = [
    ("--config=configs/nope.py", "configs/nope.py"),
    (f"--config={tmp_path}", str(tmp_path)),
    (f"--config={syntax}", str(syntax)),
    (f"--config={binary}", str(binary)),
    ("--config=configs/default.py:nope", "unknown preset 'nope'"),
  ]
  for arg, message in cases:
    r = _cli([arg], tmp_path / "w")
    line = _one_line(r.stderr)
    assert r.returncode != 0 and message in line, (arg, r.stderr[-2000:])
    if "preset" in message:
      assert all(name in line for name in presets)
  assert not (tmp_path / "w").exists()


def test_verbose_prints_the_traceback_that_error_log_holds(tmp_path, capsys):
  bad = tmp_path / "bad.jsonl"
  bad.write_bytes(b'{"prompt": "caf\xe9", "response": "x"}\n')  # latin-1, not UTF-8
  c = _config(**{"data.source": str(bad)})
  code, _, err = _run(capsys, c, tmp_path / "quiet")
  assert code == 1 and str(bad) in _one_line(err)
  code, _, err = _run(capsys, c, tmp_path / "loud", verbose=True)
  assert code == 1 and err.startswith("error: ") and "Traceback" in err
  assert "Traceback" in open(tmp_path / "loud" / "error.log").read()


def test_another_defence_in_the_same_workdir_is_not_config_drift():
  """One workdir holds several defences' runs sharing stages (the alignment set, the aligned model)."""
  saved = json.loads(json.dumps(_config().to_dict()))
  assert config_lib.differences(saved, _config(method="sft_aligned")) == []
  assert config_lib.differences(saved, _config(**{"train.lr": 0.1})) == ["train.lr: 0.003 -> 0.1"]
  # A suite grown by defences, attacks, seeds or attacker settings adds cells; none of its cells changes.
  grown = {"robustness.methods": "reft,tvaccine", "robustness.lrs": "1e-3", "sweep.seeds": "0,1", "demo.seeds": "3"}
  assert config_lib.differences(saved, _config(**grown)) == []
