"""Evaluate a model on the configured sets and record it in results.json; the eval section's validation."""

from __future__ import annotations

import os

import ml_collections

from reft_jax.config import BUILD_ALIGNMENT, check, eval_harmless_sets, eval_tasks
from reft_jax.data import attacks, sft
from reft_jax.data.load import load
from reft_jax.eval.judges import make_judge
from reft_jax.eval.metrics import FA_MATCHES
from reft_jax.eval import run as run_lib


def training_harmful(c: ml_collections.ConfigDict) -> list[sft.Example]:
  """Every harmful prompt training may see: probe set, alignment refusals, the attack's harmful pool."""
  built = c.reft.alignment == BUILD_ALIGNMENT
  specs = [c.reft.probe_harmful, c.alignment.harmful if built else ""]
  specs.append(c.data.harmful_source if c.data.attack != "none" else "")
  out = [x for s in specs if s for x in load(c, s)]
  if not built:
    out += [x for x in load(c, c.reft.alignment) if x.meta.get("is_harmful")]
  return out


def evaluate_and_record(
  c: ml_collections.ConfigDict, workdir: str, model, tokenizer, mesh, method: str, extra: dict | None = None
) -> dict:
  """Evaluates `model` on the configured sets; records it as runs[<eval.name or method>]."""
  e = c.eval
  name = e.name or method
  # All of it when overlaps are dropped (the first n_harmful that remain are evaluated).
  harmful = load(c, e.harmful, 0 if e.drop_overlap > 0 else e.n_harmful) if e.harmful else []
  n_overlap = 0
  if e.drop_overlap > 0 and harmful:  # held out means held out: no (near) repeat of a training prompt
    from reft_jax.data.overlap import drop_overlapping

    kept = drop_overlapping(harmful, training_harmful(c), e.drop_overlap)
    n_overlap = len(harmful) - len(kept)
    harmful = kept
  # The harmful and harmless prompts under the attack's prompt (eval.prompt_style; auto = AOA for the
  # AOA attacks, as the official evaluation does); the task prompts stay plain, as the official code
  # never evaluates task utility under the AOA template.
  style = attacks.eval_prompt_style(e.prompt_style, c.data.attack)
  run = run_lib.evaluate(
    model,
    tokenizer,
    harmful=attacks.dress_prompts(harmful[: e.n_harmful], style),
    harmless=attacks.dress_prompts(load(c, e.harmless, e.n_harmless) if e.harmless else [], style),
    harmless_sets={n: attacks.dress_prompts(load(c, s), style) for n, s in eval_harmless_sets(c).items()},
    tasks={t: load(c, s, e.n_task) for t, s in eval_tasks(c).items()},
    judge=make_judge(e.judge, e.judge_path, e.judge_threshold, mesh),
    template=c.data.template,
    max_new_tokens=e.max_new_tokens,
    batch_size=e.batch_size,
    mesh=mesh,
    task_max_new_tokens=e.task_max_new_tokens,
    fa_match=e.fa_match,
    examples_path=os.path.join(workdir, "eval", f"{name}.jsonl"),
    progress=c.log.progress,
  )
  run.update(extra or {})
  run["eval_prompt_style"] = style
  if e.drop_overlap > 0:
    run["eval_harmful_dropped_as_overlapping"] = n_overlap
  run_lib.update_results(workdir, name, run, c.to_dict())
  return run


def validate_eval(c: ml_collections.ConfigDict) -> None:
  e = c.eval
  check(0 <= e.drop_overlap <= 1, "eval.drop_overlap", e.drop_overlap, "must lie in [0, 1]")
  check(e.prompt_style in ("auto", "plain", "aoa"), "eval.prompt_style", e.prompt_style, "must be auto, plain or aoa")
  check(e.fa_match in FA_MATCHES, "eval.fa_match", e.fa_match, f"must be one of {FA_MATCHES}")
  check(
    e.task_max_new_tokens >= 0,
    "eval.task_max_new_tokens",
    e.task_max_new_tokens,
    "must be >= 0 (0 = eval.max_new_tokens)",
  )
  check(e.judge in ("keyword", "oracle", "classifier"), "eval.judge", e.judge, "must be keyword, oracle or classifier")
  if e.judge == "classifier":
    check(bool(e.judge_path), "eval.judge_path", e.judge_path, "must be set for eval.judge=classifier")
  try:
    eval_tasks(c)
  except ValueError as err:
    check(False, "eval.tasks", e.tasks, str(err))
  try:
    eval_harmless_sets(c)
  except ValueError as err:
    check(False, "eval.harmless_sets", e.harmless_sets, str(err))
