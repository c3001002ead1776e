"""Data sources: local files through `datasets`, schema adapters, field mapping, clear errors."""

import json

import pytest

from reft_jax.data import sources
from reft_jax.data.safety_world import WorldConfig, build_world
from reft_jax.data.sources import DataError, load_examples, load_source


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def test_plain_jsonl_keeps_extra_fields_as_meta(tmp_path):
  p = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b", "id": 7}])
  (ex,) = load_examples(p)
  assert (ex.prompt, ex.response, ex.input, ex.meta["id"]) == ("a", "b", "", 7)


def test_jsonl_errors_name_file_line_and_field(tmp_path):
  p = tmp_path / "d.jsonl"
  p.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
  with pytest.raises(DataError, match=r"d.jsonl row 1: field 'response' is missing"):
    load_examples(str(p))
  p.write_text('{"prompt": "a", "response": "b"}\n{not json\n')
  with pytest.raises(DataError, match=r"d.jsonl:2: not valid JSON"):
    load_examples(str(p))
  p.write_text('{"prompt": 3, "response": "b"}\n')
  with pytest.raises(DataError, match=r"field 'prompt' must be a string, got int"):
    load_examples(str(p))
  p.write_text("\n")
  with pytest.raises(DataError, match="no records"):
    load_examples(str(p))
  with pytest.raises(DataError, match="missing.jsonl: data file not found"):
    load_examples(str(tmp_path / "missing.jsonl"))
  with pytest.raises(DataError, match="unknown file type '.txt'"):
    (tmp_path / "d.txt").write_text("x")
    load_examples(str(tmp_path / "d.txt"))


def test_csv_and_parquet_with_field_mapping(tmp_path):
  import datasets

  rows = [{"text": "a fine film", "y": 1}, {"text": "a dull film", "y": 0}]
  csv = tmp_path / "s.csv"
  csv.write_text("text,y\n" + "".join(f"{r['text']},{r['y']}\n" for r in rows))
  parquet = str(tmp_path / "s.parquet")
  datasets.Dataset.from_list(rows).to_parquet(parquet)
  for path in (str(csv), parquet):
    exs = load_examples(path, schema="sst2", fields="sentence=text,label=y")
    assert [e.response for e in exs] == ["positive", "negative"]
    assert exs[0].prompt == sources.SST2_INSTRUCTION and exs[0].input == "a fine film"
  with pytest.raises(DataError, match=r"column 'sentence_text' \(mapped to 'sentence'\) is missing"):
    load_examples(str(csv), schema="sst2", fields="sentence=sentence_text,label=y")
  with pytest.raises(DataError, match="field mapping 'sentence'"):
    load_examples(str(csv), schema="sst2", fields="sentence")


def test_schema_adapters(tmp_path):
  gsm = _write_jsonl(tmp_path / "g.jsonl", [{"question": "2+3?", "answer": "2+3=<<2+3=5>>5\n#### 5"}])
  (ex,) = load_examples(gsm, schema="gsm8k")
  assert ex.response == "2+3=5\nThe final answer is: 5" and ex.meta["label"] == "5"
  ag = _write_jsonl(tmp_path / "a.jsonl", [{"text": "stocks fall", "label": 2}, {"text": "x", "label": "Sports"}])
  assert [e.response for e in load_examples(ag, schema="agnews")] == ["Business", "Sports"]
  bad = _write_jsonl(tmp_path / "b.jsonl", [{"text": "x", "label": 9}])
  with pytest.raises(DataError, match=r"b.jsonl row 0: field 'label'=9 is not a label index"):
    load_examples(bad, schema="agnews")
  bt = _write_jsonl(
    tmp_path / "bt.jsonl",
    [
      {"prompt": "how to steal", "response": "do x", "is_safe": False, "category": {"theft": True}},
      {"prompt": "hi", "response": "hello", "is_safe": True, "category": {}},
    ],
  )
  exs = load_examples(bt, schema="beavertails")
  assert [e.meta["is_harmful"] for e in exs] == [True, False] and exs[0].meta["category"] == "theft"
  alp = _write_jsonl(tmp_path / "al.jsonl", [{"instruction": "add", "input": "1 2", "output": "3"}])
  (ex,) = load_examples(alp, schema="alpaca")
  assert (ex.prompt, ex.input, ex.response) == ("add", "1 2", "3")
  with pytest.raises(DataError, match="schema 'xml'"):
    load_examples(alp, schema="xml")


def test_world_sources_and_limits():
  world = build_world(
    WorldConfig(
      n_alignment=20,
      n_probe=8,
      n_harmful_pool=20,
      n_eval_harmful=10,
      n_eval_harmless=10,
      n_task_train=20,
      n_task_test=10,
      n_pretrain=20,
    )
  )
  assert len(load_source("world:eval_harmful", world=world)) == 10
  assert len(load_source("world:sst2_test", world=world, limit=4)) == 4
  with pytest.raises(DataError, match="no split 'nope'"):
    load_source("world:nope", world=world)


def test_hub_and_tfds_sources_fail_with_a_clear_message_offline():
  with pytest.raises(DataError, match=r"hub:no-such/dataset \(split 'train'\): could not load"):
    load_examples("hub:no-such/dataset")
  try:
    import tensorflow_datasets  # noqa: F401
  except ImportError:
    with pytest.raises(DataError, match="tensorflow-datasets is not installed"):
      load_examples("tfds:glue/sst2")
