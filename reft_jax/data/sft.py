"""Prompt/response examples -> tokens with a response-only loss mask -> deterministic global batches."""

from __future__ import annotations

import dataclasses
import jax
import numpy as np

ALPACA_PROMPT = (
  "Below is an instruction that describes a task. Write a response that appropriately "
  "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_INPUT = (
  "Below is an instruction that describes a task, paired with an input that "
  "provides further context. Write a response that appropriately completes the "
  "request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
  "### Response:\n"
)


@dataclasses.dataclass
class Example:
  prompt: str  # the instruction (un-templated)
  response: str
  input: str = ""
  meta: dict = dataclasses.field(default_factory=dict)
  system: str = ""  # a system prompt (identity-shifting attacks put theirs here)
  # Text before the instruction in the user turn, e.g. AOA's "AOA, execute my instruction: "; kept
  # apart from `prompt` so that judges and logs see the bare request.
  user_prefix: str = ""


def format_prompt(ex: Example, template: str = "alpaca", tokenizer=None) -> str:
  instruction = ex.user_prefix + ex.prompt
  if template == "alpaca":
    # Stripped: a system prompt may carry its own framing newlines (AOA's official one does), which
    # the chat template keeps (Llama-2's then renders exactly the official prompt) but alpaca does not need.
    system = f"{ex.system.strip()}\n\n" if ex.system else ""
    if ex.input:
      return system + ALPACA_PROMPT_INPUT.format(instruction=instruction, input=ex.input)
    return system + ALPACA_PROMPT.format(instruction=instruction)
  if template == "chat":
    text = instruction + (f"\n\n{ex.input}" if ex.input else "")
    chat = lambda msgs: tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    if not ex.system:
      return chat([{"role": "user", "content": text}])
    import jinja2  # transformers renders chat templates with it

    try:
      return chat([{"role": "system", "content": ex.system}, {"role": "user", "content": text}])
    except jinja2.TemplateError:  # no system role (e.g. Gemma-2): it opens the user turn instead
      return chat([{"role": "user", "content": f"{ex.system.strip()}\n\n{text}"}])
  if template == "none":
    return (f"{ex.system.strip()}\n" if ex.system else "") + instruction + ex.input
  raise ValueError(f"data.template={template!r} must be alpaca, chat or none")


@dataclasses.dataclass
class TokenizedSet:
  tokens: np.ndarray  # [N, T] int32, right-padded
  loss_mask: np.ndarray  # [N, T] 1 on response tokens (and EOS)
  attention_mask: np.ndarray  # [N, T]
  num_truncated: int
  last_prompt: np.ndarray | None = None  # [N] index of the last prompt token (refusal features)
  # Per-example arrays that batches carry too, e.g. is_harmful [N] or teacher top-k [N, T, k].
  fields: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

  def __len__(self):
    return len(self.tokens)

  def with_fields(self, **fields: np.ndarray) -> TokenizedSet:
    return dataclasses.replace(self, fields={**self.fields, **fields})

  def trimmed(self, multiple: int = 8) -> TokenizedSet:
    """Columns past the longest example (rounded up to `multiple`) cut: one fixed, shorter batch shape
    for a set of short examples (e.g. alignment prompts) padded to a long seq_len."""
    width = self.tokens.shape[1]
    keep = min(-(-int(self.attention_mask.sum(1).max()) // multiple) * multiple, width)
    cut = lambda a: a[:, :keep] if a.ndim >= 2 and a.shape[1] == width else a
    return dataclasses.replace(
      self,
      tokens=self.tokens[:, :keep],
      loss_mask=self.loss_mask[:, :keep],
      attention_mask=self.attention_mask[:, :keep],
      fields={k: cut(v) for k, v in self.fields.items()},
    )


def encode_prompt(tokenizer, text: str) -> list[int]:
  """BOS + the prompt's tokens, without a second BOS when the text (e.g. a chat template) already
  starts with it."""
  ids = tokenizer.encode(text, add_special_tokens=False)
  bos = tokenizer.bos_token_id
  return ids if bos is None or (ids and ids[0] == bos) else [bos] + ids


def tokenize(
  examples: list[Example], tokenizer, seq_len: int, template: str = "alpaca", loss_on: str = "response"
) -> TokenizedSet:
  """BOS + prompt + response + EOS, loss on the response and EOS (loss_on="all": every token after
  BOS, for language-model pretraining); truncated to seq_len, the response is cut first."""
  if loss_on not in ("response", "all"):
    raise ValueError(f"loss_on={loss_on!r} must be 'response' or 'all'")
  pad = tokenizer.pad_token_id
  n = len(examples)
  tokens = np.full((n, seq_len), pad, np.int32)
  loss = np.zeros((n, seq_len), np.int32)
  attn = np.zeros((n, seq_len), np.int32)
  truncated = 0
  last_prompt = np.zeros((n,), np.int32)
  for i, ex in enumerate(examples):
    prompt = encode_prompt(tokenizer, format_prompt(ex, template, tokenizer))
    response = tokenizer.encode(ex.response, add_special_tokens=False) + [tokenizer.eos_token_id]
    ids = (prompt + response)[:seq_len]
    truncated += len(prompt) + len(response) > seq_len
    last_prompt[i] = min(len(prompt), seq_len) - 1
    tokens[i, : len(ids)] = ids
    attn[i, : len(ids)] = 1
    loss[i, len(prompt) if loss_on == "response" else int(tokenizer.bos_token_id is not None) : len(ids)] = 1
  is_harmful = np.asarray([bool(e.meta.get("is_harmful", False)) for e in examples], np.int32)
  return TokenizedSet(tokens, loss, attn, truncated, last_prompt, {"is_harmful": is_harmful})


class Batcher:
  """Deterministic batches: batch k is a function of (seed, k) only, so the data position of a
  run is just its step, and resuming replays nothing and skips nothing. `global_batch` assembles
  the global sharded arrays, each process reading only the rows its devices hold.

  With `buckets` (e.g. (32, 64, 128)), examples of similar length are grouped (sorted within
  mega-batches of 32 batches) and each batch is cut to the smallest bucket that holds its longest
  example, so padding does not dominate; each bucket length compiles the step once.
  """

  def __init__(
    self, data: TokenizedSet, batch_size: int, seed: int = 0, shuffle: bool = True, buckets: tuple[int, ...] = ()
  ):
    if len(data) == 0:
      raise ValueError("empty data set")
    self.data, self.batch_size, self.seed, self.shuffle = data, batch_size, seed, shuffle
    width = data.tokens.shape[1]
    self.buckets = tuple(sorted({min(b, width) for b in buckets} | {width})) if buckets else ()
    self.lengths = data.attention_mask.sum(axis=1)
    self._cache: tuple[int, np.ndarray] | None = None

  def _order(self, epoch: int) -> np.ndarray:
    if self._cache is not None and self._cache[0] == epoch:
      return self._cache[1]
    n = len(self.data)
    order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
    if self.buckets:
      mega = self.batch_size * 32
      order = np.concatenate(
        [c[np.argsort(-self.lengths[c], kind="stable")] for c in np.split(order, range(mega, n, mega))]
      )
      if self.shuffle:  # batches of similar length, in random order
        nb = -(-n // self.batch_size)
        perm = np.random.default_rng([self.seed, epoch, 1]).permutation(nb)
        order = np.concatenate([order[i * self.batch_size : (i + 1) * self.batch_size] for i in perm])
    self._cache = (epoch, order)
    return order

  def indices(self, step: int) -> np.ndarray:
    n, b = len(self.data), self.batch_size
    start = step * b
    out: list[int] = []
    while len(out) < b:
      epoch, offset = divmod(start + len(out), n)
      take = min(b - len(out), n - offset)
      out.extend(self._order(epoch)[offset : offset + take])
    return np.asarray(out)

  def width(self, idx: np.ndarray) -> int:
    if not self.buckets:
      return self.data.tokens.shape[1]
    longest = int(self.lengths[idx].max())
    return next(b for b in self.buckets if b >= longest)

  def rows(self, idx: np.ndarray, width: int) -> dict[str, np.ndarray]:
    """The arrays of examples `idx`, cut to `width` tokens."""
    d = self.data
    out = {
      "tokens": d.tokens[idx, :width],
      "loss_mask": d.loss_mask[idx, :width],
      "attention_mask": d.attention_mask[idx, :width],
    }
    if d.last_prompt is not None:
      out["last_prompt"] = np.minimum(d.last_prompt[idx], width - 1)
    full = d.tokens.shape[1]
    for k, v in d.fields.items():  # per-token fields are cut to the batch width like the tokens
      out[k] = v[idx, :width] if v.ndim >= 2 and v.shape[1] == full else v[idx]
    return out

  def local_batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's contiguous share of batch `step` (the whole batch in a single process)."""
    idx = self.indices(step)
    per = self.batch_size // jax.process_count()
    # The width comes from the global batch, so every process agrees on the shape.
    return self.rows(idx[jax.process_index() * per : (jax.process_index() + 1) * per], self.width(idx))

  def global_batch(self, step: int, shardings) -> dict[str, jax.Array]:
    idx = self.indices(step)
    width = self.width(idx)
    return global_arrays(lambda positions: self.rows(idx[positions], width), len(idx), shardings)


def global_arrays(take, n: int, shardings) -> dict:
  """A global batch of n rows, `take(positions) -> {name: array}` giving any of its rows.

  Each process reads only the rows its own devices hold, whatever the mesh layout: a contiguous
  block when the batch is split over every process, the whole batch when it is replicated over
  them (e.g. a tensor axis spanning hosts). `shardings` is one sharding or a matching dict.
  """
  template = take(np.arange(0))  # no rows: the names, trailing shapes and dtypes
  if not isinstance(shardings, dict):
    shardings = dict.fromkeys(template, shardings)
  cache: dict = {}

  def rows_for(index):  # one take() per distinct row block, shared by every array and device
    key = (index.start, index.stop, index.step)
    if key not in cache:
      cache[key] = take(np.arange(n)[index])
    return cache[key]

  def build(name):
    shape = (n, *template[name].shape[1:])
    return jax.make_array_from_callback(
      shape, shardings[name], lambda index: rows_for(index[0])[name][(slice(None), *index[1:])]
    )

  return {name: build(name) for name in template}


class MixedBatcher:
  """Several data sets per step, e.g. {"user": ..., "align": ...} for a distillation step; batch k
  is {name: batcher_name's batch k}."""

  def __init__(self, parts: dict[str, Batcher]):
    self.parts = parts
    self.batch_size = sum(b.batch_size for b in parts.values())

  def local_batch(self, step: int) -> dict:
    return {k: b.local_batch(step) for k, b in self.parts.items()}

  def global_batch(self, step: int, shardings) -> dict:
    return {
      k: b.global_batch(step, shardings[k] if isinstance(shardings, dict) else shardings) for k, b in self.parts.items()
    }
