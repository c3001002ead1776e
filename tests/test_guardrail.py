"""The guardrail filter baseline: a judge moderates the upload, the audit report is ReFT's."""

import json
import types

import numpy as np
import pytest

from helpers import tiny_config
from reft_jax.config import ConfigError, with_updates
from reft_jax.data.sft import Example
from reft_jax.defences import guardrail
from reft_jax.pipelines.validate import validate

REFUSAL = "I'm sorry, but I can't help with that."


def _upload():
  harmful = [Example(f"Explain how to hurt person {i}", "Sure.", meta={"is_harmful": True}) for i in range(4)]
  task = [Example(f"Review {i}: great film", "positive", meta={"is_harmful": False}) for i in range(16)]
  return task[:8] + harmful + task[8:]


def _env(c):
  return types.SimpleNamespace(c=c, mesh=None, rules=None, tokenizer=None)


def test_refusal_judge_drops_what_the_guard_refuses_and_writes_the_audit(tmp_path, monkeypatch):
  user = _upload()
  calls = []

  def fake_generate(model, tokenizer, prompts, **kw):
    calls.append(len(prompts))
    # The guard refuses three of the four harmful prompts and one task prompt.
    return [REFUSAL if ("person 1" not in p and "hurt" in p) or "Review 3:" in p else "Fine." for p in prompts]

  monkeypatch.setattr(guardrail, "load_frozen", lambda *a: "guard")
  monkeypatch.setattr(guardrail, "generate_texts", fake_generate)
  monkeypatch.setattr(guardrail, "format_prompt", lambda e, template, tok: e.prompt)
  c = with_updates(tiny_config(), **{"train.batch_size": 4})
  kept, summary = guardrail.moderate(_env(c), str(tmp_path), "aligned-dir", user)
  assert calls == [len(user)]
  assert summary["n"] == 20 and summary["kept"] == 16 and summary["judge"] == "refusal"
  assert summary["recall"] == 0.75 and summary["precision"] == 0.75 and summary["false_positive_rate"] == 1 / 16
  assert [e.prompt for e in kept] == [e.prompt for e in user if e.prompt not in kept_out(user)]
  rows = [json.loads(line) for line in open(tmp_path / "guardrail_filter" / "report.jsonl")]
  assert [r["kept"] for r in rows] == [r["guard_answer"] != REFUSAL for r in rows]
  assert [r["score"] for r in rows] == [float(r["guard_answer"] == REFUSAL) for r in rows]
  assert len(open(tmp_path / "guardrail_filter" / "kept.jsonl").readlines()) == 16
  # A rerun reads the audit instead of asking the guard again.
  again, _ = guardrail.moderate(_env(c), str(tmp_path), "aligned-dir", user)
  assert calls == [len(user)] and [e.prompt for e in again] == [e.prompt for e in kept]


def kept_out(user):
  return {e.prompt for e in user if ("hurt" in e.prompt and "person 1" not in e.prompt) or "Review 3:" in e.prompt}


def test_a_guard_that_refuses_nearly_everything_stops_with_one_line(tmp_path, monkeypatch):
  monkeypatch.setattr(guardrail, "load_frozen", lambda *a: "guard")
  monkeypatch.setattr(
    guardrail, "generate_texts", lambda m, t, prompts, **kw: [REFUSAL] * (len(prompts) - 2) + ["ok"] * 2
  )
  monkeypatch.setattr(guardrail, "format_prompt", lambda e, template, tok: e.prompt)
  c = with_updates(tiny_config(), **{"train.batch_size": 4})
  with pytest.raises(ValueError, match="kept 2 of 20 user examples"):
    guardrail.moderate(_env(c), str(tmp_path), "aligned-dir", _upload())
  assert not (tmp_path / "guardrail_filter" / "summary.json").exists()  # nothing marks a failed filter as done


def test_classifier_scores_are_the_max_category_probability_of_each_pair():
  logits = np.array([[-3.0, 2.0, 0.0], [-1.0, -2.0, -0.5], [0.1, 0.0, -4.0]])
  seen = []

  class Judge:
    def scores(self, examples, answers):
      seen.append(answers)
      return logits

  user = _upload()[:3]
  got = guardrail.classifier_scores(Judge(), user)
  np.testing.assert_allclose(got, 1 / (1 + np.exp(-logits.max(axis=1))), rtol=1e-6)
  assert seen == [[e.response for e in user]]  # the (prompt, response) pair is moderated, not the prompt alone
  assert list(got > 0.5) == [True, False, True]


@pytest.mark.parametrize(
  "updates, field",
  [
    ({"guardrail.judge": "llamaguard"}, "guardrail.judge"),
    ({"guardrail.judge": "classifier"}, "guardrail.path"),
    ({"guardrail.threshold": 1.0}, "guardrail.threshold"),
  ],
)
def test_bad_guardrail_settings_name_the_field(updates, field):
  c = with_updates(tiny_config(), **{"method": "guardrail", **updates})
  with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
    validate(c)


def test_the_guardrail_never_reads_refts_audit_in_a_shared_cell(tmp_path, monkeypatch):
  """Defences of one (attack, seed) cell share its directory: ReFT's root/filter/ is not the guardrail's."""
  user = _upload()
  (tmp_path / "filter").mkdir()
  reft = {"n": 20, "kept": 19, "tau": 0.9, "kept_indices": list(range(19))}
  (tmp_path / "filter" / "summary.json").write_text(json.dumps(reft))
  calls = []
  monkeypatch.setattr(guardrail, "load_frozen", lambda *a: "guard")
  monkeypatch.setattr(
    guardrail, "generate_texts", lambda m, t, prompts, **kw: calls.append(1) or ["Fine."] * len(prompts)
  )
  monkeypatch.setattr(guardrail, "format_prompt", lambda e, template, tok: e.prompt)
  c = with_updates(tiny_config(), **{"train.batch_size": 4})
  kept, summary = guardrail.moderate(_env(c), str(tmp_path), "aligned-dir", user)
  assert calls == [1] and summary["kept"] == 20 and summary["judge"] == "refusal"
  assert json.loads((tmp_path / "filter" / "summary.json").read_text()) == reft  # ReFT's audit untouched
