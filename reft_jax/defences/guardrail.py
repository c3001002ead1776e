"""A guardrail filter: moderate the user data with a judge, drop what it flags, fine-tune on the rest.

The simplest competitor of ReFT's filter and the provider's step that Virus (Huang et al. 2025,
git-disl/Virus) attacks: commercial fine-tuning services moderate an upload before training on it. Two
judges:

  classifier  a QA moderation model in beaver-dam-7b's shape (eval/judges.py:ClassifierJudge, Vaccine's
              QAModeration input) scores each (prompt, response) pair; flagged when max_c sigmoid > threshold
              (0.5, as the official evaluation). guardrail.path, or eval.judge_path when empty.
  refusal     offline proxy, no moderation model needed: a guard LLM (the aligned model, or guardrail.path)
              answers each user prompt greedily; flagged when its answer is a refusal
              (eval/judges.py:is_refusal). It moderates the prompt only, as ReFT's filter does.

Then SFT from the aligned model on what is kept. The audit report is ReFT's (reft_filter.write_audit:
root/guardrail_filter/{report.jsonl, kept.jsonl, summary.json}, with the guard's answers), and so are the guard rails
on how much may be dropped (reft.min_kept, reft.warn_dropped).
"""

from __future__ import annotations

import logging

import numpy as np

from reft_jax.config import check
from reft_jax.data.sft import format_prompt
from reft_jax.defences.reft_filter import read_audit, write_audit
from reft_jax.defences.registry import Defence, register
from reft_jax.defences.sft import aligned_stage
from reft_jax.eval.judges import ClassifierJudge, is_refusal
from reft_jax.generate import generate_texts
from reft_jax.model.build import load_frozen
from reft_jax.stages import Env, StageSpec

log = logging.getLogger(__name__)

JUDGES = ("classifier", "refusal")
AUDIT = "guardrail_filter"  # root/<AUDIT>/: its audit report, beside ReFT's root/filter/ in a shared cell


def refusal_scores(model, tokenizer, examples, template: str, max_new_tokens: int, batch_size: int = 32, mesh=None):
  """(1.0 where the guard model refuses the prompt else 0.0, the guard's answers)."""
  prompts = [format_prompt(e, template, tokenizer) for e in examples]
  answers = generate_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, mesh=mesh)
  return np.asarray([float(is_refusal(a)) for a in answers]), answers


def classifier_scores(judge: ClassifierJudge, examples) -> np.ndarray:
  """max over harm categories of sigmoid(logit) of each (prompt, response) pair."""
  logits = judge.scores(examples, [e.response for e in examples])
  return (1 / (1 + np.exp(-logits))).max(axis=1) if len(logits) else np.zeros(0)


def moderate(env: Env, root: str, start: str, user):
  """Scores the upload with the configured judge; writes the audit report. Returns (kept, summary)."""
  c, g = env.c, env.c.guardrail
  done = read_audit(c, root, user, AUDIT)
  if done is not None:
    return done
  if g.judge == "classifier":
    judge = ClassifierJudge(g.path or c.eval.judge_path, mesh=env.mesh)
    scores, answers, tau = classifier_scores(judge, user), None, g.threshold
  else:
    guard = load_frozen(c, g.path or start, env.mesh, env.rules)
    scores, answers = refusal_scores(
      guard, env.tokenizer, user, c.data.template, g.max_new_tokens, c.eval.batch_size, env.mesh
    )
    tau = 0.5  # refused = 1.0
  return write_audit(c, root, user, scores, tau, {"judge": g.judge}, texts=answers, name=AUDIT)


def finetune(env: Env, root: str, start: str, user) -> StageSpec:
  kept, summary = moderate(env, root, start, user)
  log.info(
    "guardrail (%s): kept %d of %d (precision %s, recall %s)",
    env.c.guardrail.judge,
    summary["kept"],
    summary["n"],
    summary["precision"],
    summary["recall"],
  )
  flt = {k: summary[k] for k in ("precision", "recall", "kept_fraction", "tau", "false_positive_rate")}
  return StageSpec("guardrail", env.tokenize(kept).trimmed(), init=start, record={"filter": flt})


def _validate(c):
  g = c.guardrail
  check(g.judge in JUDGES, "guardrail.judge", g.judge, f"must be one of {', '.join(JUDGES)}")
  check(0 < g.threshold < 1, "guardrail.threshold", g.threshold, "must lie in (0, 1)")
  check(g.max_new_tokens > 0, "guardrail.max_new_tokens", g.max_new_tokens, "must be positive")
  check(
    g.judge != "classifier" or bool(g.path or c.eval.judge_path),
    "guardrail.path",
    g.path,
    "guardrail.judge=classifier needs a moderation model directory (guardrail.path or eval.judge_path)",
  )


GUARDRAIL = register(
  Defence(
    "guardrail",
    "moderate the user data with a judge (QA moderation model, or the aligned model's refusals), SFT on the rest",
    finetune=finetune,
    align=aligned_stage,
    section="guardrail",
    # The official moderation threshold (Vaccine's eval_sentiment.py); refusals show in the first tokens.
    defaults={"judge": "refusal", "path": "", "threshold": 0.5, "max_new_tokens": 32},
    validate=_validate,
    source="Huang et al. 2025 (Virus, git-disl/Virus: the guardrail it attacks); Vaccine's QAModeration",
  )
)
