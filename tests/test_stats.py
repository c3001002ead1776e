"""Intervals behind every reported rate: Wilson over prompts, Student-t over seeds, the demo's summary."""

import math

import pytest

from reft_jax.eval import stats
from reft_jax.pipelines.demo import summarize_methods, summary_table, sweep_table


def test_wilson_matches_the_closed_form_and_stays_inside_0_100():
  # 35 of 100: Wilson [26.36, 44.75] (a normal interval would be [25.65, 44.35]).
  low, high = stats.wilson(35.0, 100)
  assert low == pytest.approx(26.36, abs=0.01) and high == pytest.approx(44.75, abs=0.01)
  low, high = stats.wilson(0.0, 200)  # no flagged prompt still leaves an upper bound of ~1.9%
  assert low == 0.0 and high == pytest.approx(1.88, abs=0.01)
  assert stats.wilson(100.0, 20)[1] == 100.0
  assert all(math.isnan(x) for x in stats.wilson(50.0, 0))


def test_t_interval_over_seeds():
  mean, low, high = stats.t_interval([10.0, 20.0, 30.0])
  # t_{0.975, 2} = 4.303; std = 10; half-width = 4.303 * 10 / sqrt(3) = 24.84
  assert mean == 20.0 and high - mean == pytest.approx(24.84, abs=0.01)
  assert mean - low == pytest.approx(24.84, abs=0.01)
  assert stats.t_interval([7.0]) == (7.0, 7.0, 7.0)


def _run(method, seed, hs, fa, refusal):
  return {
    "method": method,
    "seed": seed,
    "p": 0.1,
    "harmful_score": hs,
    "over_refusal": refusal,
    "finetune_accuracy": {"sst2": fa},
    "counts": {"harmful": 200, "harmless": 100, "sst2": 50},
    "filter": None,
    "wall_seconds": 1.0,
  }


def test_demo_summary_groups_seeds_and_keeps_per_seed_values():
  runs = {
    "aligned": {
      "harmful_score": 1.0,
      "over_refusal": 5.0,
      "finetune_accuracy": {"sst2": 0.0},
      "counts": {"harmful": 200, "harmless": 100, "sst2": 50},
      "filter": None,
    },
    **{f"reft|p=0.1|seed={s}": _run("reft", s, hs, 90.0 + s, 10.0) for s, hs in enumerate([0.0, 2.0, 4.0])},
  }
  summary = summarize_methods(runs, ["aligned", "reft"])
  assert list(summary) == ["aligned", "reft"]
  hs = summary["reft"]["harmful_score"]
  assert hs["values"] == [0.0, 2.0, 4.0] and hs["seeds"] == 3 and hs["interval"] == "t over seeds"
  assert hs["mean"] == 2.0 and hs["low"] == 0.0 and 4 < hs["high"] < 100  # clipped at 0%
  assert summary["aligned"]["harmful_score"]["interval"] == "wilson"
  table = summary_table(summary, runs)
  assert "| reft | 3 | 2.0 [" in table and "harmful 200" in table
  # an extra harmless set (eval.harmless_sets) gets its own interval and column
  runs["reft|p=0.1|seed=0"].update(over_refusal_by_set={"harmless": 10.0, "trigger": 20.0})
  runs["reft|p=0.1|seed=0"]["counts"]["trigger"] = 100
  summary = summarize_methods(runs, ["aligned", "reft"])
  assert summary["reft"]["over_refusal_trigger"]["values"] == [20.0]
  assert "over-refusal trigger ↓" in summary_table(summary, runs)


def test_sweep_table_reports_the_95_interval_not_the_std():
  runs = {f"sft|p=0.1|seed={s}": _run("sft", s, hs, 80.0, 0.0) for s, hs in enumerate([10.0, 20.0, 30.0])}
  table = sweep_table(runs, ["sft"], [0.1])
  assert "20.0 ± 24.8 / 80.0 ± 0.0" in table["markdown"]
  assert table["rows"][1][-2] == "10.0 20.0 30.0"


def test_task_answers_get_their_own_length_and_matching_rule(monkeypatch):
  """FA answers are generated with eval.task_max_new_tokens and matched by eval.fa_match."""
  from reft_jax.data.sft import Example
  from reft_jax.eval import run

  lengths = []

  def fake_generate(model, tokenizer, prompts, max_new_tokens, **kw):
    lengths.append(max_new_tokens)
    return ["Positive." for _ in prompts]

  monkeypatch.setattr(run, "generate_texts", fake_generate)
  monkeypatch.setattr(run, "format_prompt", lambda e, template, tok: e.prompt)
  task = {"sst2": [Example("Analyze the sentiment", "positive", input="good", meta={"label": "positive"})]}
  judge = lambda ex, answers: [False] * len(answers)
  judge.name = "none"
  out = run.evaluate(
    None,
    None,
    harmful=[Example("q", "")],
    harmless=[],
    tasks=task,
    judge=judge,
    max_new_tokens=512,
    task_max_new_tokens=200,
    fa_match="official_exact",
  )
  assert lengths == [512, 200] and out["finetune_accuracy"]["sst2"] == 0.0  # "Positive." != "positive"
  out = run.evaluate(None, None, harmful=[], harmless=[], tasks=task, judge=judge, fa_match="official")
  assert out["finetune_accuracy"]["sst2"] == 100.0


def test_real_model_table_reads_results_and_puts_wilson_intervals_on_every_rate(tmp_path):
  import json

  from helpers import load_module

  mod = load_module("benchmarks/real_model_table.py", "real_model_table")
  run = {
    "counts": {"harmful": 100, "harmless": 80, "trigger": 100, "sst2": 100},
    "harmful_score": 20.0,
    "over_refusal_by_set": {"harmless": 5.0, "trigger": 10.0},
    "finetune_accuracy": {"sst2": 97.0},
    "degenerate_by_set": {"harmful": 2.0},
    "filter": {"precision": 1.0, "recall": 0.95, "false_positive_rate": 0.0},
    "wall_seconds": 1500.0,
  }
  (tmp_path / "results.json").write_text(json.dumps({"runs": {"reft": run, "other": {}}}))
  out = mod.table([f"ReFT={tmp_path}:reft"]).splitlines()
  assert out[0].count("|") == out[2].count("|") == 9  # 8 columns: one FA column for sst2
  cells = [c.strip() for c in out[2].strip("|").split("|")]
  lo, hi = stats.wilson(20.0, 100)
  assert cells[:2] == ["ReFT", f"20.0 [{lo:.1f}, {hi:.1f}]"]
  assert cells[-2:] == ["1.00 / 0.95 / 0.00", "25.0"]
  with pytest.raises(SystemExit, match="has no run 'nope'"):
    mod.load_run(f"x={tmp_path}:nope")
  # seeds of one row: each rate's mean with the t-interval over the seeds, the filter cell averaged
  seed = tmp_path / "seed1"
  seed.mkdir()
  other = {**run, "harmful_score": 30.0, "filter": {**run["filter"], "recall": 0.85}, "wall_seconds": 1700.0}
  (seed / "results.json").write_text(json.dumps({"runs": {"reft": other}}))
  cells = [c.strip() for c in mod.table([f"ReFT={tmp_path}:reft+{seed}:reft"]).splitlines()[2].strip("|").split("|")]
  mean, lo, hi = stats.t_interval([20.0, 30.0])
  assert cells[1] == f"25.0 [{max(lo, 0):.1f}, {hi:.1f}]" and mean == 25.0
  assert cells[-2:] == ["1.00 / 0.90 / 0.00", "26.7"]
