"""The minimal SFT data path: JSONL parsing errors, templating, masks and deterministic batches."""

import numpy as np
import pytest

from reft_jax.data import sft
from reft_jax.data.tokenizer import build_word_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  texts = [sft.ALPACA_PROMPT.format(instruction="say hello to the world"), "hello world ."]
  return build_word_tokenizer(texts, str(tmp_path_factory.mktemp("tok")))


def test_loss_mask_covers_exactly_the_response_and_eos(tok):
  ex = sft.Example("say hello to the world", "hello world .")
  data = sft.tokenize([ex], tok, seq_len=64)
  ids, mask = data.tokens[0], data.loss_mask[0]
  n = int(data.attention_mask[0].sum())
  assert ids[0] == tok.bos_token_id and ids[n - 1] == tok.eos_token_id
  assert list(ids[mask == 1][:-1]) == tok.encode("hello world .", add_special_tokens=False)
  prompt = sft.format_prompt(ex)
  assert list(ids[1:n][mask[1:n] == 0]) == tok.encode(prompt, add_special_tokens=False)
  assert (ids[n:] == tok.pad_token_id).all() and data.num_truncated == 0


def test_truncation_is_counted(tok):
  data = sft.tokenize([sft.Example("say hello", "hello " * 50)], tok, seq_len=32)
  assert data.num_truncated == 1 and data.attention_mask.sum() == 32


def test_batches_are_a_pure_function_of_seed_and_step(tok):
  exs = [sft.Example("say hello", "hello " * (i % 5 + 1)) for i in range(10)]
  data = sft.tokenize(exs, tok, seq_len=32)
  a, b = sft.Batcher(data, 4, seed=1), sft.Batcher(data, 4, seed=1)
  seen = np.concatenate([a.indices(s) for s in range(5)])  # two epochs of 10
  assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
  assert all((a.indices(s) == b.indices(s)).all() for s in range(7))
  assert not (sft.Batcher(data, 4, seed=2).indices(0) == a.indices(0)).all()


def test_buckets_cut_padding_and_keep_every_example(tok):
  exs = [sft.Example("say hello", "hello " * n) for n in [1, 2, 3, 20, 22, 25, 1, 2] * 4]
  data = sft.tokenize(exs, tok, seq_len=64, template="none")  # lengths 5 .. 29
  b = sft.Batcher(data, 4, seed=0, buckets=(16, 32))
  seen, widths = [], set()
  for step in range(8):  # one epoch of 32
    batch = b.local_batch(step)
    widths.add(batch["tokens"].shape[1])
    assert batch["attention_mask"].sum(axis=1).max() <= batch["tokens"].shape[1]
    seen.extend(b.indices(step))
  assert sorted(seen) == list(range(32))
  assert widths == {16, 32}  # short batches are cut to 16, long ones to 32; none needs 64


def test_chat_template_formatting_with_system_prompt(tok):
  tok.chat_template = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
  )
  ex = sft.Example("say hello", "hello", input="to the world", system="be kind")
  assert sft.format_prompt(ex, "chat", tok) == ("<system> be kind <user> say hello\n\nto the world <assistant>")
  assert sft.format_prompt(sft.Example("say hello", "hi"), "none") == "say hello"
  with pytest.raises(ValueError, match="data.template='xml'"):
    sft.format_prompt(ex, "xml")
