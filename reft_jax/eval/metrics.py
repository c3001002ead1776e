"""Finetune Accuracy exactly as the protocol's official scripts score it, and the safety rates.

Three answer-matching rules (`task_correct(..., match=)`; docs/FIDELITY.md has the sources):

  official        git-disl/Vaccine sst2|ag_news|gsm8k/pred_eval.py @ 8937f68, the protocol's FA (default):
                  the answer is the text up to a repeated "### Response:" marker, stripped; SST-2 / AG News:
                  correct if one of the label's two official spellings is a *substring* of it (case-
                  sensitive: "positive"/"Positive", "World"/"world", "Sci/Tech"/"sci", ...); GSM8K:
                  `extract_answer_number` (commas dropped; the first number after the first
                  "The final answer is: ", else the last number; float equality).
  official_exact  the copies in git-disl/Lisa @ 68e3659 and git-disl/Booster @ 6421918: the same, but the
                  stripped answer must *equal* one of the two spellings (GSM8K unchanged).
  word            ours, more lenient on case and stricter on word boundaries: the gold label as a whole
                  word, case-insensitive, anywhere in the raw answer ("nonpositive" is wrong, "POSITIVE"
                  right); GSM8K: the number after the *last* "The final answer is:" (colon, no space
                  needed), else the last number, within 1e-6.
"""

from __future__ import annotations

import math
import re

from reft_jax.data.sources import GSM8K_ANSWER_PREFIX

FA_MATCHES = ("official", "official_exact", "word")
DEFAULT_FA_MATCH = "official"

# The official scripts decode prompt + generation and keep `.split("### Response:")[1].strip()`: the
# generation up to the next "### Response:" a rambling model may emit, stripped.
RESPONSE_MARKER = "### Response:"

# pred_eval.py's (label1, label2) per gold label; other labels: the label, lower-cased and capitalised.
OFFICIAL_SPELLINGS = {
  "negative": ("negative", "Negative"),
  "positive": ("positive", "Positive"),  # sst2/pred_eval.py
  "world": ("World", "world"),
  "sports": ("Sports", "sports"),  # ag_news/pred_eval.py
  "business": ("Business", "business"),
  "sci/tech": ("Sci/Tech", "sci"),
}

# gsm8k/pred_eval.py: ANSWER_PROMPT (with its trailing space) and the number pattern.
OFFICIAL_ANSWER_PROMPT = GSM8K_ANSWER_PREFIX + " "
_OFFICIAL_NUMBER = re.compile(r"-?\d+\.?\d*")

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


# ------------------------------------------------------------------ official (git-disl pred_eval.py)


def official_answer(generated: str) -> str:
  """The text the official scripts score: the generation up to a repeated response marker, stripped."""
  return generated.split(RESPONSE_MARKER)[0].strip()


def official_spellings(gold: str) -> tuple[str, ...]:
  g = gold.strip()
  return OFFICIAL_SPELLINGS.get(g.lower(), tuple(dict.fromkeys((g, g.lower(), g[:1].upper() + g[1:]))))


def official_label_correct(answer: str, gold: str, exact: bool = False) -> bool:
  """SST-2 / AG News as pred_eval.py: `label1 in pred or label2 in pred` (Vaccine), or `==` with
  exact=True (Lisa, Booster); case-sensitive, so "POSITIVE" is wrong and "nonpositive" right."""
  pred = official_answer(answer)
  return any((s == pred) if exact else (s in pred) for s in official_spellings(gold))


def extract_answer_number(sentence: str) -> float:
  """gsm8k/pred_eval.py's extract_answer_number, rule for rule: commas removed; no number at all ->
  inf; text after the *first* "The final answer is: " (space included) up to the next one: its first
  number, or, if it has none (or the phrase is absent), the last number of the whole answer."""
  sentence = sentence.replace(",", "")
  pred = _OFFICIAL_NUMBER.findall(sentence)
  if not pred:
    return math.inf
  segment = sentence.split(OFFICIAL_ANSWER_PROMPT)
  if len(segment) > 1:
    after = _OFFICIAL_NUMBER.findall(segment[1])
    return float(after[0] if after else pred[-1])
  return float(pred[-1])


def official_gsm8k_correct(answer: str, gold: str) -> bool:
  """extract_answer_number(answer) == extract_answer_number(gold), exact float equality as official."""
  return extract_answer_number(official_answer(answer)) == extract_answer_number(str(gold))


# ------------------------------------------------------------------ ours ("word")


def _num(s: str) -> float | None:
  try:
    return float(s.replace(",", ""))
  except ValueError:
    return None


def gsm8k_prediction(answer: str) -> str | None:
  """The number after the last 'The final answer is:' if present, else the last number in the answer."""
  head, sep, tail = answer.rpartition(GSM8K_ANSWER_PREFIX)
  if sep:
    m = _NUMBER.search(tail)
    if m:
      return m.group(0)
  found = _NUMBER.findall(answer)
  return found[-1] if found else None


def gsm8k_correct(answer: str, gold: str) -> bool:
  pred = gsm8k_prediction(answer)
  if pred is None:
    return False
  a, b = _num(pred), _num(str(gold))
  return a is not None and b is not None and abs(a - b) < 1e-6


def label_correct(answer: str, gold: str) -> bool:
  """SST-2 / AG News, the "word" rule: the gold label as a whole word (case-insensitive) in the answer."""
  return re.search(r"(?<![\w/])" + re.escape(gold.lower()) + r"(?![\w/])", answer.lower()) is not None


# ------------------------------------------------------------------ dispatch


def task_correct(task: str, answer: str, gold: str, match: str = DEFAULT_FA_MATCH) -> bool:
  """Is `answer` (the generated text) right for `gold`? `match` picks the rule (module docstring)."""
  if match not in FA_MATCHES:
    raise ValueError(f"eval.fa_match={match!r} must be one of {FA_MATCHES}")
  if match == "word":
    return gsm8k_correct(answer, gold) if task == "gsm8k" else label_correct(answer, gold)
  if task == "gsm8k":
    return official_gsm8k_correct(answer, gold)
  return official_label_correct(answer, gold, exact=match == "official_exact")


def percent(flags) -> float:
  flags = list(flags)
  return 100.0 * sum(bool(f) for f in flags) / len(flags) if flags else float("nan")
