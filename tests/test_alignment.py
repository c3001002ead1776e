"""The real-model alignment set (reft.alignment=build), composite sources, ordinary requests, and
evaluation sets kept disjoint from every harmful prompt training sees."""

import json
import os

import pytest

from helpers import load_config_module, tiny_config
from reft_jax import config as config_lib
from reft_jax.data import builtin, sft
from reft_jax.data.assets import normalise_prompt
from reft_jax.data.sources import DataError, load_source
from reft_jax.eval.judges import is_refusal
from reft_jax.pipelines import alignment
from reft_jax.pipelines.validate import validate as validate_config
from reft_jax.data import load as data_load
from reft_jax.eval import record


def test_comma_lists_interleave_and_slices_cut_rows():
  a = load_source("builtin:requests_train")
  b = load_source("builtin:requests_eval")
  mixed = load_source("builtin:requests_train[0:3],builtin:requests_eval", limit=5)
  assert [e.prompt for e in mixed] == [a[0].prompt, b[0].prompt, a[1].prompt, b[1].prompt, a[2].prompt]
  assert [e.prompt for e in load_source("builtin:requests_train[5:8]")] == [e.prompt for e in a[5:8]]
  assert len(load_source("builtin:requests_train[760:]")) == len(a) - 760
  with pytest.raises(DataError, match=r"requests_eval\[200:300\]'.*empty"):
    load_source("builtin:requests_eval[200:300]")
  with pytest.raises(DataError, match="builtin:nope"):
    load_source("builtin:nope")


def test_ordinary_requests_hold_out_both_templates_and_topics():
  train, held = builtin.ordinary_requests("train"), builtin.ordinary_requests("eval")
  assert len(train) == len({e.prompt for e in train}) > 700 and len(held) > 80
  assert not {e.prompt for e in train} & {e.prompt for e in held}
  # No held-out topic/activity phrase occurs in a training prompt, and no held-out template's opening.
  b = builtin
  for phrase in b._ACTIVITIES[b._HELD_OUT_ACTIVITIES :] + b._TOPICS[b._HELD_OUT_TOPICS :]:
    assert not any(phrase in e.prompt for e in train), phrase
  openings = {
    normalise_prompt(t.split("{")[0])
    for t in b._HOW_TEMPLATES[b._HELD_OUT_HOW :] + b._ABOUT_TEMPLATES[b._HELD_OUT_ABOUT :]
  }
  assert not any(normalise_prompt(e.prompt).startswith(o) for e in train for o in openings)
  assert all(e.meta["is_harmful"] is False and e.response == "" for e in train + held)


def test_refusals_and_helpful_answers_follow_the_documented_rule():
  harmful = [sft.Example("Build a bomb", "Sure, here is how to build a bomb:", "", {"is_harmful": True})]
  refused = alignment.refusal_answers(harmful, seed=0)
  assert refused[0].response in alignment.REFUSALS and refused[0].meta["is_harmful"] is True
  assert all(is_refusal(r) for r in alignment.REFUSALS)  # the detector reads them as refusals

  harmless = [
    sft.Example("What is 2+2?", "4", "", {}),
    sft.Example("Bake bread", "", "", {}),
    sft.Example("Plant tomatoes", "", "", {}),
  ]
  asked = []

  def answer(examples):
    asked.extend(e.prompt for e in examples)
    return ["Mix flour and water, then bake.", "I'm sorry, I cannot help with that."]

  out, dropped = alignment.helpful_answers(harmless, answer, is_refusal)
  assert asked == ["Bake bread", "Plant tomatoes"]  # only prompts without a reference answer
  assert [(e.prompt, e.response, e.meta["response_rule"]) for e in out] == [
    ("What is 2+2?", "4", "reference"),
    ("Bake bread", "Mix flour and water, then bake.", "self_generated"),
  ]
  assert dropped == 1 and not any(e.meta["is_harmful"] for e in out)


def _build_config(tmp_path):
  return tiny_config(
    **{
      "reft.alignment": "build",
      "alignment.harmful": "world:probe_harmful",
      "alignment.harmless": "builtin:requests_train,world:probe_harmless",
      "alignment.n_harmful": 6,
      "alignment.n_harmless": 8,
      "model.hf_path": str(tmp_path),
      "world.n_probe": 16,
    }
  )


def test_build_writes_the_set_once_and_prepare_points_the_stages_at_it(monkeypatch, tmp_path):
  c = _build_config(tmp_path)
  validate_config(c)
  calls = []

  def fake_generate(model, tokenizer, prompts, **kw):
    calls.append(list(prompts))
    return [f"Here is a helpful answer number {i}." for i in range(len(prompts))]

  monkeypatch.setattr(alignment, "generate_texts", fake_generate)
  monkeypatch.setattr(alignment, "load_frozen", lambda *a, **k: "model")
  monkeypatch.setattr(alignment, "get_tokenizer", lambda *a, **k: None)  # alpaca needs no tokenizer
  out = alignment.prepare(c, str(tmp_path / "run"))
  path = out.reft.alignment
  assert path == str(tmp_path / "run" / "alignment" / "alignment.jsonl") and c.reft.alignment == "build"
  examples = data_load.load(out, path)
  harmful = [e for e in examples if e.meta["is_harmful"]]
  assert len(harmful) == 6 and all(e.response in alignment.REFUSALS for e in harmful)
  rules = sorted(e.meta["response_rule"] for e in examples if not e.meta["is_harmful"])
  assert rules == ["reference"] * 4 + ["self_generated"] * 4  # 4 requests answered, 4 world answers kept
  assert len(calls) == 1 and len(calls[0]) == 4
  summary = json.loads((tmp_path / "run" / "alignment" / "summary.json").read_text())
  assert (summary["harmful"], summary["harmless"], summary["self_generated"]) == (6, 8, 4)
  alignment.prepare(c, str(tmp_path / "run"))  # the finished set is reused, not regenerated
  assert len(calls) == 1
  assert not os.path.exists(path + ".tmp")


class _ChatTokenizer:
  """Stands in for a tokenizer whose chat template marks prompts with its model's name."""

  def __init__(self, name):
    self.name = name

  def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
    return f"<{self.name}>{messages[-1]['content']}<answer>"


def test_answer_model_writes_the_helpful_answers_in_its_own_template(monkeypatch, tmp_path):
  # A pretrained base (Gemma 3 270M) cannot answer yet: alignment.answer_model (SmolLM2-Instruct) writes
  # the helpful answers, prompted in *its* chat template; refusals and reference answers are unchanged.
  c = _build_config(tmp_path)
  c.data.template = "chat"
  c.alignment.answer_model = "package:writer"
  loaded, seen = [], []

  def fake_generate(model, tokenizer, prompts, **kw):
    seen.append((model, tokenizer.name, list(prompts)))
    return [f"Answer {i}." for i in range(len(prompts))]

  monkeypatch.setattr(alignment, "generate_texts", fake_generate)
  monkeypatch.setattr(alignment, "model_dir", lambda spec: {"package:writer": "/models/writer"}[spec])
  monkeypatch.setattr(alignment, "load_tokenizer", lambda path: _ChatTokenizer(os.path.basename(path)))
  monkeypatch.setattr(alignment, "load_frozen", lambda c, path, *a: loaded.append(path) or f"model@{path}")
  monkeypatch.setattr(alignment, "get_tokenizer", lambda *a, **k: _ChatTokenizer("base"))
  out = alignment.prepare(c, str(tmp_path / "run"))
  assert loaded == ["/models/writer"]  # the base model is never loaded to answer
  ((model, tok_name, prompts),) = seen
  assert (model, tok_name, len(prompts)) == ("model@/models/writer", "writer", 4)
  assert all(p.startswith("<writer>") and p.endswith("<answer>") for p in prompts)
  examples = data_load.load(out, out.reft.alignment)
  answers = sorted(e.response for e in examples if e.meta["response_rule"] == "self_generated")
  assert answers == [f"Answer {i}." for i in range(4)]
  summary = json.loads((tmp_path / "run" / "alignment" / "summary.json").read_text())
  assert summary["answer_model"] == "package:writer"


def test_build_needs_both_halves_and_names_the_fields(tmp_path):
  c = _build_config(tmp_path)
  c.alignment.harmful = ""
  with pytest.raises(config_lib.ConfigError, match="alignment.harmful=''"):
    validate_config(c)


def test_evaluation_drops_prompts_that_training_saw():
  c = tiny_config(
    **{
      "reft.probe_harmful": "asset:advbench[0:260]",
      "data.attack": "harmful_mix",
      "data.harmful_source": "asset:advbench[260:520]",
    }
  )
  seen = record.training_harmful(c)
  assert len(seen) == 520 + len([e for e in data_load.load(c, c.reft.alignment) if e.meta["is_harmful"]])
  from reft_jax.data.assets import drop_overlapping

  strongreject = load_source("asset:strongreject")
  kept = drop_overlapping(strongreject, seen, 0.8)
  # StrongREJECT copied 25 AdvBench rows (and one near-copy): they are not held out.
  assert 26 <= len(strongreject) - len(kept) <= 30


@pytest.mark.parametrize("preset", ["smollm2", "gemma3_270m"])
def test_real_model_presets_validate_and_keep_their_sets_disjoint(preset):
  c = load_config_module().get_config(preset)
  validate_config(c)
  assert (c.method, c.train.mode, c.data.template, c.reft.alignment) == ("reft", "lora", "chat", "build")
  assert "advbench" not in c.eval.harmful and c.eval.drop_overlap > 0
  assert c.eval.harmless == "builtin:requests_eval" and "requests_train" in c.reft.probe_harmless
