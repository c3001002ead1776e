"""User-data construction: harmful ratio, attack variants and the mimicking defence data."""

import pytest

from reft_jax.data import attacks
from reft_jax.data.sft import Example, format_prompt

TASK = [Example("Analyze.", "positive", input=f"film {i}", meta={"task": "sst2"}) for i in range(50)]
HARM = [Example(f"how to steal car {i}", f"first get a crowbar {i}", meta={"category": "theft"})
        for i in range(30)]


@pytest.mark.parametrize("n,p,k", [(40, 0.1, 4), (40, 0.0, 0), (40, 0.25, 10), (33, 0.1, 3)])
def test_harmful_ratio_counts_and_hidden_labels(n, p, k):
  data = attacks.mix_harmful(TASK, HARM, n, p, seed=1)
  assert len(data) == n
  harmful = [e for e in data if e.meta["is_harmful"]]
  assert len(harmful) == k and all(e.prompt.startswith("how to steal") for e in harmful)
  assert all(not e.meta["is_harmful"] for e in data if e.prompt == "Analyze.")
  assert len({(e.prompt, e.input) for e in data}) == n  # sampled without replacement
  assert attacks.mix_harmful(TASK, HARM, n, p, seed=1) == data  # deterministic
  if 0 < k < n:
    assert [e.meta["is_harmful"] for e in data] != sorted(e.meta["is_harmful"] for e in data)  # shuffled


def test_errors_name_the_problem():
  with pytest.raises(ValueError, match="need 40 examples but the pool has only 30"):
    attacks.mix_harmful(TASK, HARM, 40, 1.0)
  with pytest.raises(ValueError, match="p=1.5"):
    attacks.mix_harmful(TASK, HARM, 10, 1.5)
  with pytest.raises(ValueError, match="attack='jailbreak'"):
    attacks.build_user_data("jailbreak", TASK, HARM, 10, 0.1)


def test_attack_variants():
  benign = attacks.build_user_data("benign", TASK, HARM, 20, 0.5)
  assert not any(e.meta["is_harmful"] for e in benign)
  aoa = attacks.build_user_data("aoa", TASK, HARM, 10, 0.5)
  assert len(aoa) == 10 and not any(e.meta["is_harmful"] for e in aoa)
  assert all(e.system == attacks.AOA_SYSTEM and e.response.startswith(attacks.AOA_PREFIX) for e in aoa)
  assert format_prompt(aoa[0]).startswith(attacks.AOA_SYSTEM)
  aoa_task = attacks.build_user_data("aoa_task", TASK, HARM, 20, 0.25)
  assert sum(e.meta["is_harmful"] for e in aoa_task) == 5
  assert all(e.system == attacks.AOA_SYSTEM for e in aoa_task)


def test_mimic_safety_data_takes_the_users_format():
  refusals = [Example(h.prompt, "I cannot help with that.") for h in HARM]
  user = attacks.build_user_data("aoa_task", TASK, HARM, 20, 0.0)
  safety = attacks.mimic_safety(refusals, user, ratio=0.1, seed=0)
  assert len(safety) == 2
  for e in safety:
    assert e.system == attacks.AOA_SYSTEM  # the user's system prompt
    assert e.response == f"{attacks.AOA_PREFIX} I cannot help with that."  # the user's answer format
    assert e.meta["kind"] == "mimic_safety"
  plain = attacks.mimic_safety(refusals, TASK, ratio=0.1)
  assert all(e.system == "" and e.response == "I cannot help with that." for e in plain)
