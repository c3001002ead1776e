"""The config's data: every source it names, the user's (attacked) fine-tuning set, the tokenizer, and the
data section's validation."""

from __future__ import annotations

import functools
import os

import ml_collections

from reft_jax import distributed as dist
from reft_jax.config import ConfigError, buckets, check, eval_harmless_sets, eval_tasks
from reft_jax.data import attacks, builtin, safety_world, sft, sources
from reft_jax.data.tokenizer import build_word_tokenizer, load_tokenizer


@functools.lru_cache(maxsize=4)
def _world(cfg: safety_world.WorldConfig) -> safety_world.World:
  return safety_world.build_world(cfg)


def world(c: ml_collections.ConfigDict) -> safety_world.World:
  return _world(safety_world.WorldConfig(**c.world.to_dict()))


def uses_world(c: ml_collections.ConfigDict) -> bool:
  specs = [c.data.source, c.data.harmful_source if c.data.attack != "none" else ""]
  if c.eval.enabled:
    specs += [c.eval.harmful, c.eval.harmless, *eval_tasks(c).values(), *eval_harmless_sets(c).values()]
  return any("world:" in s for s in specs)


def load(c: ml_collections.ConfigDict, spec: str, limit: int = 0, **kw) -> list[sft.Example]:
  return sources.load_source(spec, limit=limit, world=world(c) if "world:" in spec else None, **kw)


def read_examples(c: ml_collections.ConfigDict) -> list[sft.Example]:
  """The user's fine-tuning data, after the configured attack (with hidden is_harmful labels)."""
  d = c.data
  if d.source == "builtin":
    examples = builtin.toy_instructions(d.builtin_examples, seed=c.seed)
  else:
    examples = load(c, d.source, schema=d.schema, fields=d.fields, split=d.split)
  if d.attack == "none":
    return examples
  return attacks.build_user_data(d.attack, examples, load(c, d.harmful_source), d.n, d.p, seed=c.seed)


def get_tokenizer(c: ml_collections.ConfigDict, workdir: str, examples: list[sft.Example]):
  """model.tokenizer, the checkpoint's, or a word-level one built on the data (saved in workdir)."""
  from reft_jax.model.hf import resolve_checkpoint

  if c.model.tokenizer:
    tok = load_tokenizer(c.model.tokenizer)
    if c.model.hf_path:
      _check_same_vocab(tok, c.model.tokenizer, resolve_checkpoint(c.model.hf_path))
    return tok
  if c.model.hf_path:
    return load_tokenizer(resolve_checkpoint(c.model.hf_path))
  path = os.path.join(workdir, "tokenizer")
  dist.barrier("get_tokenizer")  # every process sees the same files: none is being written now
  if os.path.exists(os.path.join(path, "tokenizer.json")):  # reuse: a resumed run must not change it
    return load_tokenizer(path)
  texts = [sft.format_prompt(e, "alpaca") + " " + e.response for e in examples]
  if uses_world(c):  # the whole world's vocabulary, so held-out eval prompts have no unknown words
    texts += world(c).all_texts()
  return build_word_tokenizer(texts, path)


def _check_same_vocab(tok, name: str, model_dir: str) -> None:
  """model.tokenizer next to a checkpoint that ships its own: the two must map text to the same ids, or the
  model reads every token as another (no error, a far worse loss)."""
  try:
    own = load_tokenizer(model_dir)
  except (OSError, ValueError):  # the checkpoint has no tokenizer of its own: nothing to compare with
    return
  if own.get_vocab() != tok.get_vocab():
    raise ValueError(
      f"model.tokenizer={name!r} ({len(tok)} tokens) is not the tokenizer of model.hf_path={model_dir!r} "
      f"({len(own)} tokens; the ids differ): leave model.tokenizer empty to use the checkpoint's own"
    )


def is_local(spec: str) -> bool:
  return not spec.startswith(("hub:", "tfds:", "world:", "asset:", "builtin:")) and spec not in (
    *sources.HUB_SOURCES,
    "builtin",
  )


def validate_data(c: ml_collections.ConfigDict) -> None:
  """data and world."""
  d = c.data
  check(d.seq_len >= 8, "data.seq_len", d.seq_len, "must be >= 8")
  buckets(c)
  check(d.template in ("alpaca", "chat", "none"), "data.template", d.template, "must be alpaca, chat or none")
  if d.source == "builtin":
    check(d.builtin_examples > 0, "data.builtin_examples", d.builtin_examples, "must be positive")
  elif is_local(d.source):
    check(os.path.exists(d.source), "data.source", d.source, "file not found")
  check(d.attack in ("none", *attacks.ATTACKS), "data.attack", d.attack, f"must be none or one of {attacks.ATTACKS}")
  check(0 <= d.p <= 1, "data.p", d.p, "must lie in [0, 1]")
  check(d.n > 0, "data.n", d.n, "must be positive")
  check(d.schema in sources.SCHEMAS, "data.schema", d.schema, f"must be one of {tuple(sources.SCHEMAS)}")
  try:
    sources.parse_fields(d.fields)
  except ValueError as e:
    check(False, "data.fields", d.fields, str(e))
  try:
    safety_world.WorldConfig(**c.world.to_dict())
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.world: {e}") from None
