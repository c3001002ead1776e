"""What every data module shares: the published task formats, the data error, and JSONL writing."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

from reft_jax.data.sft import Example

SST2_INSTRUCTION = "Analyze the sentiment of the input, and respond only positive or negative."
AGNEWS_INSTRUCTION = "Categorize the news article into one of the 4 categories: World, Sports, Business, Sci/Tech."
GSM8K_ANSWER_PREFIX = "The final answer is:"
SST2_LABELS = ("negative", "positive")
AGNEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")


class DataError(ValueError):
  pass


def write_jsonl(examples: Iterable[Example], path: str) -> str:
  """One record per line: prompt, input, response, then the meta fields (readable by sources.load_source)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for ex in examples:
      meta = {k: v for k, v in ex.meta.items() if k not in ("prompt", "input", "response")}
      f.write(json.dumps({"prompt": ex.prompt, "input": ex.input, "response": ex.response, **meta}) + "\n")
  return path
