"""benchmarks/adaptive_attack.py: the recall-per-budget curves against ReFT's filter and the guardrail's guard,
end to end on tiny random models (--smoke)."""

from __future__ import annotations

import json
import os

import pytest

from helpers import load_module


def _bench():
  return load_module("benchmarks/adaptive_attack.py", "adaptive_bench")


@pytest.mark.slow
def test_the_smoke_attack_draws_one_curve_per_guard_and_breaks_the_planted_filter(tmp_path, capsys):
  out = _bench().main(
    ["--smoke", "--guard", "feature,target", "--budgets", "0,2", "--lam", "1.0", "--out", str(tmp_path / "a.json")]
  )
  assert [c["guard"] for c in out["curves"]] == ["feature", "target"]
  feature, target = ({r["budget"]: r for r in c["rows"]} for c in out["curves"])
  assert list(feature) == ["original", 0, 2]
  # The planted direction flags every original harmful prompt; two GCG steps on the filter's cosine alone
  # (lam 1) lower the mean score and the recall.
  assert feature["original"]["recall"] == 1.0
  assert feature[2]["mean_score"] < feature["original"]["mean_score"] and feature[2]["recall"] < 1.0
  # A random guard model refuses nothing: the guardrail's recall is its refusals, 0 before and after.
  assert all(r["recall"] == 0.0 and r["mean_score"] == 0.0 for r in target.values())
  assert json.load(open(tmp_path / "a.json"))["curves"][1]["guard"] == "target"
  assert os.path.getsize(tmp_path / "a.png") > 1000
  assert "| target | 1.0 | 2 |" in capsys.readouterr().out


def test_an_unknown_guard_is_one_clear_line():
  with pytest.raises(SystemExit, match="--guard 'moderation': each must be one of feature, target"):
    _bench().main(["--smoke", "--guard", "moderation"])
