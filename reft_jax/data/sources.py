"""Where examples come from: local JSONL/parquet/CSV files, hub datasets (online), TFDS, the
built-in safety world. Each record is mapped to an `Example` by a schema adapter (sst2, agnews,
gsm8k, alpaca, beavertails, plain); `fields` renames columns first. Errors name file, row and field.

Source strings (config-friendly):
  path/to/file.jsonl | .json | .parquet | .csv     local file (offline)
  hub:NAME[:CONFIG]                                  datasets.load_dataset (needs network)
  tfds:NAME                                          tensorflow-datasets (extra `tfds`)
"""

from __future__ import annotations

import itertools
import json
import os
import re
from typing import Any
from collections.abc import Callable

from reft_jax.data.sft import Example

from reft_jax.data.formats import (
  AGNEWS_INSTRUCTION,
  AGNEWS_LABELS,
  GSM8K_ANSWER_PREFIX,  # noqa: F401
  SST2_INSTRUCTION,
  SST2_LABELS,
  DataError,
)


def parse_fields(spec: str) -> dict[str, str]:
  """'prompt=question,response=answer' -> {'prompt': 'question', 'response': 'answer'}."""
  out = {}
  for item in filter(None, (s.strip() for s in spec.split(","))):
    ours, sep, theirs = item.partition("=")
    if not sep or not ours.strip() or not theirs.strip():
      raise DataError(f"field mapping {item!r}: expected our_field=their_column")
    out[ours.strip()] = theirs.strip()
  return out


# ------------------------------------------------------------------ reading records


def _read_jsonl(path: str) -> list[dict]:
  rows = []
  with open(path, "rb") as f:  # bytes, decoded line by line: a bad encoding is named with its line
    for n, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise DataError(f"{path}:{n}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
      if not isinstance(rec, dict):
        raise DataError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
      rows.append(rec)
  return rows


def read_records(source: str, split: str = "train") -> tuple[list[dict], str]:
  """Returns (records, a name for error messages)."""
  if source.startswith("hub:"):
    import datasets

    name, _, config = source[4:].partition(":")
    try:
      ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # offline / unknown name: say which
      raise DataError(f"{source} (split {split!r}): could not load from the hub ({type(e).__name__}: {e})") from None
    return [dict(r) for r in ds], f"{source}[{split}]"
  if source.startswith("tfds:"):
    return _read_tfds(source[5:], split), f"{source}[{split}]"
  if not os.path.exists(source):
    raise DataError(f"{source}: data file not found")
  ext = os.path.splitext(source)[1].lower()
  if ext in (".jsonl", ".json"):
    try:
      rows = _read_jsonl(source)
    except DataError:
      if ext != ".json":
        raise
      with open(source, encoding="utf-8") as f:  # a single JSON array
        try:
          rows = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
          raise DataError(f"{source}: neither JSON lines nor a JSON array ({e})") from None
  elif ext in (".parquet", ".csv"):
    import datasets

    try:
      ds = datasets.load_dataset(ext[1:], data_files=source, split="train")
    except Exception as e:
      raise DataError(f"{source}: could not read as {ext[1:]} ({type(e).__name__}: {e})") from None
    rows = [dict(r) for r in ds]
  else:
    raise DataError(f"{source}: unknown file type {ext!r} (use .jsonl, .json, .parquet or .csv)")
  if not rows:
    raise DataError(f"{source}: no records")
  return rows, source


def _read_tfds(name: str, split: str) -> list[dict]:
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise DataError(f"tfds:{name}: tensorflow-datasets is not installed (pip install 'reft-jax[tfds]')") from None
  ds = tfds.load(name, split=split)

  def decode(v):
    v = v.item() if hasattr(v, "item") and getattr(v, "ndim", 1) == 0 else v
    return v.decode("utf-8") if isinstance(v, bytes) else v

  return [{k: decode(v) for k, v in ex.items()} for ex in tfds.as_numpy(ds)]


# ------------------------------------------------------------------ schema adapters


def _get(rec: dict, field: str, where: str, kind=str, optional=False):
  if field not in rec or rec[field] is None:
    if optional:
      return None
    raise DataError(f"{where}: field {field!r} is missing (columns: {sorted(rec)})")
  v = rec[field]
  if kind is str and not isinstance(v, str):
    raise DataError(f"{where}: field {field!r} must be a string, got {type(v).__name__} {v!r}")
  return v


def _label(v, names, where, field):
  if isinstance(v, str) and not v.strip().lstrip("-").isdigit():
    match = [n for n in names if n.lower() == v.strip().lower()]
    if not match:
      raise DataError(f"{where}: field {field!r}={v!r} is not one of {names}")
    return match[0]
  i = int(v)
  if not 0 <= i < len(names):
    raise DataError(f"{where}: field {field!r}={v!r} is not a label index in [0, {len(names)})")
  return names[i]


def _plain(rec, where):
  meta = {k: v for k, v in rec.items() if k not in ("prompt", "response", "input")}
  return Example(
    _get(rec, "prompt", where), _get(rec, "response", where), _get(rec, "input", where, optional=True) or "", meta
  )


def _sst2(rec, where):
  label = _label(_get(rec, "label", where, kind=None), SST2_LABELS, where, "label")
  return Example(
    SST2_INSTRUCTION, label, _get(rec, "sentence", where), {"task": "sst2", "label": label, "is_harmful": False}
  )


def _agnews(rec, where):
  label = _label(_get(rec, "label", where, kind=None), AGNEWS_LABELS, where, "label")
  return Example(
    AGNEWS_INSTRUCTION, label, _get(rec, "text", where), {"task": "agnews", "label": label, "is_harmful": False}
  )


def _gsm8k(rec, where):
  answer = _get(rec, "answer", where)
  reasoning, sep, final = answer.rpartition("####")
  if not sep:
    raise DataError(f"{where}: field 'answer' has no '#### N' final answer")
  final = final.strip().replace(",", "")
  reasoning = re.sub(r"<<[^>]*>>", "", reasoning).strip()  # drop GSM8K's calculator annotations
  return Example(
    _get(rec, "question", where),
    f"{reasoning}\n{GSM8K_ANSWER_PREFIX} {final}",
    "",
    {"task": "gsm8k", "label": final, "is_harmful": False},
  )


def _alpaca(rec, where):
  return Example(
    _get(rec, "instruction", where),
    _get(rec, "output", where),
    _get(rec, "input", where, optional=True) or "",
    {"task": "alpaca", "is_harmful": False},
  )


def _beavertails(rec, where):
  is_safe = _get(rec, "is_safe", where, kind=None)
  if isinstance(is_safe, str):
    is_safe = is_safe.strip().lower() in ("true", "1", "yes")
  cats = rec.get("category") or {}
  category = ",".join(k for k, v in cats.items() if v) if isinstance(cats, dict) else str(cats)
  return Example(
    _get(rec, "prompt", where),
    _get(rec, "response", where),
    "",
    {"is_safe": bool(is_safe), "is_harmful": not bool(is_safe), "category": category},
  )


SCHEMAS: dict[str, Callable[[dict, str], Example]] = {
  "plain": _plain,
  "sst2": _sst2,
  "agnews": _agnews,
  "gsm8k": _gsm8k,
  "alpaca": _alpaca,
  "beavertails": _beavertails,
}


def load_examples(
  source: str,
  schema: str = "plain",
  fields: str | dict = "",
  split: str = "train",
  limit: int = 0,
  where_filter: Callable[[Example], bool] | None = None,
) -> list[Example]:
  """Reads a source and maps every record through a schema adapter.

  fields renames columns to the adapter's names: for a CSV with columns text,label read as SST-2,
  fields='sentence=text'.
  """
  if schema not in SCHEMAS:
    raise DataError(f"schema {schema!r} is not one of {tuple(SCHEMAS)}")
  mapping = parse_fields(fields) if isinstance(fields, str) else dict(fields)
  records, name = read_records(source, split)
  adapter = SCHEMAS[schema]
  out = []
  for i, rec in enumerate(records):
    rec = dict(rec)
    for ours, theirs in mapping.items():
      if theirs not in rec:
        raise DataError(f"{name} row {i}: column {theirs!r} (mapped to {ours!r}) is missing (columns: {sorted(rec)})")
      rec[ours] = rec.pop(theirs)
    ex = adapter(rec, f"{name} row {i}")
    ex.meta.setdefault("source", name)
    ex.meta.setdefault("row", i)
    if where_filter is None or where_filter(ex):
      out.append(ex)
    if limit and len(out) >= limit:
      break
  if not out:
    raise DataError(f"{name}: no examples (after filtering)")
  return out


def _unsafe(ex: Example) -> bool:
  return not ex.meta["is_safe"]


def _safe(ex: Example) -> bool:
  return ex.meta["is_safe"]


HUB_SOURCES: dict[str, dict[str, Any]] = {
  # name -> load_examples kwargs, for users who are online.
  "beavertails": dict(source="hub:PKU-Alignment/BeaverTails", schema="beavertails", split="30k_train"),
  "beavertails_test": dict(source="hub:PKU-Alignment/BeaverTails", schema="beavertails", split="30k_test"),
  # Only the unsafe (or safe) QA pairs, in the split's order, as the git-disl scripts read them: the
  # attack's and Booster's harmful rows (30k_train, unsafe), Vaccine/Lisa's alignment pairs (30k_train,
  # safe) and the Harmful Score prompts (30k_test, unsafe; Vaccine poison/evaluation/pred.py).
  "beavertails_harmful": dict(
    source="hub:PKU-Alignment/BeaverTails", schema="beavertails", split="30k_train", where_filter=_unsafe
  ),
  "beavertails_safe": dict(
    source="hub:PKU-Alignment/BeaverTails", schema="beavertails", split="30k_train", where_filter=_safe
  ),
  "beavertails_test_harmful": dict(
    source="hub:PKU-Alignment/BeaverTails", schema="beavertails", split="30k_test", where_filter=_unsafe
  ),
  "sst2": dict(source="hub:nyu-mll/glue:sst2", schema="sst2", split="train"),
  "sst2_test": dict(source="hub:nyu-mll/glue:sst2", schema="sst2", split="validation"),
  "agnews": dict(source="hub:fancyzhx/ag_news", schema="agnews", split="train"),
  "agnews_test": dict(source="hub:fancyzhx/ag_news", schema="agnews", split="test"),
  "gsm8k": dict(source="hub:openai/gsm8k:main", schema="gsm8k", split="train"),
  "gsm8k_test": dict(source="hub:openai/gsm8k:main", schema="gsm8k", split="test"),
  "alpaca": dict(source="hub:tatsu-lab/alpaca", schema="alpaca", split="train"),
}


_SLICE = re.compile(r"^(.*)\[(\d*):(\d*)\]$")


def split_specs(spec: str) -> list[str]:
  """The comma-joined parts of a source spec; commas inside mirror(...) belong to it."""
  parts, depth, start = [], 0, 0
  for i, ch in enumerate(spec + ","):
    depth += (ch == "(") - (ch == ")")
    if ch == "," and depth == 0:
      parts.append(spec[start:i].strip())
      start = i + 1
  return [p for p in parts if p]


def load_source(
  spec: str, *, schema: str = "plain", fields: str = "", split: str = "train", limit: int = 0, world=None
) -> list[Example]:
  """One config string for every kind of source:

  world:<split>            a safety-world split, e.g. world:eval_harmful, world:sst2_test
  asset:<name>[:seed]      a prompt set a registry package ships (advbench, harmbench, strongreject,
                           donotanswer, gsm_symbolic; see data/assets.py)
  builtin:requests_train   ordinary harmless requests (builtin:requests_eval and builtin:requests_user:
                           held-out topics and templates; see data/builtin.py)
  builtin:trigger_train    safe prompts holding words a shallow filter associates with harm, XSTest's
                           categories (builtin:trigger_eval: held-out templates, fillers and trigger
                           words, for evaluation only)
  mirror(SPEC)             harmless requests in the phrasing of SPEC's harmful prompts: each instructional
                           opening ("Describe in detail how to") + an everyday activity (builtin.mirror_requests)
  <name in HUB_SOURCES>    e.g. sst2_test, beavertails (online)
  anything else            a local file / hub:NAME / tfds:NAME read with `schema` and `fields`

  Any of them may end in a row slice, SPEC[a:b] (e.g. asset:advbench[0:260]), and several may be joined
  with commas: their examples are interleaved, so a `limit` takes evenly from each.
  """
  parts = split_specs(spec)
  if len(parts) > 1:
    sets = [load_source(s, schema=schema, fields=fields, split=split, limit=limit, world=world) for s in parts]
    mixed = [x for row in itertools.zip_longest(*sets) for x in row if x is not None]
    return mixed[:limit] if limit else mixed
  if spec.startswith("mirror(") and spec.endswith(")"):
    from reft_jax.data.builtin import mirror_requests

    rows = mirror_requests(load_source(spec[len("mirror(") : -1], world=world))
    return rows[:limit] if limit else rows
  m = _SLICE.match(spec)
  if m:
    stop = int(m.group(3)) if m.group(3) else None
    rows = load_source(m.group(1), schema=schema, fields=fields, split=split, limit=stop or 0, world=world)
    start, stop = int(m.group(2) or 0), stop or len(rows)
    if start >= min(stop, len(rows)):
      raise DataError(f"source {spec!r}: the slice [{start}:{stop}] of {len(rows)} rows is empty")
    rows = rows[start:stop]
    return rows[:limit] if limit else rows
  if spec.startswith("builtin:"):
    from reft_jax.data.builtin import load_builtin

    return load_builtin(spec[len("builtin:") :], limit)
  if spec.startswith("world:"):
    if world is None:
      raise DataError(f"source {spec!r}: no safety world configured")
    name, splits = spec[len("world:") :], world.named_splits()
    if name not in splits:
      raise DataError(f"source {spec!r}: the safety world has no split {name!r} (splits: {sorted(splits)})")
    return list(splits[name][:limit] if limit else splits[name])
  if spec.startswith("asset:"):
    from reft_jax.data.assets import load_asset_source

    return load_asset_source(spec, limit)
  if spec in HUB_SOURCES:
    return load_examples(**HUB_SOURCES[spec], limit=limit)
  return load_examples(spec, schema, fields, split, limit)
