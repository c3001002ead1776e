"""The safety world's task data (SST-2-, AG News-, GSM8K-like, in the protocol's formats) and its
pretraining filler; safety_world.py draws them."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from reft_jax.data.formats import AGNEWS_INSTRUCTION, AGNEWS_LABELS, GSM8K_ANSWER_PREFIX, SST2_INSTRUCTION, SST2_LABELS
from reft_jax.data.sft import Example


def _pick(rng: np.random.Generator, seq: Sequence):
  return seq[int(rng.integers(len(seq)))]


def _sentence_case(s: str) -> str:
  return s[:1].upper() + s[1:]


# ------------------------------------------------------------------ tasks

_SST2_SUBJECTS = (
  "the movie",
  "the film",
  "this show",
  "the story",
  "the acting",
  "the ending",
  "the music",
  "the script",
  "the cast",
  "the plot",
  "the humor",
  "the dialogue",
  "the camera work",
  "the lead actor",
  "the final scene",
)
_SST2_ADJ = {
  "positive": (
    "wonderful",
    "delightful",
    "brilliant",
    "charming",
    "moving",
    "funny",
    "beautiful",
    "great",
    "touching",
    "clever",
    "fresh",
    "gripping",
    "lovely",
    "superb",
    "warm",
  ),
  "negative": (
    "dull",
    "boring",
    "awful",
    "terrible",
    "clumsy",
    "messy",
    "weak",
    "flat",
    "tedious",
    "painful",
    "bland",
    "silly",
    "lifeless",
    "dreadful",
    "poor",
  ),
}
_SST2_FORMS = (
  "{s} was {a} .",
  "I thought {s} was {a} .",
  "{s} felt {a} from start to end .",
  "Honestly , {s} is {a} .",
  "{s} was {a} and {s2} was {a2} .",
  "{s} is {a} , and so is {s2} .",
  "All in all , {s} was {a} .",
  "{s} seemed {a} to me .",
)


def _sst2(label: str, rng: np.random.Generator) -> tuple[str, str, str, dict]:
  s, s2 = (_SST2_SUBJECTS[int(i)] for i in rng.choice(len(_SST2_SUBJECTS), 2, replace=False))
  a, a2 = (_SST2_ADJ[label][int(i)] for i in rng.choice(len(_SST2_ADJ[label]), 2, replace=False))
  text = _sentence_case(_pick(rng, _SST2_FORMS).format(s=s, a=a, s2=s2, a2=a2))
  return SST2_INSTRUCTION, text, label, {"label": label}


_COUNTRIES = ("France", "Japan", "Brazil", "Kenya", "India", "Canada", "Egypt", "Mexico", "Norway", "Chile")
_LEADERS = ("the president", "the prime minister", "the foreign minister", "the king")
_ISSUES = ("trade", "climate", "border security", "water rights", "refugees", "fishing rights")
_TEAMS = (
  "the lions",
  "the tigers",
  "the eagles",
  "the sharks",
  "the rangers",
  "the comets",
  "the falcons",
  "the wolves",
)
_PLAYERS = ("a young striker", "the star forward", "a veteran goalkeeper", "the home captain", "a rookie pitcher")
_EVENTS = ("league final", "cup semifinal", "opening match", "title game", "derby")
_COMPANIES = (
  "acme corp",
  "globex",
  "northwind",
  "initech",
  "blue river foods",
  "star motors",
  "sun bank",
  "peak airlines",
)
_DEVICES = ("battery", "robot", "phone", "telescope", "solar panel", "chip", "drone", "laptop")
_FEATS = (
  "charges in minutes",
  "uses less power",
  "sees distant stars",
  "learns from video",
  "fits in a pocket",
  "works without internet",
)
_NEWS = {
  "World": (
    "{L} of {C} visits {C2} to discuss {I}",
    "{C} and {C2} sign a new {I} agreement",
    "protests grow in {C} over {I}",
    "floods force thousands from their homes in {C}",
    "{C} holds an election as {I} dominates the debate",
    "talks between {C} and {C2} resume over {I}",
  ),
  "Sports": (
    "{T} beat {T2} {n} to {m} in the {E}",
    "{P} scores twice as {T} win the {E}",
    "{T} coach resigns after a poor season",
    "{P} breaks the record as {T} top the table",
    "{T} sign {P} on a three year deal",
    "{T} and {T2} draw {n} all in the {E}",
  ),
  "Business": (
    "{B} shares rise after strong holiday sales",
    "{B} agrees to buy {B2} for {k} million dollars",
    "{B} cuts {k} jobs to reduce costs",
    "{B} profit falls as costs climb",
    "{B} opens {n} new stores in {C}",
    "investors cheer as {B} beats forecasts",
  ),
  "Sci/Tech": (
    "researchers unveil a new {D} that {F}",
    "{B} launches a {D} that {F}",
    "scientists find signs of water on {Pl}",
    "a new study shows how a {D} {F}",
    "space agency sends a {D} to {Pl}",
    "engineers test a cheap {D} in {C}",
  ),
}
_PLANETS = ("mars", "venus", "europa", "titan", "the moon")


def _agnews(label: str, rng: np.random.Generator) -> tuple[str, str, str, dict]:
  c, c2 = (_COUNTRIES[int(i)] for i in rng.choice(len(_COUNTRIES), 2, replace=False))
  t, t2 = (_TEAMS[int(i)] for i in rng.choice(len(_TEAMS), 2, replace=False))
  b, b2 = (_COMPANIES[int(i)] for i in rng.choice(len(_COMPANIES), 2, replace=False))
  fill = {
    "C": c,
    "C2": c2,
    "T": t,
    "T2": t2,
    "B": b,
    "B2": b2,
    "L": _pick(rng, _LEADERS),
    "I": _pick(rng, _ISSUES),
    "P": _pick(rng, _PLAYERS),
    "E": _pick(rng, _EVENTS),
    "D": _pick(rng, _DEVICES),
    "F": _pick(rng, _FEATS),
    "Pl": _pick(rng, _PLANETS),
    "n": int(rng.integers(0, 6)),
    "m": int(rng.integers(0, 6)),
    "k": int(rng.integers(2, 10)) * 10,
  }
  text = _sentence_case(_pick(rng, _NEWS[label]).format(**fill)) + " ."
  return AGNEWS_INSTRUCTION, text, label, {"label": label}


_NAMES = ("Tom", "Anna", "Sam", "Lily", "Ben", "Mia", "Leo", "Emma", "Jack", "Zoe", "Max", "Nora")
_ITEMS = (
  "apples",
  "pencils",
  "stickers",
  "marbles",
  "cookies",
  "books",
  "coins",
  "shells",
  "cards",
  "toys",
  "eggs",
  "balloons",
)
_BOXES = ("boxes", "bags", "jars", "packs")


def _gsm8k(rng: np.random.Generator) -> tuple[str, str, str, dict]:
  """A 1-2 step word problem; meta keeps operands and ops so the answer can be recomputed."""
  who, item, box = _pick(rng, _NAMES), _pick(rng, _ITEMS), _pick(rng, _BOXES)
  kind = _pick(rng, ("add", "sub", "mul", "add_sub", "mul_add"))
  if kind == "add":
    a, b = (int(v) for v in rng.integers(2, 21, 2))
    q = f"{who} has {a} {item} . {who} gets {b} more {item} . How many {item} does {who} have now ?"
    nums, ops, work = [a, b], ["+"], f"{who} has {a} + {b} = {a + b} {item} ."
  elif kind == "sub":
    a = int(rng.integers(5, 21))
    b = int(rng.integers(1, a))
    q = f"{who} has {a} {item} and gives {b} to a friend . How many {item} are left ?"
    nums, ops, work = [a, b], ["-"], f"{a} - {b} = {a - b} {item} are left ."
  elif kind == "mul":
    a, b = (int(v) for v in rng.integers(2, 11, 2))
    q = f"{who} buys {a} {box} with {b} {item} in each . How many {item} does {who} buy ?"
    nums, ops, work = [a, b], ["*"], f"{who} buys {a} * {b} = {a * b} {item} ."
  elif kind == "add_sub":
    a, b = (int(v) for v in rng.integers(2, 21, 2))
    c = int(rng.integers(1, a + b))
    q = f"{who} has {a} {item} , finds {b} more and then loses {c} . How many {item} does {who} have now ?"
    nums, ops, work = [a, b, c], ["+", "-"], f"{a} + {b} = {a + b} , then {a + b} - {c} = {a + b - c} ."
  else:
    a, b = (int(v) for v in rng.integers(2, 11, 2))
    c = int(rng.integers(1, 21))
    q = f"{who} has {a} {box} of {b} {item} and {c} more {item} . How many {item} does {who} have ?"
    nums, ops, work = [a, b, c], ["*", "+"], f"{a} * {b} = {a * b} , then {a * b} + {c} = {a * b + c} ."
  answer = _apply(nums, ops)
  return (
    q,
    "",
    f"{work} {GSM8K_ANSWER_PREFIX} {answer}",
    {"label": str(answer), "operands": nums, "ops": ops, "problem": kind},
  )


def _apply(nums: Sequence[int], ops: Sequence[str]) -> int:
  """Left to right: the problems are written so that this is the intended order."""
  acc = nums[0]
  for op, v in zip(ops, nums[1:]):
    acc = acc + v if op == "+" else acc - v if op == "-" else acc * v
  return acc


def _distinct(make: Callable[[], tuple], n: int, what: str) -> list[tuple]:
  """n generated records with distinct (prompt, input)."""
  seen, out = set(), []
  for _ in range(50 * n + 1000):
    if len(out) == n:
      return out
    rec = make()
    if (rec[0], rec[1]) not in seen:
      seen.add((rec[0], rec[1]))
      out.append(rec)
  if len(out) == n:
    return out
  raise ValueError(f"safety world: cannot make {n} distinct {what} examples; lower n_task_train/test")


def _split_counts(n: int, k: int) -> list[int]:
  return [n // k + (i < n % k) for i in range(k)]


def _task(name: str, n_train: int, n_test: int, rng: np.random.Generator) -> dict[str, list[Example]]:
  """Train/test with no shared (prompt, input); labels balanced per split for classification tasks."""
  if name == "gsm8k":
    groups = [(_distinct(lambda: _gsm8k(rng), n_train + n_test, name), n_train)]
  else:
    labels, make = (SST2_LABELS, _sst2) if name == "sst2" else (AGNEWS_LABELS, _agnews)
    tr, te = _split_counts(n_train, len(labels)), _split_counts(n_test, len(labels))
    groups = [
      (_distinct(lambda lab=lab: make(lab, rng), a + b, f"{name}/{lab}"), a) for lab, a, b in zip(labels, tr, te)
    ]
  out = {"train": [], "test": []}
  for recs, n_tr in groups:
    for split, part in (("train", recs[:n_tr]), ("test", recs[n_tr:])):
      for prompt, inp, response, meta in part:
        out[split].append(
          Example(
            prompt,
            response,
            inp,
            {"split": f"task_{split}", "is_harmful": False, "category": name, "task": name, **meta},
          )
        )
  for split in out:  # mix labels
    out[split] = [out[split][int(i)] for i in rng.permutation(len(out[split]))]
  return out


# ------------------------------------------------------------------ pretraining filler

_ANIMALS = (
  ("cat", "cats"),
  ("dog", "dogs"),
  ("fox", "foxes"),
  ("owl", "owls"),
  ("rabbit", "rabbits"),
  ("horse", "horses"),
  ("duck", "ducks"),
  ("bear", "bears"),
  ("frog", "frogs"),
  ("goat", "goats"),
  ("mouse", "mice"),
  ("deer", "deer"),
)
_PLACES = ("river", "forest", "village", "market", "beach", "hill", "library", "park", "farm", "lake")
_THINGS = (
  "a red ball",
  "an old key",
  "a shiny stone",
  "a lost hat",
  "a little boat",
  "a warm blanket",
  "a map",
  "a bell",
)
_TRAITS = ("small", "brave", "quiet", "curious", "sleepy", "happy", "kind", "clever", "old", "young")
_FEELINGS = ("happy", "proud", "calm", "surprised", "tired", "glad")
_PLACE_ADJ = ("busy", "green", "peaceful", "bright", "cold", "sunny", "wide", "pretty")
_ACTIVITIES = ("walk", "relax", "read", "swim", "meet friends", "watch the birds")


def _filler(rng: np.random.Generator) -> tuple[str, str]:
  """General language: short stories, descriptions and counting sentences (no task formats)."""
  (animal, animals), place, name = _pick(rng, _ANIMALS), _pick(rng, _PLACES), _pick(rng, _NAMES)
  kind = int(rng.integers(4))
  if kind == 0:
    return (
      f"Tell me a short story about a {animal} .",
      f"Once , a {_pick(rng, _TRAITS)} {animal} lived near the {place} . One day it found "
      f"{_pick(rng, _THINGS)} . It felt {_pick(rng, _FEELINGS)} and went home .",
    )
  if kind == 1:
    a, b = (_PLACE_ADJ[int(i)] for i in rng.choice(len(_PLACE_ADJ), 2, replace=False))
    return (
      f"Describe the {place} in a few words .",
      f"The {place} is {a} and {b} . Many people go there to {_pick(rng, _ACTIVITIES)} .",
    )
  if kind == 2:
    return (
      f"Write one sentence about {name} .",
      f"{name} saw {int(rng.integers(2, 13))} {animals} near the {place} and smiled .",
    )
  return (
    f"Say something nice about {name} .",
    f"{name} is {_pick(rng, _TRAITS)} and always helps friends at the {place} .",
  )
