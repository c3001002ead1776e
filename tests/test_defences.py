"""The defence registry: a defence is one file, and every defence runs alone through --config.method."""

import json
import os

import jax.numpy as jnp
import pytest

from helpers import HARMFUL_SET_DEFENCES, load_config_module, small_world_flags, tiny_config
from reft_jax import defences
from reft_jax.config import check, with_updates
from reft_jax.main import execute


def _world_overrides(**extra) -> dict:
  """A safety world small enough to run every defence's stages in seconds on the tiny model."""
  flags = dict(f.removeprefix("--config.").split("=", 1) for f in small_world_flags())
  world = {k: int(v) for k, v in flags.items() if k.startswith("world.")}
  return {
    **world,
    "data.harmful_source": flags["data.harmful_source"],
    **{f"{d}.harmful_source": flags[f"{d}.harmful_source"] for d in HARMFUL_SET_DEFENCES},
    "data.source": "world:sst2_train",
    "data.attack": "harmful_mix",
    "data.n": 20,
    "data.p": 0.2,
    "data.seq_len": 48,
    "train.num_steps": 2,
    "train.batch_size": 8,
    "teacher.num_steps": 2,
    "teacher.batch_size": 16,
    "reft.probe_size": 8,
    "reft.tau_mode": "fixed",
    "reft.tau": 0.5,
    "reft.align_batch_size": 8,
    "lisa.k_align": 1,
    "lisa.k_user": 1,
    "restore.steps": 2,
    "restore.warmup_steps": 1,
    "eval.enabled": True,
    "eval.judge": "oracle",
    "eval.n_harmful": 4,
    "eval.n_harmless": 4,
    "eval.n_task": 4,
    "eval.max_new_tokens": 4,
    "eval.batch_size": 8,
    "eval.tasks": "sst2=world:sst2_test",
    "demo.arch": "tiny",  # the world's base model, pretrained for 2 steps (the demo's, shrunk)
    "demo.pretrain_steps": 2,
    **extra,
  }


def test_a_toy_defence_registered_from_this_file_runs_end_to_end(tmp_path, capsys):
  """One loss function and one config section, declared here: no existing module is edited."""
  from reft_jax.defences.registry import Defence, register
  from reft_jax.losses import batch_cross_entropy
  from reft_jax.stages import StageSpec

  def toy_loss(scale: float):
    def loss(model, batch, ctx=None):
      total, count = batch_cross_entropy(model, batch)
      return scale * total, count, {"toy_scale": jnp.asarray(scale)}

    return loss

  def finetune(env, root, start, user):
    return StageSpec("toy", env.tokenize(user), init=start, loss=toy_loss(env.c.toy.scale))

  def validate(c):
    check(c.toy.scale > 0, "toy.scale", c.toy.scale, "must be positive")

  register(
    Defence(
      "toy", "CE scaled by a constant", finetune=finetune, section="toy", defaults={"scale": 0.5}, validate=validate
    )
  )
  try:
    c = with_updates(load_config_module().get_config("tiny"), **_world_overrides(method="toy"))
    assert c.toy.scale == 0.5  # its section, with its defaults, in every preset
    assert execute(c, str(tmp_path)) == 0, capsys.readouterr().err
    run = json.load(open(tmp_path / "results.json"))["runs"]["toy"]
    assert run["method"] == "toy" and 0 <= run["harmful_score"] <= 100 and "sst2" in run["finetune_accuracy"]
    rows = [json.loads(line) for line in open(tmp_path / "toy" / "metrics.jsonl")]
    assert [r["toy_scale"] for r in rows] == [0.5, 0.5]
    bad = with_updates(c, **{"toy.scale": -1.0})
    assert execute(bad, str(tmp_path / "bad")) == 2
    assert "config.toy.scale=-1.0: must be positive" in capsys.readouterr().err
  finally:
    defences.REGISTRY.pop("toy")


@pytest.mark.slow
@pytest.mark.parametrize(
  "name",
  [
    "sft_base",
    "sft_aligned",
    "vaccine",
    "booster",
    "lisa",
    "mimic",
    "smart",
    "restore",
    "reft",
    "guardrail",
    "tvaccine",
    "panacea",
    "safelora",
    "antidote",
  ],
)
def test_every_defence_runs_standalone(tmp_path, capsys, name):
  c = with_updates(tiny_config(), **_world_overrides(method=name))
  assert execute(c, str(tmp_path)) == 0, capsys.readouterr().err
  runs = json.load(open(tmp_path / "results.json"))["runs"]
  assert list(runs) == [name] and runs[name]["method"] == name
  stage = {"restore": "restore", "reft": "student"}.get(name, name)  # (the post-hoc ones: their final model)
  assert os.path.exists(tmp_path / stage / "model" / "config.json")
  aligned = {
    "sft_base": None,
    "vaccine": "aligned_vaccine",
    "booster": "aligned_booster",
    "tvaccine": "aligned_tvaccine",
    "reft": "teacher",
  }
  if aligned.get(name, "aligned"):  # its alignment stage, in the workdir (shared when run by the suite)
    assert os.path.exists(tmp_path / aligned.get(name, "aligned") / "model" / "config.json")
  extra = {
    "lisa": "lisa",
    "reft": "filter",
    "restore": "restore",
    "guardrail": "filter",
    "panacea": "panacea",
    "safelora": "safelora",
    "antidote": "antidote",
  }.get(name)
  assert extra is None or runs[name].get(extra) is not None


def test_the_registry_is_what_config_validation_and_the_presets_read():
  from reft_jax.pipelines.validate import methods

  c = tiny_config()
  assert set(defences.names()) <= set(methods())
  assert all(c[s].to_dict() == d for s, d in defences.sections().items())
  with pytest.raises(ValueError, match="not one of"):
    defences.get("nonexistent")
  with pytest.raises(ValueError, match="already registered"):
    defences.register(defences.Defence("reft", "a second reft", finetune=None))


def test_every_defence_file_is_in_the_fidelity_table_and_the_layout():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  fidelity = open(os.path.join(root, "docs", "FIDELITY.md")).read()
  readme = open(os.path.join(root, "README.md")).read()
  files = sorted(f for f in os.listdir(os.path.join(root, "reft_jax", "defences")) if f.endswith(".py"))
  for f in files:
    if f in ("__init__.py", "registry.py"):
      continue
    assert f"defences/{f}" in fidelity, f"docs/FIDELITY.md cites no defences/{f}"
    assert f in readme, f"README's layout lists no {f}"
  assert all(d.summary and (d.source or d.name.startswith("sft")) for d in defences.REGISTRY.values())


def test_stage_seconds_reads_every_stage_summary(tmp_path):
  """results.json's per-stage timing line: each stage directory's summary.json wall_seconds, the shared
  workdir's stages and a cell's own, and nothing from directories without one."""

  from reft_jax.stages import stage_seconds

  cell = tmp_path / "p0.1_seed0"
  for root, stage, seconds in ((tmp_path, "teacher", 12.34), (tmp_path, "alignment", 3.0), (cell, "student", 7.0)):
    (root / stage).mkdir(parents=True)
    (root / stage / "summary.json").write_text(json.dumps({"wall_seconds": seconds}))
  (tmp_path / "filter").mkdir()
  (tmp_path / "filter" / "summary.json").write_text(json.dumps({"kept": 3}))
  (tmp_path / "eval").mkdir()
  assert stage_seconds(str(tmp_path), str(cell)) == {"alignment": 3.0, "teacher": 12.3, "student": 7.0}
  assert stage_seconds(str(tmp_path / "missing")) == {}
