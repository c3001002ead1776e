"""ReFT's filter: the frozen teacher scores every user prompt by cos(h^l, R) at its layer and drops those
scoring >= tau (fixed, or calibrated on held-out probe prompts); also what `reft-jax screen` runs."""

from __future__ import annotations

import json
import logging
import os

import numpy as np

from reft_jax import distributed as dist
from reft_jax import refusal
from reft_jax.config import check
from reft_jax.data import sft
from reft_jax.data.formats import write_jsonl
from reft_jax.data.load import load

log = logging.getLogger(__name__)


AUTO_LAYER = -1  # reft.layer=-1: the teacher picks its layer on the base model (select_layer)
TAU_MODES = ("fixed", "calibrated", "fpr", "youden")  # reft.tau_mode (choose_tau)


def layer_of(c, model) -> int:
  return c.reft.layer if c.reft.layer > 0 else model.cfg.num_layers // 2


def d_prime(harm: np.ndarray, safe: np.ndarray) -> float:
  """d' of two score samples: (mean difference) / pooled standard deviation. Unlike the AUROC it keeps
  ranking layers once both reach 1.0 on a small held-out set (a margin generalises; a rank does not)."""
  pooled = np.sqrt((np.var(harm) + np.var(safe)) / 2) + 1e-8
  return float((np.mean(harm) - np.mean(safe)) / pooled)


def select_layer(model, probes, mesh=None, first: int = 2) -> tuple[int, list[dict]]:
  """The layer (of first..num_layers) whose difference-of-means direction, estimated on the probe sets'
  estimation halves, best separates their held-out halves (d', then AUROC): the provider's own sets, never
  an evaluation set. probes: probe_sets' four sets. Returns (layer, one row per layer)."""
  est_h, est_s, held_h, held_s = probes
  layers = tuple(range(first, model.cfg.num_layers + 1))
  f = [refusal.prompt_features(model, d, layers, mesh=mesh) for d in (est_h, est_s, held_h, held_s)]
  rows = []
  for j, layer in enumerate(layers):
    r = f[0][:, j].mean(0) - f[1][:, j].mean(0)
    sh, ss = (np.asarray(refusal.cosine(x[:, j], r)) for x in f[2:])
    rows.append({"layer": layer, "d_prime": d_prime(sh, ss), "auroc": refusal.auroc(sh, ss)})
  best = max(rows, key=lambda row: (row["d_prime"], row["auroc"]))
  return best["layer"], rows


def probe_sets(c, tokenizer):
  """(estimation harmful, estimation harmless, held-out harmful, held-out harmless) prompt sets."""
  harm = load(c, c.reft.probe_harmful, c.reft.probe_size * 2)
  safe = load(c, c.reft.probe_harmless, c.reft.probe_size * 2)
  tok = lambda exs: refusal.tokenize_prompts(exs, tokenizer, c.data.seq_len, c.data.template)
  h, s = len(harm) // 2, len(safe) // 2
  return tok(harm[:h]), tok(safe[:s]), tok(harm[h:]), tok(safe[s:])


def calibrate_tau(harmful_scores: np.ndarray, target_recall: float) -> float:
  """The largest tau such that at least target_recall of the held-out harmful prompts score >= tau
  (i.e. would be dropped)."""
  s = np.sort(np.asarray(harmful_scores))[::-1]
  k = int(np.ceil(target_recall * len(s)))
  return float(s[max(k - 1, 0)])


def fpr_tau(harmless_scores: np.ndarray, target_fpr: float) -> float:
  """The smallest tau that drops at most target_fpr of the held-out harmless prompts (scores > the
  (1 - target_fpr) quantile), i.e. a false-positive budget instead of a recall target."""
  s = np.sort(np.asarray(harmless_scores))[::-1]
  k = int(np.floor(target_fpr * len(s)))  # harmless prompts allowed at or above tau
  return float(np.nextafter(s[k], np.inf)) if k < len(s) else float(s[-1])


def youden_tau(harmful_scores: np.ndarray, harmless_scores: np.ndarray) -> float:
  """The tau that best separates the held-out probe halves: maximal Youden's J = recall - false-positive
  rate; among the gaps between sorted scores that reach it, the middle of the widest (a margin on both
  sides, where a recall quantile sits on the lowest harmful scores and an fpr quantile on the highest
  harmless ones)."""
  harm, safe = np.asarray(harmful_scores, np.float64), np.asarray(harmless_scores, np.float64)
  v = np.unique(np.concatenate([harm, safe]))
  if len(v) == 1:
    return float(v[0])
  mids = (v[:-1] + v[1:]) / 2  # every distinct split of the pooled scores
  j = (harm[None] >= mids[:, None]).mean(1) - (safe[None] >= mids[:, None]).mean(1)
  best = np.flatnonzero(np.isclose(j, j.max()))
  return float(mids[best[np.argmax(np.diff(v)[best])]])


def score_prompts(c, teacher, r, tokenizer, examples: list[sft.Example], layer: int, mesh) -> np.ndarray:
  """cos(h^layer, R) of every example's prompt (as data.template renders it, response dropped): [N]."""
  data = refusal.tokenize_prompts(examples, tokenizer, c.data.seq_len, c.data.template)
  return np.asarray(refusal.cosine(refusal.prompt_features(teacher, data, layer, mesh=mesh), r))


def choose_tau(c, teacher, r, tokenizer, layer: int, mesh) -> float:
  """reft.tau_mode's threshold: reft.tau, or calibrated on the held-out halves of the probe sets."""
  mode = c.reft.tau_mode
  if mode == "fixed":
    return float(c.reft.tau)
  _, _, held_h, held_s = probe_sets(c, tokenizer)
  score = lambda d: np.asarray(refusal.cosine(refusal.prompt_features(teacher, d, layer, mesh=mesh), r))
  if mode == "calibrated":
    return calibrate_tau(score(held_h), c.reft.target_recall)
  if mode == "fpr":
    return fpr_tau(score(held_s), c.reft.target_fpr)
  return youden_tau(score(held_h), score(held_s))


def label_metrics(flagged: np.ndarray, examples: list[sft.Example]) -> dict:
  """Precision, recall and false-positive rate of `flagged` against the hidden meta['is_harmful']
  labels; None where they are undefined (no labels, nothing flagged, one class absent)."""
  labels = np.asarray([bool(e.meta.get("is_harmful", False)) for e in examples])
  known = all("is_harmful" in e.meta for e in examples)
  tp = int(np.sum(flagged & labels))
  return {
    "precision": (tp / int(flagged.sum())) if known and flagged.any() else None,
    "recall": (tp / max(int(labels.sum()), 1)) if known and labels.any() else None,
    "false_positive_rate": (float(np.mean(flagged[~labels])) if known and (~labels).any() else None),
  }


def validate_filter(c) -> None:
  """The filter's guard rails, reft.min_kept and reft.warn_dropped."""
  check(c.reft.min_kept >= 0, "reft.min_kept", c.reft.min_kept, "must be >= 0 (0 = train.batch_size)")
  check(0 <= c.reft.warn_dropped <= 1, "reft.warn_dropped", c.reft.warn_dropped, "must lie in [0, 1]")


def _suspect(name: str) -> str:
  """What to check when a filter drops most of an upload: ReFT's threshold and layer, or the guardrail's guard."""
  return "reft.tau / reft.layer is off" if name == "filter" else "the guard flags task prompts (guardrail.*)"


def check_kept(c, summary: dict, name: str = "filter") -> None:
  """Raises when the filter kept fewer than reft.min_kept examples (the student would train on a handful,
  repeated in every batch); warns when it dropped more than reft.warn_dropped of the user data."""
  n, kept = summary["n"], summary["kept"]
  need = c.reft.min_kept or c.train.batch_size
  if kept < need:
    raise ValueError(
      f"filter: kept {kept} of {n} user examples (tau={summary['tau']:.3f}), fewer than "
      f"reft.min_kept={need}: too few to fine-tune on (the upload is nearly all harmful, or {_suspect(name)}; "
      "lower reft.min_kept to train on them anyway)"
    )
  if n - kept > c.reft.warn_dropped * n:
    log.warning(
      "!!! %s: dropped %d of %d user examples (%.0f%% > reft.warn_dropped=%.0f%%): the upload is mostly "
      "harmful, or %s; the student trains on the %d kept",
      name,
      n - kept,
      n,
      100 * (n - kept) / n,
      100 * c.reft.warn_dropped,
      _suspect(name),
      kept,
    )


def filter_user_data(c, workdir, teacher, r, tokenizer, user: list[sft.Example], mesh, layer: int = 0):
  """Scores every user prompt at `layer` (the one R was taken at; 0 = layer_of); writes
  filter/{report.jsonl,kept.jsonl,summary.json}. Resumable: an existing summary is reused."""
  done = read_audit(c, workdir, user)
  if done is not None:
    return done
  layer = layer or layer_of(c, teacher)
  scores = score_prompts(c, teacher, r, tokenizer, user, layer, mesh)
  tau = choose_tau(c, teacher, r, tokenizer, layer, mesh)
  return write_audit(c, workdir, user, scores, tau, {"tau_mode": c.reft.tau_mode, "layer": layer})


def read_audit(c, workdir, user: list[sft.Example], name: str = "filter"):
  """(kept, summary) of a filter that already ran in workdir/<name>, else None."""
  summary_path = os.path.join(workdir, name, "summary.json")
  if not os.path.exists(summary_path):
    return None
  with open(summary_path) as f:
    summary = json.load(f)
  check_kept(c, summary, name)
  return [user[i] for i in summary["kept_indices"]], summary


def write_audit(
  c, workdir, user: list[sft.Example], scores: np.ndarray, tau: float, fields: dict, texts=None, name: str = "filter"
):
  """Drops the examples scoring >= tau; writes the audit report every filter shares,
  workdir/<name>/{report.jsonl (score per example), kept.jsonl, summary.json (written last: the filter's
  done mark)}: each filtering defence its own <name>, as cells share a workdir. `fields` go into the summary;
  `texts` (optional, one per example) into the report (e.g. the guard's answer). Returns (kept, summary)."""
  out = os.path.join(workdir, name)
  summary_path = os.path.join(out, "summary.json")
  dropped = np.asarray(scores) >= tau
  summary = {
    "n": len(user),
    "kept": int(np.sum(~dropped)),
    "kept_fraction": float(np.mean(~dropped)),
    "tau": float(tau),
    **fields,
    **label_metrics(dropped, user),
    "kept_indices": [int(i) for i in np.flatnonzero(~dropped)],
  }
  if summary["kept"] == 0:
    raise ValueError(
      f"filter: all {len(user)} user examples scored >= tau={tau:.3f} and were dropped; "
      "nothing is left to fine-tune on (raise the threshold, reft.tau or guardrail.threshold, or check reft.layer)"
    )
  check_kept(c, summary, name)
  if summary["kept"] == len(user):
    log.warning("filter: no user example scored >= tau=%.3f; all %d kept", tau, len(user))
  if dist.is_primary():
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "report.jsonl"), "w") as f:
      for i, (e, s, d) in enumerate(zip(user, scores, dropped)):
        row = {
          "index": i,
          "score": float(s),
          "kept": not bool(d),
          "is_harmful": e.meta.get("is_harmful"),
          "prompt": e.prompt,
          "input": e.input,
        }
        if texts is not None:
          row["guard_answer"] = texts[i]
        f.write(json.dumps(row) + "\n")
    write_jsonl([user[i] for i in summary["kept_indices"]], os.path.join(out, "kept.jsonl"))
    tmp = summary_path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(summary, f, indent=2)
    os.replace(tmp, summary_path)
  dist.barrier("filter")  # the summary marks the filter done: all processes see it from here on
  return [user[i] for i in summary["kept_indices"]], summary
