"""Finetune Accuracy exactly as the protocol defines it, and the safety rates."""

from __future__ import annotations

import re

from reft_jax.data.sources import GSM8K_ANSWER_PREFIX

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _num(s: str) -> float | None:
  try:
    return float(s.replace(",", ""))
  except ValueError:
    return None


def gsm8k_prediction(answer: str) -> str | None:
  """The number after 'The final answer is:' if present, else the last number in the answer."""
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
  """SST-2 / AG News: the gold label word appears in the answer (case-insensitive, whole word)."""
  return re.search(r"(?<![\w/])" + re.escape(gold.lower()) + r"(?![\w/])", answer.lower()) is not None


def task_correct(task: str, answer: str, gold: str) -> bool:
  return gsm8k_correct(answer, gold) if task == "gsm8k" else label_correct(answer, gold)


def percent(flags) -> float:
  flags = list(flags)
  return 100.0 * sum(bool(f) for f in flags) / len(flags) if flags else float("nan")
