"""Finetune Accuracy matching pinned to the official scripts (git-disl/Vaccine sst2|ag_news|gsm8k/
pred_eval.py @ 8937f68; the exact-match copies in git-disl/Lisa @ 68e3659 and git-disl/Booster @ 6421918).

Each case below is a string on which a plausible re-implementation disagrees with the official one
(case, substring vs word, which "The final answer is" counts, commas, float equality, the response
marker); the differential test checks the same against a verbatim copy of the official code."""

import itertools
import math
import random

import pytest

from reft_jax.eval.metrics import (
  FA_MATCHES,
  extract_answer_number,
  official_answer,
  official_gsm8k_correct,
  official_label_correct,
  task_correct,
)

# ------------------------------------------------------------------ the official code, verbatim

VACCINE_PROMPT = (
  "Below is an instruction that describes a task, paired with an input that provides further "
  "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
  "{instruction}\n\n### Input:\n{input}\n\n### Response:"
)


def _official_pred(generated: str) -> str:
  # pred_eval.py query(): output = decode(prompt + generation); res = output.split("### Response:")[1].strip()
  output = VACCINE_PROMPT.format(instruction="Analyze the sentiment", input="a film") + generated
  return output.split("### Response:")[1].strip()


def _official_labels(task: str, gold: str) -> tuple[str, str]:
  # sst2/pred_eval.py and ag_news/pred_eval.py: label1 / label2 per label index
  if task == "sst2":
    return ("positive", "Positive") if gold == "positive" else ("negative", "Negative")
  return {
    "World": ("World", "world"),
    "Sports": ("Sports", "sports"),
    "Business": ("Business", "business"),
    "Sci/Tech": ("Sci/Tech", "sci"),
  }[gold]


def _official_label_correct(task, generated, gold, exact):
  pred = _official_pred(generated)
  label1, label2 = _official_labels(task, gold)
  if exact:  # Lisa / Booster sst2|agnews/pred_eval.py
    return label1 == pred or label2 == pred
  return label1 in pred or label2 in pred  # Vaccine


ANSWER_PROMPT = "The final answer is: "


def _official_extract_answer_number(sentence: str) -> float:  # gsm8k/pred_eval.py, verbatim
  import re

  sentence = sentence.replace(",", "")
  pred = [s for s in re.findall(r"-?\d+\.?\d*", sentence)]
  if not pred:
    return float("inf")
  segment = sentence.split(ANSWER_PROMPT)
  if len(segment) > 1:
    pred_answer = segment[1]
    pred_answer = [s for s in re.findall(r"-?\d+\.?\d*", pred_answer)]
    if len(pred_answer) > 0:
      pred_answer = pred_answer[0]
    else:
      pred_answer = float(pred[-1])
  else:
    pred_answer = float(pred[-1])
  if isinstance(pred_answer, str):
    try:
      pred_answer = float(pred_answer)
    except ValueError:
      pred_answer = float("inf")
  return pred_answer


def _official_gsm8k_correct(generated, gold):
  # ground truth: the GSM8K answer with "####" replaced by ANSWER_PROMPT
  truth = _official_extract_answer_number(f"some work <<2*3=6>>6\n#### {gold}".replace("####", ANSWER_PROMPT))
  return truth == _official_extract_answer_number(_official_pred(generated))


# ------------------------------------------------------------------ pinned cases


@pytest.mark.parametrize(
  "answer,gold,ok",
  [
    ("positive", "positive", True),
    ("Positive.", "positive", True),
    ("POSITIVE", "positive", False),  # case-sensitive: only "positive" / "Positive"
    ("nonpositive", "positive", True),  # a substring, not a word
    ("The review is positive, not negative.", "negative", True),  # both labels present: correct for both
    ("pos", "positive", False),
    ("negative\n\n### Instruction:\nsay it\n\n### Response:\npositive", "positive", False),  # cut at marker
    ("Negative", "negative", True),
    ("science news", "Sci/Tech", True),  # AG News' second spelling of Sci/Tech is "sci"
    ("Science", "Sci/Tech", False),  # "Sci" is not a spelling
    ("sci/tech", "Sci/Tech", True),
    ("SCI/TECH", "Sci/Tech", False),
    ("worldwide", "World", True),
    ("WORLD", "World", False),
    ("Sports", "World", False),
    ("", "World", False),
  ],
)
def test_official_label_matching(answer, gold, ok):
  task = "sst2" if gold in ("positive", "negative") else "agnews"
  assert official_label_correct(answer, gold) is ok
  assert task_correct(task, answer, gold) is ok  # the default rule is the official one


@pytest.mark.parametrize(
  "answer,gold,ok",
  [
    ("positive", "positive", True),
    ("  Positive \n", "positive", True),  # stripped first
    ("positive.", "positive", False),  # anything more than the label is wrong
    ("The sentiment is positive", "positive", False),
    ("sci", "Sci/Tech", True),
    ("sci/tech", "Sci/Tech", False),  # neither "Sci/Tech" nor "sci"
    ("Sci/Tech", "Sci/Tech", True),
    ("world\n### Response:\nSports", "world", True),  # the text up to the marker
  ],
)
def test_official_exact_label_matching(answer, gold, ok):
  assert official_label_correct(answer, gold, exact=True) is ok
  task = "sst2" if gold in ("positive", "negative") else "agnews"
  assert task_correct(task, answer, gold, match="official_exact") is ok


@pytest.mark.parametrize(
  "answer,gold,ok",
  [
    ("The final answer is: 3. Later: The final answer is: 5", "3", True),  # the FIRST phrase counts
    ("The final answer is: 3. Later: The final answer is: 5", "5", False),
    ("The final answer is:5 and then 6", "6", True),  # no space after the colon: the phrase is absent
    ("The final answer is:5 and then 6", "5", False),
    ("The final answer is:\n18 apples and 20 pears", "20", True),  # newline instead of the space, too
    ("The final answer is: 1,000", "1000", True),  # commas dropped everywhere
    ("We have 1,2,3 items", "123", True),
    ("The final answer is: 5.", "5", True),
    ("The final answer is: 72\n\n### Response:\nThe final answer is: 9", "72", True),  # cut at the marker
    ("The final answer is: none; 4 or 7", "4", True),  # the first number after the phrase
    ("The final answer is: nothing", "2", False),
    ("It is 2. The final answer is: nothing", "2", True),  # nothing after it: the last number overall
    ("The final answer is: 0.30000000000000004", "0.3", False),  # exact float equality
    ("The final answer is: -0", "0", True),
    ("no numbers at all", "0", False),  # inf
    ("the final answer is: 8 or 9", "9", True),  # case-sensitive phrase: absent -> last number
  ],
)
def test_official_gsm8k_matching(answer, gold, ok):
  assert official_gsm8k_correct(answer, gold) is ok
  assert task_correct("gsm8k", answer, gold) is ok
  assert task_correct("gsm8k", answer, gold, match="official_exact") is ok


def test_extract_answer_number_returns_inf_without_numbers():
  assert extract_answer_number("no digits") == math.inf
  assert extract_answer_number("The final answer is: .5") == 5.0  # the official pattern needs a digit first


def test_official_answer_is_the_text_before_a_repeated_marker():
  assert official_answer("\n positive \n### Response:\nnegative") == "positive"
  assert official_answer("  Sports  ") == "Sports"


def test_word_rule_is_kept_as_an_option():
  # Where our lenient "word" rule differs from the official one, both directions.
  assert task_correct("sst2", "POSITIVE", "positive", match="word")
  assert not task_correct("sst2", "nonpositive", "positive", match="word")
  assert not task_correct("agnews", "science", "Sci/Tech", match="word")
  assert task_correct("gsm8k", "The final answer is: 3. Later: The final answer is: 5", "5", match="word")
  assert task_correct("gsm8k", "The final answer is:\n18 apples and 20 pears", "18", match="word")
  with pytest.raises(ValueError, match="fa_match='loose'"):
    task_correct("sst2", "positive", "positive", match="loose")
  assert FA_MATCHES == ("official", "official_exact", "word")


# ------------------------------------------------------------------ differential test vs the official code

_PIECES = (
  "positive",
  "Positive",
  "POSITIVE",
  "negative",
  "Negative",
  "nonpositive",
  "sci",
  "Sci/Tech",
  "science",
  "SCI",
  "World",
  "world",
  "Sports",
  "sports",
  "business",
  "### Response:",
  "\n",
  " ",
  ".",
  ",",
  "The final answer is:",
  "The final answer is: ",
  "the final answer is: ",
  "1,000",
  "-3",
  "5.",
  "12",
  "0.5",
  ".5",
  "7",
  "x",
)


def _strings(n: int, seed: int = 0):
  rng = random.Random(seed)
  fixed = ["".join(p) for p in itertools.product(_PIECES[:8], repeat=2)]
  return fixed + ["".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 7))) for _ in range(n)]


def test_label_matching_equals_the_official_code_on_random_strings():
  golds = [
    ("sst2", "positive"),
    ("sst2", "negative"),
    ("agnews", "World"),
    ("agnews", "Sports"),
    ("agnews", "Business"),
    ("agnews", "Sci/Tech"),
  ]
  for s in _strings(1500):
    for task, gold in golds:
      for exact in (False, True):
        want = _official_label_correct(task, s, gold, exact)
        assert official_label_correct(s, gold, exact=exact) is want, (s, gold, exact)


def test_gsm8k_matching_equals_the_official_code_on_random_strings():
  for s in _strings(1500, seed=1):
    for gold in ("12", "-3", "1000", "5", "0.5", "7", "1000.5"):
      assert official_gsm8k_correct(s, gold) is _official_gsm8k_correct(s, gold), (s, gold)
