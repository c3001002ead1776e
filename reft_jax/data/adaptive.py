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

guard="target" aims the same attack at a *generating* guard instead (defences/guardrail.py with
judge=refusal: the aligned model answers each uploaded prompt and a refusal flags it): the guard term is then
GCG's target loss, the guard's mean CE of the harmful example's first `target_tokens` response tokens
("Sure, here is ...") given the optimised prompt, on the guard model passed as `teacher`. Lower makes the
guard start the harmful answer instead of a refusal; r, layer and tau are unused.

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
import math

import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from tqdm.auto import tqdm

from reft_jax.data import sft
from reft_jax.data.adaptive_objective import (  # noqa: F401  (the objective's public functions, re-exported)
  LORA_PARAMS,
  QKV_KERNELS,
  filter_loss,
  filter_scores,
  gradient_similarities,
  gradient_similarity_loss,
  lm_gradient,
  flat_params,
  kernels,
  one_hot_gradient,
  split_trainable,
  target_loss,
  target_losses,
  trainable_names,
)

MODES = ("suffix", "prompt")
GUARDS = ("feature", "target")  # ReFT's refusal-feature filter, or a generating guard's target CE
_MARK = "\u2063ADVSLOTS\u2063"  # where the slots go in the rendered template (an invisible separator around it)


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
  guard: str = "feature"  # what the guard term reads: "feature" (the filter's cosine) or "target" (see above)
  target_tokens: int = 8  # guard="target": the response tokens whose CE on the guard is the guard term
  template: str = "alpaca"  # data.template
  seq_len: int = 256  # data.seq_len

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"adaptive mode={self.mode!r} must be one of {MODES}")
    if not 0 <= self.lam <= 1:
      raise ValueError(f"adaptive lam={self.lam} must lie in [0, 1] (Virus: lam * filter + (1 - lam) * similarity)")
    if self.guard not in GUARDS:
      raise ValueError(f"adaptive guard={self.guard!r} must be one of {GUARDS}")
    if self.guard == "target" and (self.margin is not None or self.target_tokens < 1):
      raise ValueError("adaptive guard='target' takes target_tokens >= 1 and no margin (the hinge is the cosine's)")
    if self.steps < 0 or self.suffix_len < 1 or self.topk < 1 or self.batch < 1 or self.chunk < 1:
      raise ValueError("adaptive steps >= 0, suffix_len, topk, batch and chunk >= 1 are required")


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


@dataclasses.dataclass
class _Objective:
  """The compiled objective of one attack: constants, kernels and the jnp scalars they take."""

  consts: tuple
  token_grad: object
  evaluate: object
  r: object
  threshold: object
  lam: object
  allowed: object
  student: object
  names: tuple

  def similarity_loss(self, g0, full) -> float:  # one (tokens, mask, loss mask), no second order
    tf, mf, lf = (a[None] for a in full)
    return float(gradient_similarity_loss(self.student, tf, mf, lf, g0, self.names)[0])


def _objective(teacher, student, r, layer: int, tau: float, c: AttackConfig, allowed: np.ndarray) -> _Objective:
  t_graph, t_flat = flat_params(teacher)
  names = trainable_names(student, c.trainable)
  s_graph, frozen, train = split_trainable(student, names)
  scales = tuple(math.sqrt(m.cfg.hidden_size) if m.cfg.scale_embeddings else 1.0 for m in (teacher, student))
  target_k = c.target_tokens if c.guard == "target" else 0
  token_grad, evaluate = kernels(
    t_graph, s_graph, layer, c.lam > 0, c.lam < 1, c.margin is not None, c.chunk, scales, target_k
  )
  return _Objective(
    consts=(traverse_util.unflatten_dict(t_flat, sep="/"), frozen, train),
    token_grad=token_grad,
    evaluate=evaluate,
    r=jnp.asarray(np.zeros(1) if r is None else r, jnp.float32),
    threshold=jnp.float32(tau - (c.margin or 0.0)),
    lam=jnp.float32(c.lam),
    allowed=jnp.asarray(allowed),
    student=student,
    names=names,
  )


def _gcg(ob: _Objective, lay: _Layout, g0, tokenizer, c: AttackConfig, rng, log=None, index: int = 0):
  """GCG on one example's slots for c.steps steps: (final slots, one history row per step 0..steps)."""
  slots = np.asarray(lay.init, np.int32)
  s, k = len(slots), min(c.topk, int(np.asarray(ob.allowed).sum()))
  n_k = jnp.zeros((s, k), jnp.int32)  # carries the static shape (S, K) into token_grad
  rows, score = [], "target_ce" if c.guard == "target" else "cos"
  for step in range(c.steps + 1):
    prompt, full, start = _arrays(lay, slots, c.seq_len)
    arrays = tuple(jnp.asarray(a) for a in (*prompt, *full, start))
    cands = np.repeat(slots[None], c.batch + 1, axis=0)  # row 0: the current prompt, always a candidate
    if step > 0:
      top = np.asarray(ob.token_grad(*ob.consts, g0, ob.r, ob.threshold, ob.lam, ob.allowed, *arrays, n_k)[0])
      # Virus's get_resample_ids: distinct (slot, top-k rank) pairs, each one single-token substitution.
      pairs = rng.choice(s * k, size=min(c.batch, s * k), replace=False)
      cands[1 + np.arange(len(pairs)), pairs // k] = top[pairs // k, pairs % k]
    f, cos, sim = (np.asarray(x) for x in ob.evaluate(*ob.consts, g0, ob.r, ob.threshold, *arrays, jnp.asarray(cands)))
    total = c.lam * f + (1 - c.lam) * sim
    ok = _round_trips(lay, tokenizer, c.template, cands) if step > 0 else np.ones(len(cands), bool)
    ok[0] = True
    best = int(np.argmin(np.where(ok, total, np.inf)))  # ties keep the current prompt (row 0)
    slots = cands[best]
    sim_best = float(sim[best]) if c.lam < 1 else ob.similarity_loss(g0, _arrays(lay, slots, c.seq_len)[1])
    rows.append(
      dict(
        step=step,
        objective=float(c.lam * f[best] + (1 - c.lam) * sim_best),
        filter=float(f[best]),
        **{score: float(cos[best])},
        gradient_similarity=1.0 - sim_best,
        slots=slots.tolist(),
        changed=bool(step > 0 and not np.array_equal(cands[best], cands[0])),
      )
    )
    if log and step:
      log(f"adaptive: example {index} step {step}: objective {rows[-1]['objective']:.4f} {score} {cos[best]:.4f}")
  return slots, rows


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
  progress: bool = False,
) -> AttackResult:
  """Virus-style GCG on each harmful example's prompt (meta['is_harmful']; all examples with
  only_harmful=False) against the filter (teacher, r, layer, tau; with config.guard="target", teacher is the
  generating guard and r, layer, tau are unused) and the base model `student` (the gradient similarity).
  Returns the AttackResult; each attacked example's meta gains adaptive=True, adaptive_steps, adaptive_mode,
  adaptive_lam, adaptive_text (the optimised slots' text), filter_score_before / filter_score_after (the
  filter's score of the original / optimised prompt, re-tokenized as the filter does; guard="target":
  target_ce_before / target_ce_after, the guard's target CE), gradient_similarity (cos of the optimised
  example's LM gradient with the original's) and retokenized_exact (the optimised tokens are exactly what the
  filter reads). Response and is_harmful stay. progress: a bar over the attacked examples."""
  c = config
  allowed = allowed_tokens(tokenizer, min(teacher.cfg.vocab_size, student.cfg.vocab_size))
  ob = _objective(teacher, student, r, layer, tau, c, allowed)
  picked = [i for i, e in enumerate(examples) if e.meta.get("is_harmful") or not only_harmful]
  out, history, layouts = list(examples), [None] * len(examples), [None] * len(examples)
  for i in tqdm(picked, disable=not progress, desc=f"adaptive ({c.guard})"):
    ex = examples[i]
    lay = _layout(ex, tokenizer, c, allowed)
    if not lay.init or len(lay.prompt_ids(lay.init)) >= c.seq_len:
      if log:
        log(f"adaptive: example {i} skipped (its prompt with slots does not fit seq_len={c.seq_len})")
      out[i] = dataclasses.replace(ex, meta={**ex.meta, "adaptive": False, "adaptive_skipped": "too long"})
      continue
    orig = sft.tokenize([ex], tokenizer, c.seq_len, c.template).trimmed(16)
    g0 = lm_gradient(student, orig.tokens[0], orig.attention_mask[0], orig.loss_mask[0], ob.names)
    slots, history[i] = _gcg(ob, lay, g0, tokenizer, c, np.random.default_rng([seed, i]), log, i)
    layouts[i] = lay
    new = lay.example(tokenizer, slots)
    rendered = _encode_prompts(tokenizer, [sft.format_prompt(new, c.template, tokenizer)])[0]
    meta = {
      **ex.meta,
      "adaptive": True,
      "adaptive_steps": c.steps,
      "adaptive_mode": c.mode,
      "adaptive_lam": c.lam,
      "adaptive_text": lay.text(tokenizer, slots),
      "retokenized_exact": rendered == lay.prompt_ids(slots),
    }
    out[i] = dataclasses.replace(new, meta=meta)
  done = [i for i in picked if history[i] is not None]
  _score(out, examples, done, teacher, student, r, layer, tokenizer, c, ob.names)
  return AttackResult(out, history, c, layouts, tokenizer)


def _score(out, examples, done, teacher, student, r, layer, tokenizer, c: AttackConfig, names) -> None:
  """Adds filter_score_before/after and gradient_similarity to the attacked examples' meta (in place)."""
  if not done:
    return
  if c.guard == "target":
    score = lambda exs: target_losses(teacher, exs, tokenizer, c.seq_len, c.template, c.target_tokens)
    key = "target_ce"
  else:
    score = lambda exs: filter_scores(teacher, r, layer, exs, tokenizer, c.seq_len, c.template)
    key = "filter_score"
  before, after = score([examples[i] for i in done]), score([out[i] for i in done])
  sims = gradient_similarities(
    student, [out[i] for i in done], [examples[i] for i in done], tokenizer, c.seq_len, c.template, names
  )
  for j, i in enumerate(done):
    out[i].meta.update(
      {f"{key}_before": float(before[j]), f"{key}_after": float(after[j]), "gradient_similarity": float(sims[j])}
    )
