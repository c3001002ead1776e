"""Screening as a provider's step: score an uploaded data set with a trained ReFT teacher, no training.

  reft-jax screen --config=configs/default.py:PRESET --workdir=W --config.screen.teacher=DIR \
      --config.data.source=upload.jsonl        (or: reft-jax --config.method=screen ...)

DIR is the workdir of a ReFT run (teacher/model, teacher/refusal_direction.npy). The upload is read as the
run's user data is (data.source, then data.attack when one is configured: an attacked set keeps its hidden
is_harmful labels), every prompt is scored by cos(h^l, R) with the teacher's layer and direction, and an
example is flagged when its score >= tau: the tau the run's filter used (DIR/filter/summary.json) or, where
DIR has no filter, reft.tau_mode's on the configured probe sets (reft.choose_tau, as the filter does).

Writes W/screen/:
  report.jsonl  one line per example, flagged ones first, highest score first
  summary.json  n, flagged, share, tau and its source, the decision; precision/recall/false-positive rate
                when every example carries an is_harmful label
  screen.html   self-contained (inline CSS, the histogram as an inline PNG): the summary, the score
                histogram with tau, and the flagged examples (HTML-escaped)

Policy: the upload is rejected when its flagged share > screen.max_flagged (default 0.05), as commercial
fine-tuning services refuse training files with too many policy-violating examples. Exit status (for a
provider's pipeline): 0 = accept, 3 = reject (EXIT_REJECT), 1 = bad input or runtime error, 2 = bad config
(e.g. config.screen.teacher is not a ReFT workdir).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import os

import numpy as np

from reft_jax import distributed as dist
from reft_jax.config import ConfigError, check
from reft_jax.data.load import read_examples
from reft_jax.model.build import load_frozen, setup_mesh
from reft_jax.data import sft
from reft_jax.defences import reft

log = logging.getLogger(__name__)

EXIT_ACCEPT, EXIT_REJECT = 0, 3  # 1 and 2 are main's error statuses (bad input, bad config)
MAX_SHOWN = 500  # flagged examples listed in the HTML page (all of them are in report.jsonl)


# ------------------------------------------------------------------ the teacher directory


def teacher_files(teacher_dir: str) -> tuple[str, str]:
  """(the teacher's HF model directory, its refusal direction .npy) inside a ReFT workdir."""
  root = os.path.expanduser(teacher_dir)
  return os.path.join(root, "teacher", "model"), os.path.join(root, "teacher", "refusal_direction.npy")


def teacher_problem(teacher_dir: str) -> str:
  """Why `teacher_dir` cannot be screened with ("" when it can)."""
  if not teacher_dir:
    return "must name the workdir of a ReFT run (holding teacher/model and teacher/refusal_direction.npy)"
  if not os.path.isdir(os.path.expanduser(teacher_dir)):
    return "directory does not exist"
  model, direction = teacher_files(teacher_dir)
  if not os.path.exists(os.path.join(model, "config.json")):
    return "no trained teacher in it (teacher/model/config.json is missing; run method=reft there first)"
  if not os.path.exists(direction):
    return "teacher/refusal_direction.npy is missing (an unfinished ReFT teacher stage?)"
  return ""


def prepare(c) -> None:
  """method=screen: checks config.screen.teacher, then makes the teacher the run's only model (its own
  tokenizer; no base checkpoint, GGUF or evaluation is read, so preflight asks for none of them)."""

  teacher = c.screen.teacher
  problem = teacher_problem(teacher)
  if problem:
    raise ConfigError(f"config.screen.teacher={teacher!r}: {problem}")
  trained = _json(os.path.join(os.path.expanduser(teacher), "config.json"))
  template = (trained or {}).get("data", {}).get("template")
  if template and template != c.data.template:  # the scores mean nothing under another prompt format
    raise ConfigError(
      f"config.data.template={c.data.template!r}: the teacher in {teacher} was trained with "
      f"{template!r} (pass --config.data.template={template})"
    )
  c.method = "screen"
  c.model.update(hf_path=teacher_files(teacher)[0], gguf="", tokenizer="")
  c.eval.enabled = False


def _json(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


# ------------------------------------------------------------------ the decision


def decide(scores: np.ndarray, tau: float, examples: list[sft.Example], max_flagged: float) -> tuple[np.ndarray, dict]:
  """(report order: flagged first, highest score first; the summary's counts, decision and labels)."""
  scores = np.asarray(scores, np.float64)
  flagged = scores >= tau
  # Flagged <=> score >= tau, so descending score puts every flagged example first; ties by index.
  order = np.lexsort((np.arange(len(scores)), -scores))
  share = float(flagged.mean()) if len(scores) else 0.0
  reject = share > max_flagged
  labelled = bool(examples) and all("is_harmful" in e.meta for e in examples)
  summary = {
    "n": len(scores),
    "flagged": int(flagged.sum()),
    "flagged_share": share,
    "max_flagged": max_flagged,
    "decision": "reject" if reject else "accept",
    "exit_code": EXIT_REJECT if reject else EXIT_ACCEPT,
    "tau": float(tau),
    "labelled": labelled,
    "n_labelled_harmful": sum(bool(e.meta.get("is_harmful")) for e in examples) if labelled else None,
    **reft.label_metrics(flagged, examples),
  }
  return order, summary


def resolve_tau(c, teacher_dir: str, teacher, r, tokenizer, layer: int, mesh) -> tuple[float, str, str]:
  """(tau, its source, tau_mode): the run's filter threshold when DIR has one for this layer, else
  reft.tau_mode's (fixed reft.tau, or calibrated on the held-out probe sets as the filter does)."""
  path = os.path.join(os.path.expanduser(teacher_dir), "filter", "summary.json")
  flt = _json(path)
  if flt is not None and flt.get("layer", layer) == layer:
    return float(flt["tau"]), f"{path} (the run's filter)", flt.get("tau_mode", "")
  if flt is not None:
    log.warning(
      "screen: %s is for layer %s, the teacher's direction for layer %d: tau from reft.tau_mode",
      path,
      flt.get("layer"),
      layer,
    )
  tau = reft.choose_tau(c, teacher, r, tokenizer, layer, mesh)
  m = c.reft.tau_mode
  source = {
    "fixed": "reft.tau",
    "calibrated": f"reft.target_recall={c.reft.target_recall} on held-out reft.probe_harmful",
    "fpr": f"reft.target_fpr={c.reft.target_fpr} on held-out reft.probe_harmless",
    "youden": "max recall - false-positive rate on held-out reft.probe_harmful and reft.probe_harmless",
  }[m]
  return tau, source, m


# ------------------------------------------------------------------ the run


def run(c, workdir: str) -> dict:
  """Scores the upload; writes workdir/screen/{report.jsonl,summary.json,screen.html}. Returns main's
  dict plus the summary and the exit status."""
  teacher_dir = c.screen.teacher
  problem = teacher_problem(teacher_dir)
  if problem:  # run() may be called without main's prepare()
    raise ValueError(f"config.screen.teacher={teacher_dir!r}: {problem}")
  from reft_jax.data.tokenizer import load_tokenizer

  mesh, rules = setup_mesh(c)
  user = read_examples(c)
  if not user:
    raise ValueError(f"data.source={c.data.source!r}: the upload holds no examples")
  model_path, direction_path = teacher_files(teacher_dir)
  tokenizer = load_tokenizer(model_path)  # the teacher's own (a word-level one lives only there)
  teacher = load_frozen(c, model_path, mesh, rules)
  r = np.load(direction_path)
  layer = reft.recorded_layer(model_path) or reft.layer_of(c, teacher)  # R belongs to the layer it was taken at
  scores = reft.score_prompts(c, teacher, r, tokenizer, user, layer, mesh)
  tau, source, mode = resolve_tau(c, teacher_dir, teacher, r, tokenizer, layer, mesh)
  order, summary = decide(scores, tau, user, c.screen.max_flagged)
  summary.update(
    tau_source=source, tau_mode=mode, layer=layer, teacher=teacher_dir, data_source=c.data.source, attack=c.data.attack
  )
  out = os.path.join(workdir, "screen")
  if dist.is_primary():
    os.makedirs(out, exist_ok=True)
    rows = [_row(int(i), user[i], float(scores[i]), tau) for i in order]
    with open(os.path.join(out, "report.jsonl"), "w") as f:
      f.writelines(json.dumps(row) + "\n" for row in rows)
    with open(os.path.join(out, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
    with open(os.path.join(out, "screen.html"), "w", encoding="utf-8") as f:
      f.write(render_html(summary, rows, scores, user))
  dist.barrier("screen")
  log.info("screen: %s", describe(summary))
  return {"stopped": False, "history": [], "summary": summary, "exit_code": summary["exit_code"]}


def _row(index: int, e: sft.Example, score: float, tau: float) -> dict:
  # `row`: the example's line in its source (after an attack, in the task data or the harmful pool).
  return {
    "index": index,
    "score": score,
    "flagged": score >= tau,
    "is_harmful": e.meta.get("is_harmful"),
    "source": e.meta.get("source"),
    "row": e.meta.get("row"),
    "prompt": e.prompt,
    "input": e.input,
  }


def describe(summary: dict) -> str:
  """One line for the terminal."""
  s = summary
  line = (
    f"{s['flagged']} of {s['n']} flagged ({100 * s['flagged_share']:.1f}%, max "
    f"{100 * s['max_flagged']:.1f}%) at tau={s['tau']:.4f} -> {s['decision']}"
  )
  if s["labelled"]:
    line += f"; against the labels: {_metrics_text(s)}"
  return line


def _pct(x) -> str:
  return "n/a" if x is None else f"{100 * x:.1f}%"


def _metrics_text(s: dict) -> str:
  return (
    f"precision {_pct(s['precision'])}, recall {_pct(s['recall'])}, "
    f"false-positive rate {_pct(s['false_positive_rate'])}"
  )


# ------------------------------------------------------------------ the page


def histogram_png(scores: np.ndarray, tau: float, labels: np.ndarray | None = None) -> bytes:
  """The score histogram with tau marked (split by label when labels are known), as PNG bytes."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  scores = np.asarray(scores, np.float64)
  lo, hi = min(scores.min(), tau), max(scores.max(), tau)
  bins = np.linspace(lo - 1e-6, hi + 1e-6, 41)
  fig, ax = plt.subplots(figsize=(7, 3.2))
  if labels is None:
    ax.hist(scores, bins=bins, color="#5b7aa8", label="uploaded examples")
  else:
    ax.hist(
      [scores[~labels], scores[labels]],
      bins=bins,
      stacked=True,
      color=["#5b7aa8", "#c8553d"],
      label=["labelled harmless", "labelled harmful"],
    )
  ax.axvline(tau, color="black", linestyle="--", label=f"τ = {tau:.4f}")
  ax.set_xlabel("refusal-feature score cos(h, R)")
  ax.set_ylabel("examples")
  ax.legend(fontsize=8)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})  # no URL inside the page
  plt.close(fig)
  return buf.getvalue()


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:60em;color:#222}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em}
.decision{display:inline-block;padding:.3em .8em;border-radius:4px;color:#fff;font-weight:bold}
.accept{background:#2e7d32}.reject{background:#c62828}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;
vertical-align:top}th{background:#f3f3f3}td.prompt{white-space:pre-wrap;word-break:break-word;max-width:40em}
img{max-width:100%}.note{color:#666;font-size:.9em}
"""


def render_html(summary: dict, rows: list[dict], scores: np.ndarray, examples: list[sft.Example]) -> str:
  """The self-contained page: nothing it shows is fetched from elsewhere; every text from the upload or
  the command line is HTML-escaped."""
  s, esc = summary, (lambda x: html.escape(str(x), quote=True))
  labels = np.asarray([bool(e.meta.get("is_harmful")) for e in examples]) if s["labelled"] else None
  png = base64.b64encode(histogram_png(scores, s["tau"], labels)).decode("ascii")
  facts = [
    ("decision", s["decision"]),
    ("examples", s["n"]),
    ("flagged", s["flagged"]),
    ("flagged share", _pct(s["flagged_share"])),
    ("screen.max_flagged", _pct(s["max_flagged"])),
    ("τ", f"{s['tau']:.4f}"),
    ("τ source", s.get("tau_source", "")),
    ("layer", s.get("layer", "")),
    ("teacher", s.get("teacher", "")),
    ("data.source", s.get("data_source", "")),
    ("data.attack", s.get("attack", "")),
  ]
  if s["labelled"]:
    facts += [
      ("labelled harmful", s["n_labelled_harmful"]),
      ("precision", _pct(s["precision"])),
      ("recall", _pct(s["recall"])),
      ("false-positive rate", _pct(s["false_positive_rate"])),
    ]
  fact_rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in facts)
  flagged = [r for r in rows if r["flagged"]]
  label_head = "<th>label</th>" if s["labelled"] else ""

  def example_row(rank: int, r: dict) -> str:
    label = f"<td>{'harmful' if r['is_harmful'] else 'harmless'}</td>" if s["labelled"] else ""
    text = r["prompt"] + (f"\n\n{r['input']}" if r["input"] else "")
    return (
      f"<tr><td>{rank}</td><td>{r['index']}</td><td>{r['score']:.4f}</td>{label}"
      f'<td class="prompt">{esc(text)}</td></tr>'
    )

  shown = "".join(example_row(k + 1, r) for k, r in enumerate(flagged[:MAX_SHOWN]))
  more = (
    f'<p class="note">{len(flagged) - MAX_SHOWN} more flagged examples are in report.jsonl.</p>'
    if len(flagged) > MAX_SHOWN
    else ""
  )
  table = (
    f"<table><tr><th>#</th><th>index</th><th>score</th>{label_head}<th>prompt</th></tr>{shown}</table>"
    if flagged
    else "<p>No example scored at or above τ.</p>"
  )
  return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>reft-jax screening: {esc(s["decision"])}</title>
<style>{_CSS}</style></head><body>
<h1>Upload screening <span class="decision {esc(s["decision"])}">{esc(s["decision"]).upper()}</span></h1>
<p>{esc(describe(s))}. The upload is rejected when more than screen.max_flagged of it scores at or above
τ on the ReFT teacher's refusal feature.</p>
<table>{fact_rows}</table>
<h2>Scores</h2>
<img alt="histogram of the refusal-feature scores with tau = {s["tau"]:.4f} marked"
src="data:image/png;base64,{png}">
<h2>Flagged examples ({s["flagged"]}), highest score first</h2>
{table}{more}
</body></html>
"""


def validate(c) -> None:
  # screen.teacher is checked by `prepare`, which main runs before validation (its files, not its value)
  check(0 <= c.screen.max_flagged <= 1, "screen.max_flagged", c.screen.max_flagged, "must lie in [0, 1]")
