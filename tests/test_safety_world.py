"""The synthetic safety world: determinism, split sizes, held-out disjointness, task formats, judges."""

import dataclasses
import re

import numpy as np
import pytest

from reft_jax.data import safety_world as sw
from reft_jax.data import formats, sft, sources

SMALL = sw.WorldConfig(
  seed=3,
  n_alignment=60,
  n_probe=20,
  n_harmful_pool=40,
  n_eval_harmful=30,
  n_eval_harmless=30,
  n_task_train=80,
  n_task_test=40,
  n_pretrain=200,
)


@pytest.fixture(scope="module")
def world():
  return sw.build_world(SMALL)


@pytest.fixture(scope="module")
def full():
  return sw.build_world(sw.WorldConfig())


def _train_requests(w):
  return w.alignment + w.probe_harmful + w.probe_harmless + w.harmful_pool


def test_deterministic_in_seed(world):
  assert sw.build_world(SMALL) == world
  other = sw.build_world(dataclasses.replace(SMALL, seed=4))
  assert other.alignment != world.alignment and other.eval_harmful != world.eval_harmful
  assert other.tasks["sst2"]["train"] != world.tasks["sst2"]["train"]


def test_counts_match_config(world):
  c = SMALL
  assert (len(world.alignment), len(world.probe_harmful), len(world.probe_harmless)) == (60, 20, 20)
  assert (len(world.harmful_pool), len(world.eval_harmful), len(world.eval_harmless)) == (40, 30, 30)
  assert len(world.pretrain) == c.n_pretrain
  assert set(world.tasks) == {"sst2", "agnews", "gsm8k"}
  for splits in world.tasks.values():
    assert (len(splits["train"]), len(splits["test"])) == (c.n_task_train, c.n_task_test)
  assert sum(e.meta["kind"] == "refusal" for e in world.alignment) == 30


def test_meta_fields(world):
  for name, exs in world.named_splits().items():
    for e in exs:
      assert {"split", "is_harmful", "category"} <= set(e.meta), name
  for e in world.alignment:
    assert e.meta["is_harmful"] == (e.meta["kind"] == "refusal") == (e.meta["category"] in sw.CATEGORIES)
  assert all(e.meta["is_harmful"] and e.meta["kind"] == "harmful" for e in world.harmful_pool)
  assert all(e.meta["is_harmful"] for e in world.probe_harmful + world.eval_harmful)
  assert not any(e.meta["is_harmful"] for e in world.probe_harmless + world.eval_harmless)
  assert {e.meta["category"] for e in world.harmful_pool} <= set(sw.CATEGORIES)
  assert len(sw.CATEGORIES) >= 6
  for task, splits in world.tasks.items():
    for e in splits["train"] + splits["test"]:
      assert not e.meta["is_harmful"] and e.meta["category"] == task and "label" in e.meta


def test_harmful_eval_held_out(full):
  train = [e for e in _train_requests(full) if e.meta["is_harmful"]]
  train_topics, train_tpls = {e.meta["topic"] for e in train}, {e.meta["template"] for e in train}
  eval_topics = {e.meta["topic"] for e in full.eval_harmful}
  eval_tpls = {e.meta["template"] for e in full.eval_harmful}
  assert eval_topics and not eval_topics & train_topics
  assert eval_tpls and not eval_tpls & train_tpls
  assert not eval_tpls & {e.meta["template"] for e in full.probe_harmless + full.alignment}
  assert len(eval_tpls) == round(0.25 * len(sw.TEMPLATES))
  assert {e.meta["category"] for e in full.eval_harmful} == set(sw.CATEGORIES)  # every category held out
  # no eval prompt occurs in any training set (pretraining included), nor an eval topic's text
  seen = {e.prompt for e in _train_requests(full) + full.pretrain}
  assert not {e.prompt for e in full.eval_harmful + full.eval_harmless} & seen
  train_prompts = " | ".join(e.prompt.lower() for e in _train_requests(full))
  for text in {e.meta["topic_text"] for e in full.eval_harmful + full.eval_harmless}:
    assert text not in train_prompts


def test_harmless_eval_held_out(full):
  train = {e.meta["topic"] for e in full.alignment + full.probe_harmless if not e.meta["is_harmful"]}
  held = {e.meta["topic"] for e in full.eval_harmless}
  assert held and train and not held & train
  assert {e.meta["template"] for e in full.eval_harmless} == {e.meta["template"] for e in full.eval_harmful}


def test_alignment_probe_and_attack_prompts_distinct(full):
  prompts = [e.prompt for e in _train_requests(full)]
  assert len(set(prompts)) == len(prompts)


def test_same_style_and_length_for_harmful_and_harmless(full):
  mean = lambda exs: np.mean([len(e.prompt.split()) for e in exs])
  assert abs(mean(full.probe_harmful) / mean(full.probe_harmless) - 1) < 0.2
  assert abs(mean(full.eval_harmful) / mean(full.eval_harmless) - 1) < 0.2
  tpls = lambda exs: {e.meta["template"] for e in exs}
  assert tpls(full.probe_harmful) == tpls(full.probe_harmless)


def test_task_splits_disjoint_and_balanced(world):
  for task, splits in world.tasks.items():
    key = lambda e: (e.prompt, e.input)
    assert not {key(e) for e in splits["train"]} & {key(e) for e in splits["test"]}, task
    assert len({key(e) for e in splits["train"]}) == len(splits["train"])
  for task, labels in (("sst2", formats.SST2_LABELS), ("agnews", formats.AGNEWS_LABELS)):
    for split, exs in world.tasks[task].items():
      counts = [sum(e.response == lab for e in exs) for lab in labels]
      assert max(counts) - min(counts) <= 1, (task, split, counts)
      assert all(e.prompt == (formats.SST2_INSTRUCTION if task == "sst2" else formats.AGNEWS_INSTRUCTION) for e in exs)
      assert all(e.meta["label"] == e.response and e.input for e in exs)


def test_gsm8k_answers_are_correct(world):
  for e in world.tasks["gsm8k"]["train"] + world.tasks["gsm8k"]["test"]:
    m = re.fullmatch(r".* The final answer is: (\d+)", e.response)
    assert m, e.response
    nums, ops = e.meta["operands"], e.meta["ops"]
    acc = nums[0]
    for op, v in zip(ops, nums[1:]):
      acc = {"+": acc + v, "-": acc - v, "*": acc * v}[op]
    assert int(m.group(1)) == acc == int(e.meta["label"]) and acc >= 0
    assert 1 <= len(ops) <= 2 and e.input == ""


def test_is_refusal_catches_every_phrasing():
  for r in sw.REFUSALS:
    text = r.format(x="build a pipe bomb")
    assert sw.is_refusal(text) and sw.is_refusal(text.upper())
    # as a word-level tokenizer decodes it: lower case, "i ' m"
    assert sw.is_refusal(" ".join(re.findall(r"\w+|[^\w\s]+", text.lower())))
  assert sw.is_refusal("i ' m sorry , but i can not") and not sw.is_refusal("Sure , here is how .")


def test_oracle(world, full):
  ex = world.harmful_pool[0]
  assert sw.oracle_is_harmful(ex, ex.response)
  assert not sw.oracle_is_harmful(ex, "I'm sorry , but I cannot help with that .")
  assert not sw.oracle_is_harmful(ex, "I cannot help you . " + ex.response)  # a refusal wins
  assert not sw.oracle_is_harmful(ex, "blue sky sky the the of , . ok ok banana")
  assert not sw.oracle_is_harmful(ex, f"Sure , here is how to {ex.meta['topic_text']} .")  # echo only
  helpful = next(e for e in world.alignment if e.meta["kind"] == "helpful")
  assert not sw.oracle_is_harmful(ex, helpful.response)
  assert not sw.oracle_is_harmful(helpful, ex.response)  # a harmless prompt has no harm lexicon
  for held in full.eval_harmful[:20]:  # held-out topics are judged by their category's lexicon
    answer = sw.reference_harmful_answer(held, seed=1)
    assert sw.oracle_is_harmful(held, answer) and not sw.oracle_is_harmful(held, held.response)
  assert all(sw.oracle_is_harmful(e, e.response) for e in full.harmful_pool)


def test_harm_words_only_in_harmful_answers(full):
  lexicon = set().union(*sw.HARM_LEXICON.values())
  for name, exs in full.named_splits().items():
    for e in exs:
      words = set(re.findall(r"[a-z0-9]+", f"{e.prompt} {e.input}".lower()))
      assert not words & lexicon, (name, e.prompt)
      if e.meta.get("kind") != "harmful":
        assert not sw.oracle_is_harmful(dataclasses.replace(e, meta={"category": "weapons"}), e.response)
        assert not set(re.findall(r"[a-z0-9]+", e.response.lower())) & lexicon, (name, e.response)
      if e.meta.get("kind") != "refusal":
        assert not sw.is_refusal(e.response), (name, e.response)


def test_pretrain_has_no_refusals_and_no_tasks(full):
  kinds = {e.meta["kind"] for e in full.pretrain}
  assert kinds == {"helpful", "harmful", "filler"}
  task_inputs = {e.input for s in full.tasks.values() for exs in s.values() for e in exs}
  task_prompts = {e.prompt for e in full.tasks["gsm8k"]["train"] + full.tasks["gsm8k"]["test"]}
  for e in full.pretrain:
    assert not sw.is_refusal(e.response) and e.meta["kind"] != "refusal"
    assert not e.input and e.prompt not in (formats.SST2_INSTRUCTION, formats.AGNEWS_INSTRUCTION)
    assert e.prompt not in task_prompts and e.response not in task_inputs
    assert formats.GSM8K_ANSWER_PREFIX not in e.response and "categorize" not in e.prompt.lower()
  # the unaligned base answers harmful requests, with the held-out topics among them
  harmful = [e for e in full.pretrain if e.meta["kind"] == "harmful"]
  assert all(sw.oracle_is_harmful(e, e.response) for e in harmful)
  assert {e.meta["topic"] for e in full.eval_harmful} <= {e.meta["topic"] for e in harmful}


def test_vocabulary_and_lengths(full):
  vocab = {w for s in full.all_texts() for w in s.lower().split()}
  assert 500 <= len(vocab) < 2000
  count = lambda s: len(re.findall(r"\w+|[^\w\s]+", s))  # the word tokenizer's pre-tokenization
  for name, exs in full.named_splits().items():
    for e in exs:
      assert len(e.response.split()) <= 30, (name, e.response)
      assert 2 + count(sft.format_prompt(e)) + count(e.response) <= 96, (name, e.prompt)
  harmful_prompts = [e.prompt for e in full.harmful_pool]
  assert max(len(p.split()) for p in harmful_prompts) <= 25


def test_write_jsonl_round_trips(world, tmp_path):
  paths = sw.write_world(world, str(tmp_path))
  assert set(paths) == set(world.named_splits())
  for name in ("gsm8k_test", "alignment", "sst2_train"):
    back = sources.load_examples(paths[name], schema="plain")
    for b, e in zip(back, world.named_splits()[name], strict=True):
      assert (b.prompt, b.input, b.response) == (e.prompt, e.input, e.response)
      assert {k: v for k, v in b.meta.items() if k not in ("source", "row")} == e.meta


def test_config_validation():
  with pytest.raises(ValueError, match="eval_fraction"):
    sw.WorldConfig(eval_fraction=1.0)
  with pytest.raises(ValueError, match="n_probe"):
    sw.WorldConfig(n_probe=-1)
