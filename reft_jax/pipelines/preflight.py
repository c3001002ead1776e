"""Preflight: before any stage starts, everything the run will read from the Hugging Face hub (the model,
its tokenizer, hub datasets) must be reachable, and a classifier judge must be a local directory.

Offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) a hub name counts as reachable only when it is in the local
cache; otherwise the run fails at once with one line naming every missing thing and the flag that replaces
it, instead of after hours of training (a 7B protocol preset evaluates last). Online nothing is downloaded
here: the stages download what they need.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re

import ml_collections

from reft_jax import config as config_lib

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
JUDGE_HUB_NAME = "PKU-Alignment/beaver-dam-7b"  # the moderation classifier of the git-disl protocol
_SLICE = re.compile(r"\[\d*:\d*\]$")


class PreflightError(ValueError):
  pass


@dataclasses.dataclass
class Need:
  kind: str  # model | dataset | judge
  name: str  # hub repo id (model, dataset) or the judge path as configured
  fields: list[str]  # the config fields that ask for it


def offline_var() -> str:
  """The offline switch that is on ("" when online)."""
  for var in OFFLINE_VARS:
    if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
      return var
  return ""


def _hf_home() -> str:
  return os.path.expanduser(os.environ.get("HF_HOME", os.path.join("~", ".cache", "huggingface")))


def hub_cache() -> str:
  return os.path.expanduser(
    os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(_hf_home(), "hub")
  )


def datasets_cache() -> str:
  return os.path.expanduser(os.environ.get("HF_DATASETS_CACHE") or os.path.join(_hf_home(), "datasets"))


def hub_model(path: str) -> str:
  """The hub repo id a model path names, or "" for a local directory (or nothing)."""
  if not path or path.startswith((".", "/", "~")) or os.path.isdir(path):
    return ""
  return path


def hub_datasets(spec: str) -> list[str]:
  """Hub dataset repo ids a source spec reads (names in HUB_SOURCES and hub:NAME[:CONFIG], sliced or
  joined)."""
  from reft_jax.data.sources import HUB_SOURCES, split_specs

  out = []
  for part in split_specs(spec):
    if part.startswith("mirror(") and part.endswith(")"):
      out += hub_datasets(part[len("mirror(") : -1])
      continue
    part = _SLICE.sub("", part)
    if part in HUB_SOURCES:
      part = HUB_SOURCES[part]["source"]
    if part.startswith("hub:"):
      out.append(part[4:].split(":")[0])
  return out


def _used_specs(c: ml_collections.ConfigDict, command: str) -> list[tuple[str, str]]:
  """(field, source spec) for every data source this command and method will read."""
  specs = []
  evaluates = command == "eval" or c.eval.enabled or c.method in ("demo", "sweep", "robustness")
  if command != "eval":
    if c.data.source != "builtin":
      specs.append(("data.source", c.data.source))
    if c.data.attack != "none":
      specs.append(("data.harmful_source", c.data.harmful_source))
    if c.method in ("reft", "demo", "sweep", "robustness"):
      specs += [("reft.probe_harmful", c.reft.probe_harmful), ("reft.probe_harmless", c.reft.probe_harmless)]
      if c.reft.alignment == config_lib.BUILD_ALIGNMENT:
        specs += [("alignment.harmful", c.alignment.harmful), ("alignment.harmless", c.alignment.harmless)]
      else:
        specs.append(("reft.alignment", c.reft.alignment))
    if c.method in ("demo", "sweep", "robustness") and "booster" in config_lib.csv_list(c[c.method].methods):
      specs.append(("booster.harmful_source", c.booster.harmful_source))
    if c.method == "analyze":
      specs += [
        (f"analyze.{f}", c.analyze[f])
        for f in ("harmful_train", "harmless_train", "harmful_eval", "harmless_eval", "task_eval")
      ]
  if evaluates:
    specs += [("eval.harmful", c.eval.harmful), ("eval.harmless", c.eval.harmless)]
    try:
      specs += [(f"eval.tasks[{t}]", s) for t, s in config_lib.eval_tasks(c).items()]
    except ValueError:  # a malformed eval.tasks is validate()'s to report
      pass
  return [(f, s) for f, s in specs if s]


def requirements(c: ml_collections.ConfigDict, command: str = "train") -> list[Need]:
  """Every hub model and dataset the run reads, and its classifier judge."""
  needs: dict[tuple[str, str], Need] = {}

  def add(kind, name, field):
    needs.setdefault((kind, name), Need(kind, name, [])).fields.append(field)

  if command != "eval" and not c.model.gguf:  # a GGUF file is converted into model.hf_path
    for field in ("hf_path", "tokenizer"):
      if hub_model(c.model[field]):
        add("model", c.model[field], f"model.{field}")
  for field, spec in _used_specs(c, command):
    for name in hub_datasets(spec):
      add("dataset", name, field)
  evaluates = command == "eval" or c.eval.enabled or c.method in ("demo", "sweep", "robustness")
  if evaluates and c.eval.judge == "classifier":
    add("judge", c.eval.judge_path, "eval.judge_path")
  return list(needs.values())


def model_cached(repo: str) -> bool:
  from huggingface_hub import try_to_load_from_cache

  return isinstance(try_to_load_from_cache(repo, "config.json", cache_dir=hub_cache()), str)


def dataset_cached(repo: str) -> bool:
  """In the datasets cache (prepared once online) or the hub cache (its files downloaded)."""
  from datasets.naming import camelcase_to_snakecase

  namespace, _, name = repo.rpartition("/")
  prepared = "___".join(filter(None, [namespace, camelcase_to_snakecase(name)]))
  if any(os.path.isdir(p) for p in glob.glob(os.path.join(datasets_cache(), prepared, "*", "*", "*"))):
    return True
  return bool(glob.glob(os.path.join(hub_cache(), f"datasets--{repo.replace('/', '--')}", "snapshots", "*")))


def missing(c: ml_collections.ConfigDict, command: str = "train") -> list[Need]:
  out, offline = [], bool(offline_var())
  for need in requirements(c, command):
    if need.kind == "judge":
      ok = bool(need.name) and os.path.isfile(os.path.join(os.path.expanduser(need.name), "config.json"))
    elif not offline:
      ok = True  # online: the stage downloads it
    else:
      ok = model_cached(need.name) if need.kind == "model" else dataset_cached(need.name)
    if not ok:
      out.append(need)
  return out


def message(c: ml_collections.ConfigDict, needs: list[Need]) -> str:
  """One line: what is missing and the flags (or steps) that provide it."""
  models = [n for n in needs if n.kind == "model"]
  data = [n for n in needs if n.kind == "dataset"]
  judge = [n for n in needs if n.kind == "judge"]
  what, fixes = [], []
  if models:
    what.append(" and ".join(n.name for n in models))
    fixes += [f"pass --config.{n.fields[0]}=DIR (a local copy of {n.name})" for n in models]
  if data:
    names = ", ".join(n.name for n in data)
    what.append(f"the hub dataset{'s' if len(data) > 1 else ''} {names}")
    fields = sorted({f for n in data for f in n.fields})
    fixes.append(
      f"load {'them' if len(data) > 1 else 'it'} once online to fill the cache (or point "
      f"{', '.join(fields)} at local files)"
    )
  head = f"{c.preset} needs {' and '.join(what)}" if what else ""
  if what:
    head += f"; offline ({offline_var()}=1) and not in the local cache"
  if judge:
    path = judge[0].name
    why = "eval.judge_path is empty" if not path else f"eval.judge_path={path!r} has no config.json"
    judge_text = f"a local moderation classifier for eval.judge=classifier ({why})"
    head = f"{head}; it also needs {judge_text}" if head else f"{c.preset} needs {judge_text}"
    fixes.append(f"pass --config.eval.judge_path=DIR (a local copy of {JUDGE_HUB_NAME})")
  return f"{head}: {'; '.join(fixes)}"


def check(c: ml_collections.ConfigDict, command: str = "train") -> None:
  """Raises PreflightError (one line) when something the run needs cannot be had."""
  needs = missing(c, command)
  if needs:
    raise PreflightError(message(c, needs))
