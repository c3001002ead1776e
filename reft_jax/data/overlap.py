"""Disjointness of prompt sets: normalised exact or near-duplicate overlap (held-out evaluation prompts
must not repeat a training prompt; Booster's harmful set must not share the attack's)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from reft_jax.data.sft import Example


def normalise_prompt(text: str) -> str:
  """Lower case, punctuation to spaces, whitespace collapsed: the key that overlaps are measured on."""
  return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


def _text(x: Example | str) -> str:
  return x if isinstance(x, str) else x.prompt + (f"\n{x.input}" if x.input else "")


def overlap(a: Sequence[Example | str], b: Sequence[Example | str], threshold: float = 1.0) -> list[tuple[int, int]]:
  """Index pairs (i, j) whose normalised prompts are equal (threshold=1.0) or whose word sets have
  Jaccard similarity >= threshold (e.g. 0.8 also catches one-word edits)."""
  na, nb = [normalise_prompt(_text(x)) for x in a], [normalise_prompt(_text(x)) for x in b]
  if threshold >= 1.0:
    where: dict[str, list[int]] = {}
    for j, t in enumerate(nb):
      where.setdefault(t, []).append(j)
    return [(i, j) for i, t in enumerate(na) for j in where.get(t, ())]
  wa, wb = [set(t.split()) for t in na], [set(t.split()) for t in nb]
  pairs = []
  for i, x in enumerate(wa):
    for j, y in enumerate(wb):
      # |x & y| / |x | y| <= min/max of the sizes: skip pairs that cannot reach the threshold.
      if x and y and min(len(x), len(y)) >= threshold * max(len(x), len(y)):
        if len(x & y) >= threshold * len(x | y):
          pairs.append((i, j))
  return pairs


def drop_overlapping(a: Sequence[Example], b: Sequence[Example | str], threshold: float = 1.0) -> list[Example]:
  """`a` without the examples that overlap any of `b` (keeps an evaluation set disjoint from training)."""
  hit = {i for i, _ in overlap(a, b, threshold)}
  return [x for i, x in enumerate(a) if i not in hit]
