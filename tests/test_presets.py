"""Presets: the old ones keep their values, the protocol presets carry the published numbers (git-disl/Booster
@6421918 scripts), and offline a preset fails at once naming what it cannot find (preflight)."""

import json
import os
import re
import subprocess
import sys

import pytest

from helpers import ROOT, load_config_module
from reft_jax import config as config_lib
from reft_jax.pipelines import preflight
from reft_jax.data import sources
from reft_jax.pipelines.validate import validate as validate_config

BEFORE = os.path.join(ROOT, "tests", "data", "presets_before.json")  # dumped before protocol presets existed
PAPER = [f"paper_{m}_{t}" for m in ("llama2", "gemma2", "qwen2") for t in ("sst2", "agnews", "gsm8k")]
PUBLISHED_CELLS = {
  "paper_llama2_sst2",
  "paper_llama2_agnews",
  "paper_llama2_gsm8k",
  "paper_gemma2_sst2",
  "paper_qwen2_sst2",
}


def _leaves(d, prefix=""):
  for k, v in d.items():
    if isinstance(v, dict):
      yield from _leaves(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", v


with open(BEFORE) as f:
  OLD = json.load(f)


# Defaults changed on purpose, (old, new) for every preset that did not set them itself:
# train.loss_chunk 0 -> -1 (auto: the fused chunked head from a 16k vocabulary, issue 18; the world presets'
# small vocabularies resolve it to 0, unchanged).
DELIBERATE = {"train.loss_chunk": (0, -1)}
# The smollm2 preset's settings changed on purpose by issue 13's levers (README "What was tried", rows 5-10):
# 12 trigger-word prompts per category in the alignment set, 80 teacher steps, tau = 0 (fixed), beta 5 with
# reft.student_lam 0.5 (a new field, rows 10-12).
HARMLESS_V5 = (
  "builtin:requests_train,mirror(asset:advbench[0:260]),builtin:trigger_train[0:60],builtin:trigger_train[60:120]"
)
PRESET_CHANGES = {
  "smollm2": {
    "alignment.harmless": (OLD["smollm2"]["alignment"]["harmless"], HARMLESS_V5),
    "reft.tau_mode": ("calibrated", "fixed"),
    "reft.beta": (1.0, 5.0),
    "teacher.num_steps": (40, 80),
  }
}


@pytest.mark.parametrize("name", sorted(OLD))
def test_old_presets_keep_every_value(name):
  """No value of an existing preset changed or disappeared (fields added later may appear), apart from
  the deliberate default changes above."""
  now = dict(_leaves(load_config_module().get_config(name).to_dict()))
  changed = {k: (v, now.get(k, "<missing>")) for k, v in _leaves(OLD[name]) if now.get(k, "<missing>") != v}
  deliberate = {**DELIBERATE, **PRESET_CHANGES.get(name, {})}
  assert all(deliberate.get(k) == pair for k, pair in changed.items()), changed


def test_unknown_preset_lists_every_preset():
  mod = load_config_module()
  with pytest.raises(ValueError, match="unknown preset 'llama9'") as err:
    mod.get_config("llama9")
  assert set(PAPER) | set(OLD) <= set(mod.PRESETS)
  assert all(name in str(err.value) for name in mod.PRESETS)


def test_every_preset_documents_its_command():
  mod = load_config_module()
  for name, fn in mod.PRESETS.items():
    assert "python -m reft_jax" in fn.__doc__ and f"configs/default.py:{name}" in fn.__doc__, name
  for name in ("llama2_7b", "gemma2_9b", "qwen2_7b"):
    assert "not a protocol preset" in mod.PRESETS[name].__doc__


def _rows(spec):
  m = re.fullmatch(r"(\w+)\[(\d+):(\d+)\]", spec)
  return m.group(1), set(range(int(m.group(2)), int(m.group(3))))


@pytest.mark.parametrize("name", PAPER)
def test_paper_presets_carry_the_published_protocol(name):
  c = load_config_module().get_config(name)
  task = name.rsplit("_", 1)[1]
  base = {"llama2": "meta-llama/Llama-2-7b-hf", "gemma2": "google/gemma-2-9b", "qwen2": "Qwen/Qwen2-7B"}
  assert c.model.hf_path == base[name.split("_")[1]]  # base, not chat/-it/-Instruct
  assert c.method == "reft" and c.data.template == "alpaca" and c.data.attack == "harmful_mix"
  # script/finetune/*: LoRA r=32/alpha=4 on q,k,v, lr 1e-5 constant, wd 0.1, 20 epochs x 1000 / 10
  t = c.train
  assert (t.mode, t.lora_rank, t.lora_alpha, t.lora_targets) == ("lora", 32, 4.0, "q,k,v")
  assert (t.lr, t.schedule, t.warmup_steps, t.weight_decay, t.batch_size) == (1e-5, "constant", 0, 0.1, 10)
  assert t.num_steps == 20 * c.data.n // t.batch_size == 2000
  p = 0.05 if task == "gsm8k" else 0.1  # every *_gsm8k.sh of Booster uses poison_ratio=0.05
  assert (c.data.n, c.data.p, c.data.source) == (1000, p, task)
  assert (c.teacher.lr, c.teacher.batch_size, c.teacher.num_steps) == (5e-4, 10, 20 * 5000 // 10)
  e = c.eval  # poison/evaluation/pred.py + */pred_eval.py
  assert (e.enabled, e.judge, e.judge_threshold, e.judge_path) == (True, "classifier", 0.5, "")
  assert (e.harmful, e.n_harmful, e.max_new_tokens) == ("beavertails_test_harmful", 1000, 512)
  assert (e.task_max_new_tokens, e.fa_match) == (200, "official_exact")
  assert config_lib.eval_tasks(c) == {task: f"{task}_test"}
  assert e.n_task == {"sst2": 872, "agnews": 1000, "gsm8k": 1000}[task]
  # BeaverTails rows: the attack's first floor(p n), disjoint from Booster's / the alignment's and the probes.
  pool, attack = _rows(c.data.harmful_source)
  assert pool == "beavertails_harmful" and attack == set(range(round(p * 1000)))
  booster, align, probe = (_rows(s)[1] for s in (c.booster.harmful_source, c.alignment.harmful, c.reft.probe_harmful))
  assert booster == set(range(5000, 10000)) and align <= booster
  assert not attack & booster and not probe & (booster | attack)
  alpaca = [_rows(s)[1] for s in (c.alignment.harmless, c.reft.probe_harmless, c.eval.harmless)]
  assert sum(map(len, alpaca)) == len(set().union(*alpaca))  # alignment, probe, over-refusal eval: disjoint
  assert c.reft.alignment == config_lib.BUILD_ALIGNMENT
  assert c.model.arch in ("llama2_7b", "gemma2_9b", "qwen2_7b")


@pytest.mark.parametrize("name", ["paper_llama2_sst2", "paper_gemma2_gsm8k"])
def test_paper_presets_validate_with_a_judge(name, tmp_path):
  c = load_config_module().get_config(name)
  with pytest.raises(config_lib.ConfigError, match="eval.judge_path"):
    validate_config(c)
  c.eval.judge_path = str(tmp_path)
  validate_config(c)


def test_presets_doc_lists_every_paper_preset():
  with open(os.path.join(ROOT, "docs", "PRESETS.md")) as f:
    doc = f.read()
  for name in PAPER:
    assert f"`{name}`" in doc and f"configs/default.py:{name}" in doc
  for name in set(PAPER) - PUBLISHED_CELLS:
    assert re.search(rf"`{name}`[^\n]*no published cell", doc), name


# ---------------------------------------------------------------- BeaverTails filtered sources

BT = [{"prompt": f"q{i}", "response": f"a{i}", "is_safe": i % 3 == 0, "category": {"x": i % 3 != 0}} for i in range(12)]


def test_beavertails_sources_keep_only_unsafe_or_safe_pairs_in_order(monkeypatch):
  seen = []

  def fake(source, split):
    seen.append((source, split))
    return [dict(r) for r in BT], f"{source}[{split}]"

  monkeypatch.setattr(sources, "read_records", fake)
  harmful = sources.load_source("beavertails_harmful[1:4]")
  assert [e.prompt for e in harmful] == ["q2", "q4", "q5"] and all(e.meta["is_harmful"] for e in harmful)
  assert [e.prompt for e in sources.load_source("beavertails_safe")] == ["q0", "q3", "q6", "q9"]
  assert [e.prompt for e in sources.load_source("beavertails_test_harmful", limit=2)] == ["q1", "q2"]
  assert seen == [("hub:PKU-Alignment/BeaverTails", s) for s in ("30k_train", "30k_train", "30k_test")]


# ---------------------------------------------------------------- preflight


def test_hub_names_of_sources():
  assert preflight.hub_datasets("beavertails_harmful[0:100], alpaca") == [
    "PKU-Alignment/BeaverTails",
    "tatsu-lab/alpaca",
  ]
  assert preflight.hub_datasets("hub:openai/gsm8k:main") == ["openai/gsm8k"]
  local = "world:eval_harmful,asset:advbench[0:3],user.jsonl,builtin:requests_eval"
  assert preflight.hub_datasets(local) == []
  assert preflight.hub_model("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"
  assert preflight.hub_model("/ckpt/llama") == preflight.hub_model("") == ""


@pytest.fixture
def empty_hf(monkeypatch, tmp_path):
  """Offline, with empty Hugging Face caches under tmp_path/hf."""
  for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  return tmp_path / "hf"


def _cache_model(hf, repo):
  root = hf / "hub" / f"models--{repo.replace('/', '--')}"
  (root / "refs").mkdir(parents=True)
  (root / "refs" / "main").write_text("abc123")
  (root / "snapshots" / "abc123").mkdir(parents=True)
  (root / "snapshots" / "abc123" / "config.json").write_text("{}")


def _judge_dir(tmp_path):
  judge = tmp_path / "beaver-dam-7b"
  judge.mkdir()
  (judge / "config.json").write_text("{}")
  return str(judge)


def test_preflight_offline_names_everything_missing(empty_hf):
  c = load_config_module().get_config("paper_llama2_sst2")
  with pytest.raises(preflight.PreflightError) as err:
    preflight.check(c)
  msg = str(err.value)
  assert "\n" not in msg
  assert msg.startswith("paper_llama2_sst2 needs meta-llama/Llama-2-7b-hf and the hub datasets")
  for part in (
    "PKU-Alignment/BeaverTails",
    "nyu-mll/glue",
    "tatsu-lab/alpaca",
    "HF_HUB_OFFLINE=1",
    "--config.model.hf_path=DIR",
    "--config.eval.judge_path=DIR",
    "beaver-dam-7b",
  ):
    assert part in msg


def test_preflight_passes_with_the_cache_and_names_only_what_is_missing(empty_hf, tmp_path):
  c = load_config_module().get_config("paper_llama2_sst2")
  c.eval.judge_path = _judge_dir(tmp_path)
  _cache_model(empty_hf, "meta-llama/Llama-2-7b-hf")
  (empty_hf / "datasets" / "nyu-mll___glue" / "sst2" / "0.0.0" / "f00").mkdir(parents=True)  # prepared
  (empty_hf / "hub" / "datasets--tatsu-lab--alpaca" / "snapshots" / "abc").mkdir(parents=True)  # downloaded
  with pytest.raises(preflight.PreflightError) as err:
    preflight.check(c)
  assert [n.name for n in preflight.missing(c)] == ["PKU-Alignment/BeaverTails"]
  assert "needs the hub dataset PKU-Alignment/BeaverTails;" in str(err.value)
  assert "Llama-2" not in str(err.value) and "judge_path" not in str(err.value)
  (empty_hf / "datasets" / "PKU-Alignment___beaver_tails" / "default" / "0.0.0" / "f00").mkdir(parents=True)
  preflight.check(c)


def test_preflight_online_checks_only_the_judge(monkeypatch, tmp_path):
  for var in preflight.OFFLINE_VARS:
    monkeypatch.delenv(var, raising=False)
  c = load_config_module().get_config("paper_qwen2_gsm8k")
  want = r"^paper_qwen2_gsm8k needs a local moderation classifier"
  with pytest.raises(preflight.PreflightError, match=want):
    preflight.check(c)
  c.eval.judge_path = _judge_dir(tmp_path)
  preflight.check(c)


@pytest.mark.parametrize("name", ["tiny", "demo", "smollm2", "world_reft"])
def test_preflight_leaves_offline_presets_alone(name, empty_hf):
  assert preflight.requirements(load_config_module().get_config(name)) == []


def test_preflight_reads_only_what_the_command_uses(empty_hf):
  c = load_config_module().get_config("paper_llama2_gsm8k")
  c.eval.judge_path = ""
  evaluating = {n.name: n.fields for n in preflight.requirements(c, "eval")}
  # `eval` reads no base model, training data or alignment sets: the eval prompts, the task and the judge.
  assert evaluating == {
    "PKU-Alignment/BeaverTails": ["eval.harmful"],
    "tatsu-lab/alpaca": ["eval.harmless"],
    "openai/gsm8k": ["eval.tasks[gsm8k]"],
    "": ["eval.judge_path"],
  }
  c.method, c.eval.enabled = "sft", False
  training = {n.name: n.fields for n in preflight.requirements(c)}
  assert training == {
    "meta-llama/Llama-2-7b-hf": ["model.hf_path"],
    "openai/gsm8k": ["data.source"],
    "PKU-Alignment/BeaverTails": ["data.harmful_source"],
  }


def test_cli_paper_preset_offline_fails_before_anything_starts(tmp_path):
  env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", JAX_PLATFORMS="cpu")
  for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE"):
    env.pop(var, None)
  workdir = tmp_path / "run"
  r = subprocess.run(
    [sys.executable, "-m", "reft_jax", "--config=configs/default.py:paper_gemma2_sst2", f"--workdir={workdir}"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert r.returncode == 2 and "Traceback" not in r.stderr
  errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and errors[0].startswith("error: paper_gemma2_sst2 needs google/gemma-2-9b and")
  assert "PKU-Alignment/BeaverTails" in errors[0] and "--config.model.hf_path=DIR" in errors[0]
  assert not workdir.exists()  # nothing was written: no stage started
