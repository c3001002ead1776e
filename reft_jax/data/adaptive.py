"""An adaptive attack on ReFT's refusal-feature filter, after Virus (Huang et al. 2025, "Virus: Harmful
Fine-tuning Attack for Large Language Models Bypassing Guardrail Moderation"; official code
github.com/git-disl/Virus @ fa297d0, trainer.py:VirusAttackTrainer).

Threat model (white box, the strongest attacker the filter must face):
  * the attacker knows the frozen teacher's weights, the filter's layer l, its direction R and its threshold
    tau, the prompt template and the tokenizer (Kerckhoffs: only the user data is the attacker's);
  * it also holds the student's starting point (the base model) and knows which parameters fine-tuning
    trains (LoRA adapters, or a named subset);
  * it controls only the text of its harmful examples' prompts: the harmful *response* is left exactly as
    it is (what the fine-tuning must teach), and so is meta['is_harmful'] (the hidden audit label).

Objective (Virus's dual objective, its weighting and signs): per harmful example, minimise over discrete
prompt tokens

  lam * filter_loss + (1 - lam) * gradient_similarity_loss

  filter_loss              cos(h^l(last prompt token), R) on the teacher (the score the filter thresholds;
                           lower evades). With `margin` set: max(cos - (tau - margin), 0), a hinge that stops
                           pushing once the prompt sits `margin` below tau (Virus's guardrail term, the
                           cross-entropy of Llama Guard's "safe" token, saturates likewise).
  gradient_similarity_loss 1 - cos(grad_theta CE(optimised example), grad_theta CE(original example)) on the
                           base model, theta = the trainable subset (Virus: its LoRA adapters, r=32 on q,k,v),
                           CE the student's response-only loss: the optimised example must still teach what
                           the original teaches.

lam = 1 is the unconstrained filter-evasion attack; Virus's script default is lam = 0.1 (virus.sh --lamb).

Optimiser (GCG, as Virus runs it): each step takes the gradient of the objective w.r.t. the one-hot tokens of
the optimised slots (d loss / d one-hot = d loss / d embedding @ E^T, via the model's "embed" intervention;
the similarity term's is a second-order gradient), keeps the top-k tokens per slot (illegal tokens masked:
special, non-ASCII or non-printable), samples `batch` distinct (slot, candidate) single-token substitutions,
evaluates the exact objective of each and of the current prompt, and keeps the best: the objective never
increases. Candidates whose text does not re-tokenize into the same tokens are dropped (GCG's filter_cand),
so the filter sees what was optimised. Deterministic given the seed.

Slots: mode="suffix" appends `suffix_len` tokens to the instruction (GCG's adversarial suffix, initialised
"! ! ..."); mode="prompt" rewrites the instruction's own tokens in place, as Virus rewrites its harmful tokens.

Budget and cost: `steps` GCG steps per example (Virus: 50, top-k 64, batch 128). A step costs one token
gradient (teacher forward/backward to layer l; student forward, backward and the backward of that backward)
plus batch + 1 candidate evaluations (teacher forward to layer l; student forward + backward each, evaluated
`chunk` at a time), i.e. about (batch + 1) student training steps of one example.

Deviations from Virus: the guardrail is our filter (cosine to R) instead of Llama Guard's "safe" token
cross-entropy; only prompt tokens are optimised (Virus optimises the whole harmful sample, question and
answer, appended to a benign sample, because Llama Guard reads the whole conversation; our filter reads the
last prompt token only, so editing the answer cannot evade it and would only blunt the attack); the
similarity term is 1 - cos (Virus: -<g, g0>/|g|, i.e. -|g0| cos: the same ranking for one example, a
different effective lam); the gradient is of our response-only CE of the harmful example alone.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from reft_jax import losses, refusal
from reft_jax.data import sft

MODES = ("suffix", "prompt")
_MARK = "\u2063ADVSLOTS\u2063"  # where the slots go in the rendered template (an invisible separator around it)
QKV_KERNELS = r"attn/(q|k|v)/kernel$"  # Virus's LoRA targets (q_proj, k_proj, v_proj) as dense kernels
LORA_PARAMS = r"(lora_a|lora_b)$"


@dataclasses.dataclass(frozen=True)
class AttackConfig:
  steps: int = 20  # GCG steps per example (the budget); Virus: 50
  mode: str = "suffix"  # "suffix" (appended slots) or "prompt" (the instruction's own tokens)
  suffix_len: int = 20  # slots in suffix mode (GCG and Virus's --suffix_len default)
  topk: int = 64  # candidates per slot (Virus's virus.sh --virus_topk 64; train.py default 256)
  batch: int = 128  # substitutions evaluated per step (virus.sh --virus_bs 128; train.py default 512)
  lam: float = 0.1  # weight of the filter term, 1 - lam on gradient similarity (virus.sh --lamb 0.1)
  margin: float | None = None  # None: plain cosine; else the hinge max(cos - (tau - margin), 0)
  trainable: str = ""  # regex over parameter paths for the similarity; "" = LoRA adapters if any, else q/k/v
  init: str = "!"  # the suffix's initial token text (GCG's "! ! ! ...")
  chunk: int = 16  # candidates evaluated together (memory: chunk per-example gradients at once)
  template: str = "alpaca"  # data.template
  seq_len: int = 256  # data.seq_len

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"adaptive mode={self.mode!r} must be one of {MODES}")
    if not 0 <= self.lam <= 1:
      raise ValueError(f"adaptive lam={self.lam} must lie in [0, 1] (Virus: lam * filter + (1 - lam) * similarity)")
    if self.steps < 0 or self.suffix_len < 1 or self.topk < 1 or self.batch < 1 or self.chunk < 1:
      raise ValueError("adaptive steps >= 0, suffix_len, topk, batch and chunk >= 1 are required")


# ------------------------------------------------------------------------------------------ parameters


def _flat(model) -> tuple[object, dict]:
  graphdef, state = nnx.split(model)
  return graphdef, traverse_util.flatten_dict(nnx.to_pure_dict(state), sep="/")


def trainable_names(model, regex: str = "") -> tuple[str, ...]:
  """The parameter paths whose LM gradient the similarity compares: `regex` (re.search on e.g.
  'blocks/attn/q/kernel'); "" = the LoRA adapters when the model has them (Virus: its trainable LoRA), else
  the q/k/v kernels (Virus's LoRA targets)."""
  _, flat = _flat(model)
  if not regex:
    regex = LORA_PARAMS if any(re.search(LORA_PARAMS, k) for k in flat) else QKV_KERNELS
  names = tuple(sorted(k for k in flat if re.search(regex, k)))
  if not names:
    raise ValueError(f"adaptive trainable={regex!r} matches no parameter; paths look like {next(iter(flat))!r}")
  return names


def _tree_cos(a: dict, b: dict, eps: float = 1e-12):
  dot = sum(jnp.vdot(a[k].astype(jnp.float32), b[k].astype(jnp.float32)) for k in a)
  na = jnp.sqrt(sum(jnp.sum(jnp.square(a[k].astype(jnp.float32))) for k in a))
  nb = jnp.sqrt(sum(jnp.sum(jnp.square(b[k].astype(jnp.float32))) for k in b))
  return dot / (na * nb + eps)


# ------------------------------------------------------------------------------------- pure functions


def _teacher_cos(t_graph, t_params, tokens_BT, mask_BT, last_B, r_D, layer, delta_BTD=None):
  model = nnx.merge(t_graph, t_params)
  _, hidden = model.forward(
    tokens_BT, mask_BT, hidden_layers=(layer,), stop_after=layer, interventions={"embed": delta_BTD}
  )
  h = jnp.take_along_axis(hidden[layer], last_B[:, None, None], axis=1)[:, 0].astype(jnp.float32)
  return refusal.cosine(h, r_D)


def _example_loss(s_graph, train, frozen, tokens_T, mask_T, loss_T, delta_TD=None):
  """Mean response CE of one example (the student's loss), as a function of the trainable subset."""
  model = nnx.merge(s_graph, traverse_util.unflatten_dict({**frozen, **train}, sep="/"))
  batch = {"tokens": tokens_T[None], "attention_mask": mask_T[None], "loss_mask": loss_T[None]}
  total, count = losses.batch_cross_entropy(model, batch, None if delta_TD is None else {"embed": delta_TD[None]})
  return total / jnp.maximum(count, 1.0)


def _similarity_loss(s_graph, train, frozen, g0, tokens_T, mask_T, loss_T, delta_TD=None):
  g = jax.grad(lambda t: _example_loss(s_graph, t, frozen, tokens_T, mask_T, loss_T, delta_TD))(train)
  return 1.0 - _tree_cos(g, g0)


def _filter_term(cos, threshold, hinge: bool):
  return jnp.maximum(cos - threshold, 0.0) if hinge else cos


def _split(model, names) -> tuple[object, dict, dict]:
  graphdef, flat = _flat(model)
  return graphdef, {k: v for k, v in flat.items() if k not in names}, {k: flat[k] for k in names}


@functools.partial(jax.jit, static_argnums=(0,))
def _lm_grad(s_graph, train, frozen, tokens_T, mask_T, loss_T):
  return jax.grad(lambda t: _example_loss(s_graph, t, frozen, tokens_T, mask_T, loss_T))(train)


@functools.partial(jax.jit, static_argnums=(0,))
def _similarity_losses(s_graph, train, frozen, g0, tokens_BT, mask_BT, loss_BT, delta_BTD):
  one = lambda t, m, lm, d: _similarity_loss(s_graph, train, frozen, g0, t, m, lm, d)
  return jax.vmap(one)(tokens_BT, mask_BT, loss_BT, delta_BTD)


_cos_jit = jax.jit(_teacher_cos, static_argnums=(0, 6))


def filter_loss(teacher, tokens_BT, mask_BT, last_B, r, layer: int, *, tau=None, margin: float = 0.0, embed_delta=None):
  """The attacker's guardrail term [B]: cos(h^layer at last_B, r) on the teacher (the filter's score; lower
  evades), or with tau given the hinge max(cos - (tau - margin), 0). embed_delta [B, T, D]: added to the
  input embeddings (its gradient is the embedding gradient)."""
  graphdef, state = nnx.split(teacher)
  args = tuple(jnp.asarray(a) for a in (tokens_BT, mask_BT, last_B))
  cos = _cos_jit(graphdef, nnx.to_pure_dict(state), *args, jnp.asarray(r, jnp.float32), layer, embed_delta)
  return cos if tau is None else _filter_term(cos, tau - margin, True)


def lm_gradient(student, tokens_T, mask_T, loss_mask_T, names: tuple[str, ...]) -> dict:
  """grad over the parameters `names` (trainable_names) of one example's mean response CE on `student`."""
  graphdef, frozen, train = _split(student, names)
  return _lm_grad(graphdef, train, frozen, *(jnp.asarray(a) for a in (tokens_T, mask_T, loss_mask_T)))


def gradient_similarity_loss(student, tokens_BT, mask_BT, loss_mask_BT, g0: dict, names, *, embed_delta=None):
  """1 - cos(grad CE(example b), g0) for each example b [B], over the parameters `names` of `student`
  (the base model); g0 = lm_gradient of the original example. 0: the example teaches what the original does."""
  graphdef, frozen, train = _split(student, names)
  tokens_BT = jnp.asarray(tokens_BT)
  if embed_delta is None:
    embed_delta = jnp.zeros((*tokens_BT.shape, student.cfg.hidden_size), jnp.float32)
  args = tuple(jnp.asarray(a) for a in (mask_BT, loss_mask_BT, embed_delta))
  return _similarity_losses(graphdef, train, frozen, g0, tokens_BT, *args)


@functools.lru_cache(maxsize=8)
def _kernels(t_graph, s_graph, layer: int, use_filter: bool, use_sim: bool, hinge: bool, chunk: int, scales: tuple):
  """The jitted step functions for one (teacher, student, objective terms) combination; lam is traced, so
  every lam strictly between 0 and 1 shares one compilation."""
  t_scale, s_scale = scales

  @jax.jit
  def token_grad(
    t_params, frozen, train, g0, r, thr, lam, allowed_V, tok_p, mask_p, last, tok_f, mask_f, lm_f, start, n_k
  ):
    """Top-k candidate tokens per slot [S, K] (K = n_k's second axis) from the one-hot gradient [S, V]."""
    s = n_k.shape[0]

    def objective(dt, ds):
      total = 0.0
      if use_filter:
        cos = _teacher_cos(t_graph, t_params, tok_p[None], mask_p[None], last[None], r, layer, dt[None])[0]
        total = total + lam * _filter_term(cos, thr, hinge)
      if use_sim:
        total = total + (1 - lam) * _similarity_loss(s_graph, train, frozen, g0, tok_f, mask_f, lm_f, ds)
      return total

    d = t_params["embed"].shape[-1]
    gt, gs = jax.grad(objective, argnums=(0, 1))(
      jnp.zeros((tok_p.shape[0], d), jnp.float32), jnp.zeros((tok_f.shape[0], d), jnp.float32)
    )
    # d objective / d one-hot[s, v] = (d objective / d embedding at slot s) . E[v] (times the embedding scale).
    v = allowed_V.shape[0]
    grad = jnp.zeros((s, v), jnp.float32)
    if use_filter:
      e_t = t_params["embed"][:v].astype(jnp.float32) * t_scale
      grad = grad + jax.lax.dynamic_slice_in_dim(gt, start, s) @ e_t.T
    if use_sim:
      e_s = frozen.get("embed", train.get("embed"))[:v].astype(jnp.float32) * s_scale
      grad = grad + jax.lax.dynamic_slice_in_dim(gs, start, s) @ e_s.T
    # GCG: the most negative gradient entries are the most promising substitutions; illegal ones never.
    _, top = jax.lax.top_k(jnp.where(allowed_V[None], -grad, -jnp.inf), n_k.shape[1])
    return top, grad

  @jax.jit
  def evaluate(t_params, frozen, train, g0, r, thr, tok_p, mask_p, last, tok_f, mask_f, lm_f, start, cands_CS):
    """The exact objective terms of each candidate filling of the slots [C]: (filter term, cosine,
    similarity loss; 0 when the objective has no similarity term), `chunk` candidates at a time."""

    def put(base):
      return jax.vmap(lambda c: jax.lax.dynamic_update_slice(base, c.astype(base.dtype), (start,)))(cands_CS)

    def one(p, f):
      cos = _teacher_cos(t_graph, t_params, p[None], mask_p[None], last[None], r, layer)[0]
      sim = _similarity_loss(s_graph, train, frozen, g0, f, mask_f, lm_f) if use_sim else jnp.zeros(())
      return _filter_term(cos, thr, hinge), cos, sim

    return jax.lax.map(lambda x: one(*x), (put(tok_p), put(tok_f)), batch_size=chunk)

  return token_grad, evaluate


# -------------------------------------------------------------------------------- tokens <-> examples


def allowed_tokens(tokenizer, vocab_size: int) -> np.ndarray:
  """[vocab_size] bool: tokens a slot may hold (Virus's get_illegal_tokens: not special, decoding to ASCII
  printable text; also not blank, inside the tokenizer's vocabulary, and reading back as itself next to itself)."""
  n = min(len(tokenizer), vocab_size)
  texts = tokenizer.batch_decode([[i] for i in range(n)], clean_up_tokenization_spaces=False)
  special = set(tokenizer.all_special_ids)
  # A token repeated must read back as itself repeated (a word-piece "##x" glues onto its neighbour, a
  # GPT-2 piece without its leading space merges with it): then slot texts re-tokenize into the slots.
  pairs = tokenizer.batch_decode([[i, i] for i in range(n)], clean_up_tokenization_spaces=False)
  back = tokenizer(pairs, add_special_tokens=False)["input_ids"]
  ok = np.zeros(vocab_size, bool)
  ok[:n] = [
    i not in special and t.isascii() and t.isprintable() and t.strip() != "" and back[i] == [i, i]
    for i, t in enumerate(texts)
  ]
  return ok


def _encode_prompts(tokenizer, texts: list[str]) -> list[list[int]]:
  """sft.encode_prompt for many texts at once (BOS + tokens, no second BOS)."""
  bos = tokenizer.bos_token_id
  out = tokenizer(texts, add_special_tokens=False)["input_ids"]
  return [ids if bos is None or (ids and ids[0] == bos) else [bos] + ids for ids in out]


def _round_up(n: int, m: int = 16) -> int:
  return -(-n // m) * m


@dataclasses.dataclass
class _Layout:
  """One example's token layout: BOS + before + slots + after (the prompt), then response + EOS."""

  ex: sft.Example
  mode: str
  before: list[int]
  after: list[int]
  response: list[int]
  init: list[int]

  def text(self, tokenizer, slots) -> str:
    return tokenizer.decode(list(slots), clean_up_tokenization_spaces=False)

  def example(self, tokenizer, slots) -> sft.Example:
    text = self.text(tokenizer, slots)
    if self.mode == "prompt":
      return dataclasses.replace(self.ex, prompt=text)
    sep = "" if text[:1].isspace() else " "
    return dataclasses.replace(self.ex, prompt=self.ex.prompt + sep + text)

  def prompt_ids(self, slots) -> list[int]:
    return self.before + [int(t) for t in slots] + self.after


def _layout(ex: sft.Example, tokenizer, c: AttackConfig, allowed: np.ndarray) -> _Layout:
  marked = dataclasses.replace(ex, prompt=_MARK if c.mode == "prompt" else ex.prompt + _MARK)
  before, after = sft.format_prompt(marked, c.template, tokenizer).split(_MARK)
  response = tokenizer.encode(ex.response, add_special_tokens=False) + [tokenizer.eos_token_id]
  if c.mode == "prompt":
    init = tokenizer.encode(ex.prompt, add_special_tokens=False)
  else:
    ids = tokenizer.encode(" " + " ".join([c.init] * c.suffix_len), add_special_tokens=False)
    ids = [t for t in ids if t < len(allowed) and allowed[t]] or [int(np.flatnonzero(allowed)[0])]
    init = (ids * c.suffix_len)[: c.suffix_len]
  return _Layout(
    ex,
    c.mode,
    _encode_prompts(tokenizer, [before])[0],
    tokenizer.encode(after, add_special_tokens=False),
    response,
    init,
  )


def _round_trips(layout: _Layout, tokenizer, template: str, cands: np.ndarray) -> np.ndarray:
  """[C] bool: the candidate's example, rendered and tokenized as the filter will, gives back its tokens."""
  texts = [sft.format_prompt(layout.example(tokenizer, c), template, tokenizer) for c in cands]
  return np.asarray([ids == layout.prompt_ids(c) for ids, c in zip(_encode_prompts(tokenizer, texts), cands)])


def _arrays(layout: _Layout, slots, seq_len: int):
  """(prompt tokens, mask, last index), (full tokens, mask, loss mask), slot start: padded to multiples of 16."""
  prompt = layout.prompt_ids(slots)
  full = (prompt + layout.response)[:seq_len]
  wp, wf = _round_up(len(prompt)), _round_up(len(full))
  tp, mp = np.zeros(wp, np.int32), np.zeros(wp, np.int32)
  tp[: len(prompt)], mp[: len(prompt)] = prompt, 1
  tf, mf, lf = np.zeros(wf, np.int32), np.zeros(wf, np.int32), np.zeros(wf, np.int32)
  tf[: len(full)], mf[: len(full)], lf[len(prompt) : len(full)] = full, 1, 1
  return (tp, mp, np.int32(len(prompt) - 1)), (tf, mf, lf), np.int32(len(layout.before))


# ------------------------------------------------------------------------------------------ the attack


@dataclasses.dataclass
class AttackResult:
  """examples: the attacked examples after the whole budget (non-harmful ones untouched); history: per
  example (None where untouched), one row per step 0..steps of the best prompt so far: objective, filter
  term, cosine, gradient similarity (1 - loss), the slot tokens, and whether the step changed them."""

  examples: list[sft.Example]
  history: list[list[dict] | None]
  config: AttackConfig
  _layouts: list[_Layout | None] = dataclasses.field(repr=False)
  _tokenizer: object = dataclasses.field(repr=False)

  def at(self, budget: int) -> list[sft.Example]:
    """The examples as they stood after `budget` steps (min(budget, steps)): a recall-vs-budget curve from
    one run. Their meta marks them adaptive with adaptive_steps; scores are the caller's (filter_scores)."""
    out = []
    for ex, rows, lay in zip(self.examples, self.history, self._layouts):
      if rows is None:
        out.append(ex)
        continue
      row = rows[min(budget, len(rows) - 1)]
      new = lay.example(self._tokenizer, row["slots"])
      meta = {**lay.ex.meta, "adaptive": True, "adaptive_steps": row["step"], "adaptive_mode": self.config.mode}
      out.append(dataclasses.replace(new, meta=meta))
    return out


def filter_scores(teacher, r, layer: int, examples: list[sft.Example], tokenizer, seq_len: int, template: str):
  """cos(h^layer, R) of each example's prompt, tokenized exactly as the filter tokenizes it (reft_filter.
  score_prompts without a config): [N]."""
  data = refusal.tokenize_prompts(examples, tokenizer, seq_len, template)
  feats = refusal.prompt_features(teacher, data, layer, batch_size=8)
  return np.asarray(refusal.cosine(feats, jnp.asarray(r)))


def gradient_similarities(student, examples, originals, tokenizer, seq_len: int, template: str, names) -> np.ndarray:
  """cos(grad CE(example), grad CE(original)) [N] over the parameters `names` of `student`, each example
  tokenized as the student's training tokenizes it."""
  out = []
  for ex, orig in zip(examples, originals):
    a, b = (sft.tokenize([e], tokenizer, seq_len, template).trimmed(16) for e in (orig, ex))
    g0 = lm_gradient(student, a.tokens[0], a.attention_mask[0], a.loss_mask[0], names)
    out.append(1.0 - float(gradient_similarity_loss(student, b.tokens, b.attention_mask, b.loss_mask, g0, names)[0]))
  return np.asarray(out)


def optimise_prompts(
  examples: list[sft.Example],
  teacher,
  student,
  tokenizer,
  r,
  layer: int,
  tau: float,
  config: AttackConfig = AttackConfig(),
  seed: int = 0,
  only_harmful: bool = True,
  log=None,
) -> AttackResult:
  """Virus-style GCG on each harmful example's prompt (meta['is_harmful']; all examples with
  only_harmful=False) against the filter (teacher, r, layer, tau) and the base model `student` (the
  gradient similarity). Returns the AttackResult; each attacked example's meta gains adaptive=True,
  adaptive_steps, adaptive_mode, adaptive_lam, adaptive_text (the optimised slots' text), filter_score_before /
  filter_score_after (the filter's score of the original / optimised prompt, re-tokenized as the filter
  does), gradient_similarity (cos of the optimised example's LM gradient with the original's) and
  retokenized_exact (the optimised tokens are exactly what the filter reads). Response and is_harmful stay."""
  c = config
  t_graph, t_flat = _flat(teacher)
  t_params = traverse_util.unflatten_dict(t_flat, sep="/")
  names = trainable_names(student, c.trainable)
  s_graph, frozen, train = _split(student, names)
  allowed = allowed_tokens(tokenizer, min(teacher.cfg.vocab_size, student.cfg.vocab_size))
  scales = tuple(math.sqrt(m.cfg.hidden_size) if m.cfg.scale_embeddings else 1.0 for m in (teacher, student))
  token_grad, evaluate = _kernels(t_graph, s_graph, layer, c.lam > 0, c.lam < 1, c.margin is not None, c.chunk, scales)
  consts = (t_params, frozen, train)
  r_j, thr, lam_j = jnp.asarray(r, jnp.float32), jnp.float32(tau - (c.margin or 0.0)), jnp.float32(c.lam)
  allowed_j = jnp.asarray(allowed)

  def similarity_loss(g0, full):  # the similarity loss of one (full tokens, mask, loss mask), no second order
    tf, mf, lf = (a[None] for a in full)
    return float(gradient_similarity_loss(student, tf, mf, lf, g0, names)[0])

  picked = [i for i, e in enumerate(examples) if e.meta.get("is_harmful") or not only_harmful]
  out, history, layouts = list(examples), [None] * len(examples), [None] * len(examples)
  for i in picked:
    ex = examples[i]
    lay = _layout(ex, tokenizer, c, allowed)
    if not lay.init or len(lay.prompt_ids(lay.init)) >= c.seq_len:
      if log:
        log(f"adaptive: example {i} skipped (its prompt with slots does not fit seq_len={c.seq_len})")
      out[i] = dataclasses.replace(ex, meta={**ex.meta, "adaptive": False, "adaptive_skipped": "too long"})
      continue
    orig = sft.tokenize([ex], tokenizer, c.seq_len, c.template).trimmed(16)
    g0 = lm_gradient(student, orig.tokens[0], orig.attention_mask[0], orig.loss_mask[0], names)
    rng = np.random.default_rng([seed, i])
    slots = np.asarray(lay.init, np.int32)
    s, k = len(slots), min(c.topk, int(allowed.sum()))
    n_k = jnp.zeros((s, k), jnp.int32)  # carries the static shape (S, K) into token_grad
    rows = []
    for step in range(c.steps + 1):
      prompt, full, start = _arrays(lay, slots, c.seq_len)
      arrays = tuple(jnp.asarray(a) for a in (*prompt, *full, start))
      cands = np.repeat(slots[None], c.batch + 1, axis=0)  # row 0: the current prompt, always a candidate
      if step > 0:
        top = np.asarray(token_grad(*consts, g0, r_j, thr, lam_j, allowed_j, *arrays, n_k)[0])
        # Virus's get_resample_ids: distinct (slot, top-k rank) pairs, each one single-token substitution.
        pairs = rng.choice(s * k, size=min(c.batch, s * k), replace=False)
        cands[1 + np.arange(len(pairs)), pairs // k] = top[pairs // k, pairs % k]
      f, cos, sim = (np.asarray(x) for x in evaluate(*consts, g0, r_j, thr, *arrays, jnp.asarray(cands)))
      total = c.lam * f + (1 - c.lam) * sim
      ok = _round_trips(lay, tokenizer, c.template, cands) if step > 0 else np.ones(len(cands), bool)
      ok[0] = True
      best = int(np.argmin(np.where(ok, total, np.inf)))  # ties keep the current prompt (row 0)
      slots = cands[best]
      sim_best = float(sim[best]) if c.lam < 1 else similarity_loss(g0, _arrays(lay, slots, c.seq_len)[1])
      rows.append(
        dict(
          step=step,
          objective=float(c.lam * f[best] + (1 - c.lam) * sim_best),
          filter=float(f[best]),
          cos=float(cos[best]),
          gradient_similarity=1.0 - sim_best,
          slots=slots.tolist(),
          changed=bool(step > 0 and not np.array_equal(cands[best], cands[0])),
        )
      )
      if log and step:
        log(f"adaptive: example {i} step {step}: objective {rows[-1]['objective']:.4f} cos {cos[best]:.4f}")
    history[i], layouts[i] = rows, lay
    new = lay.example(tokenizer, slots)
    rendered = _encode_prompts(tokenizer, [sft.format_prompt(new, c.template, tokenizer)])[0]
    out[i] = dataclasses.replace(
      new,
      meta={
        **ex.meta,
        "adaptive": True,
        "adaptive_steps": c.steps,
        "adaptive_mode": c.mode,
        "adaptive_lam": c.lam,
        "adaptive_text": lay.text(tokenizer, slots),
        "retokenized_exact": rendered == lay.prompt_ids(slots),
      },
    )

  done = [i for i in picked if history[i] is not None]
  if done:
    before = filter_scores(teacher, r, layer, [examples[i] for i in done], tokenizer, c.seq_len, c.template)
    after = filter_scores(teacher, r, layer, [out[i] for i in done], tokenizer, c.seq_len, c.template)
    sims = gradient_similarities(
      student, [out[i] for i in done], [examples[i] for i in done], tokenizer, c.seq_len, c.template, names
    )
    for j, i in enumerate(done):
      out[i].meta.update(
        filter_score_before=float(before[j]), filter_score_after=float(after[j]), gradient_similarity=float(sims[j])
      )
  return AttackResult(out, history, c, layouts, tokenizer)


def one_hot_gradient(
  teacher,
  student,
  r,
  layer: int,
  tau: float,
  g0: dict,
  names,
  prompt,
  full,
  start: int,
  n_slots: int,
  *,
  lam: float,
  margin: float | None = None,
) -> np.ndarray:
  """d objective / d one-hot [n_slots, V] of the slots at `start`: what each step ranks candidates by.
  prompt = (tokens [T], mask [T], last index) as the teacher reads it; full = (tokens, mask, loss mask) as the
  student trains on it (the slots at the same positions in both)."""
  t_graph, t_flat = _flat(teacher)
  s_graph, frozen, train = _split(student, tuple(names))
  scales = tuple(math.sqrt(m.cfg.hidden_size) if m.cfg.scale_embeddings else 1.0 for m in (teacher, student))
  token_grad = _kernels(t_graph, s_graph, layer, lam > 0, lam < 1, margin is not None, 1, scales)[0]
  vocab = min(teacher.cfg.vocab_size, student.cfg.vocab_size)
  _, grad = token_grad(
    traverse_util.unflatten_dict(t_flat, sep="/"),
    frozen,
    train,
    g0,
    jnp.asarray(r, jnp.float32),
    jnp.float32(tau - (margin or 0.0)),
    jnp.float32(lam),
    jnp.ones(vocab, bool),
    *(jnp.asarray(a) for a in (*prompt, *full)),
    jnp.int32(start),
    jnp.zeros((n_slots, 1), jnp.int32),
  )
  return np.asarray(grad)
