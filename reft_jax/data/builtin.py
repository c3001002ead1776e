"""A small built-in instruction set so the CLI trains offline with no files (the full synthetic
"safety world" generator extends this)."""

from __future__ import annotations

import numpy as np

from reft_jax.data.sft import Example

_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                 "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
                 "seventeen", "eighteen"]
_NOUNS = ["apple", "river", "garden", "window", "teacher", "bicycle", "letter", "mountain", "kettle",
          "lantern", "harbor", "violin"]
_GOOD = ["wonderful", "delightful", "great", "lovely", "excellent"]
_BAD = ["terrible", "awful", "boring", "dreadful", "poor"]


def toy_instructions(n: int, seed: int = 0) -> list[Example]:
  """Arithmetic in words, word copying and sentiment: n examples, deterministic in seed."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    kind = rng.integers(3)
    if kind == 0:
      a, b = rng.integers(0, 10, size=2)
      out.append(Example(f"Add {_NUMBER_WORDS[a]} and {_NUMBER_WORDS[b]}.",
                         f"The answer is {_NUMBER_WORDS[a + b]}."))
    elif kind == 1:
      w = rng.choice(_NOUNS, size=int(rng.integers(1, 4)))
      out.append(Example(f"Repeat the words: {' '.join(w)}.", " ".join(w)))
    else:
      good = bool(rng.integers(2))
      adj = rng.choice(_GOOD if good else _BAD)
      out.append(Example("Analyze the sentiment of the input, and respond only positive or negative.",
                         "positive" if good else "negative",
                         input=f"The {rng.choice(_NOUNS)} was {adj}."))
  return out
