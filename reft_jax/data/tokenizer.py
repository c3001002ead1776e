"""Tokenizers: any local Hugging Face tokenizer directory, or a word-level one built from text."""

from __future__ import annotations

import os
from collections.abc import Iterable

from reft_jax import distributed as dist

SPECIALS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}


def load_tokenizer(path: str):
  """transformers.AutoTokenizer from a local directory (or a hub name when online)."""
  from transformers import AutoTokenizer

  if os.path.isdir(path) and not any(
    os.path.exists(os.path.join(path, f))
    for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
  ):
    raise FileNotFoundError(f"{path}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
  tok = AutoTokenizer.from_pretrained(path)
  if tok.pad_token is None:  # Llama-style tokenizers ship without one; padding is masked anyway
    tok.pad_token = tok.eos_token
  return tok


def build_word_tokenizer(texts: Iterable[str], out_dir: str, min_count: int = 1, pad_to_multiple: int = 8):
  """A word-level tokenizer (lower-cased words and punctuation) saved in HF format to out_dir."""
  from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  norm = normalizers.Lowercase()
  pre = pre_tokenizers.Whitespace()
  counts: dict[str, int] = {}
  for t in texts:
    for w, _ in pre.pre_tokenize_str(norm.normalize_str(t)):
      counts[w] = counts.get(w, 0) + 1
  words = sorted(w for w, c in counts.items() if c >= min_count)
  vocab = {s: i for i, s in enumerate(SPECIALS.values())}
  for w in words:
    vocab.setdefault(w, len(vocab))
  i = 0
  while len(vocab) % pad_to_multiple:  # a vocabulary size friendly to sharding over devices
    vocab[f"<extra_{i}>"] = len(vocab)
    i += 1
  tok = Tokenizer(models.WordLevel(vocab, unk_token=SPECIALS["unk_token"]))
  tok.normalizer, tok.pre_tokenizer, tok.decoder = norm, pre, decoders.WordPiece(prefix="##")
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIALS)
  if dist.is_primary():  # one writer in the shared workdir; the others read once it is complete
    fast.save_pretrained(out_dir)
  dist.barrier("build_word_tokenizer")
  return load_tokenizer(out_dir)
