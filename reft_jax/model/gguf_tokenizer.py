"""GGUF vocabularies -> a `tokenizers` tokenizer, without torch.

transformers' GGUF tokenizer loader imports torch (its GGUF reader does), so the vocabulary is turned into
a `tokenizers` pipeline here. It mirrors transformers' integrations/gguf/gguf_tokenizer_mapping.py
(byte_level_tokenizer, sentencepiece_tokenizer, gemma_tokenizer, add_gguf_special_tokens,
set_split_regex) and the GPT2Tokenizer / LlamaTokenizer / GemmaTokenizer pipelines it hands the
vocabulary to; tests/test_gguf.py checks identical ids and chat-template text against that loader."""

from __future__ import annotations


_BULKY_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")


def read_metadata(reader) -> dict:
  """Scalar and small-array metadata as Python values (the vocabulary arrays are left out)."""
  return {k: f.contents() for k, f in reader.fields.items() if k not in _BULKY_KEYS}


_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token types

_LLAMA3_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
  r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
  r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
  r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
  r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
  r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
  r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
  r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> the split its merges were learned with; other names keep ByteLevel's GPT-2 regex.
_PRE_SPLITS = {
  **dict.fromkeys(
    (
      "llama3",
      "llama-v3",
      "llama-bpe",
      "falcon3",
      "falcon-h1",
      "pixtral",
      "midm-2.0",
      "lfm2",
      "jina-v5-nano",
      "dbrx",
      "smaug-bpe",
    ),
    _LLAMA3_SPLIT,
  ),
  **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
  **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
  "qwen35": _QWEN35_SPLIT,
  "tekken": _TEKKEN_SPLIT,
}
_GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")
# The special tokens transformers' tokenizer classes default to, per pipeline (see _build_tokenizer).
_CLASS_SPECIALS = {
  "gpt2": ("<|endoftext|>",),
  "llama": ("<s>", "</s>", "<unk>"),
  "gemma": ("<bos>", "<eos>", "<unk>", "<pad>", "<mask>"),
}
_FILE_SPECIALS = {
  "bos_token": "tokenizer.ggml.bos_token_id",
  "eos_token": "tokenizer.ggml.eos_token_id",
  "unk_token": "tokenizer.ggml.unknown_token_id",
  "pad_token": "tokenizer.ggml.padding_token_id",
}


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable character table: byte-level vocabularies are spelled in this alphabet."""
  bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:  # whitespace and control bytes map to U+0100.. in byte order
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def merges_from_scores(tokens: list[str], scores) -> list[tuple[str, str]]:
  """The merges a sentencepiece vocabulary implies (transformers' generate_merges): every split of a token
  into two vocabulary tokens, ordered by the merged token's score, best first."""
  vocab = {t: i for i, t in enumerate(tokens)}
  merges = []
  for token, score in dict(zip(tokens, scores)).items():
    local = [(token[:i], token[i:], score) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
    merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
  merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)  # stable: ties keep their order
  return [(a, b) for a, b, _ in merges]


def _field(reader, key: str):
  f = reader.fields.get(key)
  return None if f is None else f.contents()


def _build_tokenizer(reader, meta: dict, tokens: list[str], source: str):
  """(tokenizers.Tokenizer, pipeline name) for the vocabulary the GGUF describes."""
  from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

  kind, arch = meta.get("tokenizer.ggml.model"), meta.get("general.architecture")
  merges = _field(reader, "tokenizer.ggml.merges")
  merges = None if merges is None else [tuple(m.split(" ")) for m in merges]
  if kind == "gpt2":  # byte-level BPE (GPT2Tokenizer)
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
      t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i for i, t in enumerate(tokens)
    }
    tok = Tokenizer(
      models.BPE(
        vocab=vocab,
        merges=merges or [],
        dropout=None,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
      )
    )
    split = _PRE_SPLITS.get(meta.get("tokenizer.ggml.pre"))
    tok.pre_tokenizer = (
      pre_tokenizers.ByteLevel(add_prefix_space=False)
      if split is None
      else pre_tokenizers.Sequence(
        [
          pre_tokenizers.Split(Regex(split), behavior="isolated"),
          pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
      )
    )
    tok.decoder = decoders.ByteLevel()
    return tok, "gpt2"
  if kind != "llama":
    raise ValueError(
      f"{source}: tokenizer.ggml.model {kind!r} is not supported; supported: 'gpt2' "
      "(byte-level BPE) and 'llama' (sentencepiece BPE)"
    )
  scores = _field(reader, "tokenizer.ggml.scores")
  if arch in _GEMMA_ARCHS:  # GemmaTokenizer: spaces normalised to "▁", no prefix space, no merges in the file
    # Tokens of 2+ spaces are stored as spaces but looked up as "▁▁..."; merge order is file order.
    tokens = ["▁" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    if merges is None:
      merges = merges_from_scores(tokens, [-i for i in range(len(tokens))])
    tok = Tokenizer(
      models.BPE(vocab=vocab, merges=merges, fuse_unk=True, dropout=None, byte_fallback=True, unk_token="<unk>")
    )
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.normalizer = normalizers.Replace(" ", "▁")
    return tok, "gemma"
  # LlamaTokenizer: Metaspace with a prefix "▁" on the first word only (legacy=False), byte fallback.
  vocab = {t: i for i, t in enumerate(tokens)}
  if merges is None:
    if scores is None:
      raise ValueError(f"{source}: a sentencepiece vocabulary needs tokenizer.ggml.scores or .merges")
    merges = merges_from_scores(tokens, scores)
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
  tok.decoder = decoders.Sequence(
    [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(content=" ", left=1)]
  )
  if arch == "phi3":  # the prefix "▁" comes from a normalizer (so "  hi" keeps both spaces)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
  else:
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
  return tok, "llama"


def tokenizer_from_gguf(reader, source: str = "gguf"):
  """A transformers PreTrainedTokenizerFast built from a GGUF's vocabulary (tokenizer.ggml.*: tokens,
  merges or scores, token types, special ids, add_bos/eos) and chat template, with `gguf` and
  `tokenizers` only (no torch), giving the ids transformers' own GGUF loader gives."""
  from tokenizers import AddedToken
  from transformers import PreTrainedTokenizerFast

  meta = read_metadata(reader)
  tokens = _field(reader, "tokenizer.ggml.tokens")
  if tokens is None:
    raise ValueError(f"{source}: no tokenizer.ggml.tokens: a GGUF without its vocabulary is not supported")
  backend, kind = _build_tokenizer(reader, meta, tokens, source)
  vocab = backend.get_vocab()
  types = _field(reader, "tokenizer.ggml.token_type") or []
  # Tokens the file marks control (<|im_end|>) are special and never split; in a byte-level vocabulary a
  # "control" token spelled outside the byte alphabet is a llama.cpp mislabel and is skipped (as
  # transformers does). User-defined tokens (<think>) are matched whole but are not special.
  alphabet = set(bytes_to_unicode().values()) if kind == "gpt2" else None
  control = [t for t, ty in zip(tokens, types) if ty == _CONTROL and (alphabet is None or set(t) <= alphabet)]
  user = [t for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in vocab]
  # transformers' tokenizer classes also make their default special tokens special; only the ones the
  # vocabulary has (a default it lacks would get an id past the model's embedding: documented choice).
  defaults = [t for t in _CLASS_SPECIALS[kind] if t in vocab]
  backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in defaults + control])
  backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])

  kwargs = {name: tokens[meta[key]] if meta.get(key) is not None else None for name, key in _FILE_SPECIALS.items()}
  # llama.cpp adds BOS to a sentencepiece vocabulary that does not say otherwise.
  add_bos = meta.get("tokenizer.ggml.add_bos_token", kind != "gpt2")
  add_eos = meta.get("tokenizer.ggml.add_eos_token", False)
  if kind == "gemma":  # GemmaTokenizer's class defaults
    kwargs["padding_side"] = "left"
    kwargs["mask_token"] = "<mask>" if "<mask>" in vocab else None
  tok = PreTrainedTokenizerFast(
    tokenizer_object=backend, add_bos_token=bool(add_bos), add_eos_token=bool(add_eos), **kwargs
  )
  if meta.get("tokenizer.chat_template"):
    tok.chat_template = meta["tokenizer.chat_template"]
  return tok
