"""ReFT — Refusal-Feature-guided Teacher (METHODS.md §1, our reconstruction).

Stages, each checkpointed and skipped when its outputs exist:
  teacher  from the base model: CE on alignment data + lam * refusal regularizer, R re-estimated
           every K steps on a probe set (or by an EMA of batch means)
  filter   the frozen teacher scores every user prompt by cos(h^l, R); drop scores >= tau
  student  from the base model: CE on the kept user data + beta * KL(teacher || student) on
           alignment data (teacher frozen, passed into the step; or its precomputed top-k logits)
"""

from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from flax import nnx

from reft_jax import distributed as dist
from reft_jax import experiment, losses, refusal
from reft_jax.distributed import to_host
from reft_jax.data import safety_world, sft
from reft_jax.model import save_hf
from reft_jax.train import split_model

log = logging.getLogger(__name__)


def layer_of(c, model) -> int:
  return c.reft.layer if c.reft.layer > 0 else model.cfg.num_layers // 2


# ------------------------------------------------------------------ teacher

def teacher_loss(layer: int, lam: float):
  """CE on every part of the batch (harmful->refusal and harmless->helpful halves) + lam * the
  refusal regularizer against the current direction R (a constant: ctx.extras['R'])."""

  def loss(model, batch, ctx):
    r = jax.lax.stop_gradient(ctx.extras["R"])
    total = count = 0.0
    feats, labels = [], []
    for part in batch.values():
      logits, hidden = model.forward(part["tokens"], part["attention_mask"], hidden_layers=(layer,))
      t, w = losses.next_token_targets(part["tokens"], part["loss_mask"])
      s, n = losses.masked_cross_entropy(logits[:, :-1], t, w)
      total, count = total + s, count + n
      feats.append(jnp.take_along_axis(hidden[layer], part["last_prompt"][:, None, None], 1)[:, 0])
      labels.append(part["is_harmful"])
    h, is_harmful = jnp.concatenate(feats).astype(jnp.float32), jnp.concatenate(labels)
    cos = refusal.cosine(h, r)
    reg = losses.refusal_regularizer(cos, is_harmful)
    w = is_harmful.astype(jnp.float32)
    sum_h, n_h, sum_b, n_b = refusal.class_means(h, is_harmful)
    aux = {"ce": total / jnp.maximum(count, 1), "reg": reg,
           "cos_harmful": jnp.sum(cos * w) / jnp.maximum(jnp.sum(w), 1),
           "cos_harmless": jnp.sum(cos * (1 - w)) / jnp.maximum(jnp.sum(1 - w), 1),
           "_sum_h": sum_h, "_n_h": n_h, "_sum_b": sum_b, "_n_b": n_b}
    # total / count = mean CE + lam * reg
    return total + lam * reg * jnp.maximum(count, 1), count, aux

  return loss


def ema_update(momentum: float):
  """R <- m R + (1 - m) R_batch (momentum 0: R stays, the probe hook re-estimates it)."""

  def update(extras, aux):
    batch_r = aux["_sum_h"] / jnp.maximum(aux["_n_h"], 1) - aux["_sum_b"] / jnp.maximum(aux["_n_b"], 1)
    aux = {k: v for k, v in aux.items() if not k.startswith("_")}
    if momentum <= 0:
      return extras, aux
    return {**extras, "R": momentum * extras["R"] + (1 - momentum) * batch_r}, aux

  return update


def _probe_sets(c, tokenizer):
  """(estimation harmful, estimation harmless, held-out harmful, held-out harmless) prompt sets."""
  harm = experiment.load(c, c.reft.probe_harmful, c.reft.probe_size * 2)
  safe = experiment.load(c, c.reft.probe_harmless, c.reft.probe_size * 2)
  tok = lambda exs: refusal.tokenize_prompts(exs, tokenizer, c.data.seq_len, c.data.template)
  h, s = len(harm) // 2, len(safe) // 2
  return tok(harm[:h]), tok(safe[:s]), tok(harm[h:]), tok(safe[s:])


def teacher_train_config(c):
  """c.train with the teacher's own optimisation overrides (c.teacher)."""
  t = c.train.copy_and_resolve_references()
  with t.unlocked():
    t.update(c.teacher.to_dict())
  return t


def train_teacher(c, workdir, base, tokenizer, mesh, rules):
  layer = layer_of(c, base)
  est_h, est_s, held_h, held_s = _probe_sets(c, tokenizer)
  graphdef, _ = split_model(base)

  def estimate(model):
    fh = refusal.prompt_features(model, est_h, layer, mesh=mesh)
    fs = refusal.prompt_features(model, est_s, layer, mesh=mesh)
    return fh.mean(0) - fs.mean(0)

  def separation(model, r):
    sh = np.asarray(refusal.cosine(refusal.prompt_features(model, held_h, layer, mesh=mesh), r))
    ss = np.asarray(refusal.cosine(refusal.prompt_features(model, held_s, layer, mesh=mesh), r))
    return {"auroc": refusal.auroc(sh, ss), "held_cos_harmful": float(sh.mean()),
            "held_cos_harmless": float(ss.mean())}

  align = experiment.load(c, c.reft.alignment)
  harm = [e for e in align if e.meta.get("is_harmful")]
  safe = [e for e in align if not e.meta.get("is_harmful")]
  if not harm or not safe:
    raise ValueError(f"reft.alignment={c.reft.alignment!r} must hold harmful (is_harmful) and harmless "
                     f"examples; got {len(harm)} harmful and {len(safe)} harmless")
  t = teacher_train_config(c)
  tok = lambda exs: sft.tokenize(exs, tokenizer, align_seq_len(c), c.data.template).trimmed()
  half = max(t.batch_size // 2, 1)
  data = sft.MixedBatcher({"harmful": sft.Batcher(tok(harm), half, seed=c.seed),
                           "harmless": sft.Batcher(tok(safe), half, seed=c.seed + 1)})
  every = c.reft.update_every or max(t.num_steps // 10, 1)
  log_path = os.path.join(workdir, "teacher", "refusal.jsonl")
  os.makedirs(os.path.dirname(log_path), exist_ok=True)

  def refresh(step, state):
    """Probe mode: every K steps, R <- difference of means on the probe set, current weights."""
    if c.reft.ema_momentum > 0 or step % every or step == 0:
      return state
    model = nnx.merge(graphdef, state.params)
    r = estimate(model)
    _append_json(log_path, {"step": step, **separation(model, r)})
    return state.replace(extras={**state.extras, "R": jax.device_put(r, state.extras["R"].sharding)})

  r0 = estimate(base)
  _append_json(log_path, {"step": 0, **separation(base, r0)})
  teacher, history, stopped, extras = experiment.train_stage(
      c, workdir, "teacher", base, data, teacher_loss(layer, c.reft.lam), mesh, rules, train_cfg=t,
      extras={"R": jnp.asarray(r0)}, update_extras=ema_update(c.reft.ema_momentum), before_step=refresh)
  if stopped:
    return None, None, True
  # The direction the filter uses: re-estimated on the final teacher (or the EMA's last value).
  r = np.asarray(extras["R"]) if c.reft.ema_momentum > 0 else estimate(teacher)
  final = {"step": t.num_steps, "layer": layer, **separation(teacher, r)}
  _append_json(log_path, final)
  if dist.is_primary():
    np.save(os.path.join(workdir, "teacher", "refusal_direction.npy"), r)
    with open(os.path.join(workdir, "teacher", "refusal.json"), "w") as f:
      json.dump(final, f, indent=2)
  save_hf(teacher, os.path.join(workdir, "teacher", "model"), tokenizer)
  return teacher, r, False


def _append_json(path: str, record: dict) -> None:
  if dist.is_primary():  # one writer in the shared workdir
    with open(path, "a") as f:
      f.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------ filter

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


def score_prompts(c, teacher, r, tokenizer, examples: list[sft.Example], layer: int, mesh) -> np.ndarray:
  """cos(h^layer, R) of every example's prompt (as data.template renders it, response dropped): [N]."""
  data = refusal.tokenize_prompts(examples, tokenizer, c.data.seq_len, c.data.template)
  return np.asarray(refusal.cosine(refusal.prompt_features(teacher, data, layer, mesh=mesh), r))


def choose_tau(c, teacher, r, tokenizer, layer: int, mesh) -> float:
  """reft.tau_mode's threshold: reft.tau, or calibrated on the held-out half of the probe sets."""
  if c.reft.tau_mode not in ("calibrated", "fpr"):
    return float(c.reft.tau)
  _, _, held_h, held_s = _probe_sets(c, tokenizer)
  held = held_h if c.reft.tau_mode == "calibrated" else held_s
  cal = np.asarray(refusal.cosine(refusal.prompt_features(teacher, held, layer, mesh=mesh), r))
  return (calibrate_tau(cal, c.reft.target_recall) if c.reft.tau_mode == "calibrated"
          else fpr_tau(cal, c.reft.target_fpr))


def label_metrics(flagged: np.ndarray, examples: list[sft.Example]) -> dict:
  """Precision, recall and false-positive rate of `flagged` against the hidden meta['is_harmful']
  labels; None where they are undefined (no labels, nothing flagged, one class absent)."""
  labels = np.asarray([bool(e.meta.get("is_harmful", False)) for e in examples])
  known = all("is_harmful" in e.meta for e in examples)
  tp = int(np.sum(flagged & labels))
  return {"precision": (tp / int(flagged.sum())) if known and flagged.any() else None,
          "recall": (tp / max(int(labels.sum()), 1)) if known and labels.any() else None,
          "false_positive_rate": (float(np.mean(flagged[~labels])) if known and (~labels).any() else None)}


def filter_user_data(c, workdir, teacher, r, tokenizer, user: list[sft.Example], mesh):
  """Scores every user prompt; writes filter/{report.jsonl,kept.jsonl,summary.json}. Resumable: an
  existing summary is reused."""
  out = os.path.join(workdir, "filter")
  summary_path = os.path.join(out, "summary.json")
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      summary = json.load(f)
    return [user[i] for i in summary["kept_indices"]], summary
  layer = layer_of(c, teacher)
  scores = score_prompts(c, teacher, r, tokenizer, user, layer, mesh)
  tau = choose_tau(c, teacher, r, tokenizer, layer, mesh)
  dropped = scores >= tau
  summary = {
      "n": len(user), "kept": int(np.sum(~dropped)), "kept_fraction": float(np.mean(~dropped)),
      "tau": float(tau), "tau_mode": c.reft.tau_mode, "layer": layer,
      **label_metrics(dropped, user),
      "kept_indices": [int(i) for i in np.flatnonzero(~dropped)],
  }
  if summary["kept"] == 0:
    raise ValueError(f"filter: all {len(user)} user examples scored >= tau={tau:.3f} and were dropped; "
                     "nothing is left to fine-tune on (raise reft.tau or check reft.layer)")
  if summary["kept"] == len(user):
    log.warning("filter: no user example scored >= tau=%.3f; all %d kept", tau, len(user))
  if dist.is_primary():
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "report.jsonl"), "w") as f:
      for i, (e, s, d) in enumerate(zip(user, scores, dropped)):
        f.write(json.dumps({"index": i, "score": float(s), "kept": not bool(d),
                            "is_harmful": e.meta.get("is_harmful"), "prompt": e.prompt,
                            "input": e.input}) + "\n")
    safety_world.write_jsonl([user[i] for i in summary["kept_indices"]], os.path.join(out, "kept.jsonl"))
    tmp = summary_path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(summary, f, indent=2)
    os.replace(tmp, summary_path)
  dist.barrier("filter")  # the summary marks the filter done: all processes see it from here on
  return [user[i] for i in summary["kept_indices"]], summary


# ------------------------------------------------------------------ student

def student_loss(beta: float, temperature: float, topk: bool, chunk: int = 0):
  """CE on the (filtered) user batch + beta * mean KL(teacher || student) on the alignment batch.
  chunk > 0: the heads, CE and KL run `chunk` positions at a time (losses.chunked_*), no [B, T, V]."""

  def loss(model, batch, ctx):
    u, a = batch["user"], batch["align"]
    t, w = losses.next_token_targets(u["tokens"], u["loss_mask"])
    _, wa = losses.next_token_targets(a["tokens"], a["loss_mask"])
    if chunk > 0:
      hu = losses.final_hidden(model, u["tokens"], u["attention_mask"])[:, :-1]
      ce, count = losses.chunked_cross_entropy(model, hu, t, w, chunk)
      hs = losses.final_hidden(model, a["tokens"], a["attention_mask"])[:, :-1]
      if topk:
        kl, n = losses.chunked_kl_topk_student(a["topk_logits"][:, :-1], a["topk_ids"][:, :-1], model, hs,
                                               wa, temperature, chunk)
      else:
        ht = losses.final_hidden(ctx.frozen, a["tokens"], a["attention_mask"])[:, :-1]
        kl, n = losses.chunked_kl_teacher_student(ctx.frozen, ht, model, hs, wa, temperature, chunk)
    else:
      ce, count = losses.masked_cross_entropy(model(u["tokens"], u["attention_mask"])[:, :-1], t, w)
      student = model(a["tokens"], a["attention_mask"])[:, :-1]
      if topk:
        kl, n = losses.kl_topk_student(a["topk_logits"][:, :-1], a["topk_ids"][:, :-1], student, wa,
                                       temperature)
      else:
        teacher = jax.lax.stop_gradient(ctx.frozen(a["tokens"], a["attention_mask"]))[:, :-1]
        kl, n = losses.kl_teacher_student(teacher, student, wa, temperature)
    kl_mean = kl / jnp.maximum(n, 1)
    count = jnp.maximum(count, 1)
    return ce + beta * kl_mean * count, count, {"ce": ce / count, "kl": kl_mean}

  return loss


def teacher_topk(teacher, data: sft.TokenizedSet, k: int, batch_size: int = 32):
  """The teacher's top-k logits and token ids at every position, computed once: [N, T, k]."""
  graphdef, state = nnx.split(teacher)
  params = nnx.to_pure_dict(state)

  @jax.jit
  def run(params, tokens, mask):
    vals, ids = jax.lax.top_k(nnx.merge(graphdef, params)(tokens, mask), k)
    return vals.astype(jnp.float32), ids.astype(jnp.int32)

  vals, ids = [], []
  n = len(data)
  for start in range(0, n, batch_size):
    idx = np.arange(start, min(start + batch_size, n))
    idx = np.concatenate([idx, np.full(batch_size - len(idx), idx[-1])])
    v, i = run(params, data.tokens[idx], data.attention_mask[idx])
    keep = min(batch_size, n - start)
    vals.append(to_host(v)[:keep])
    ids.append(to_host(i)[:keep])
  return np.concatenate(vals), np.concatenate(ids)


def align_seq_len(c) -> int:
  return c.reft.align_seq_len or c.data.seq_len


def train_student(c, workdir, base, teacher, tokenizer, kept: list[sft.Example], mesh, rules):
  align = sft.tokenize(experiment.load(c, c.reft.alignment), tokenizer, align_seq_len(c),
                       c.data.template).trimmed()
  frozen = teacher
  if c.reft.topk > 0:
    vals, ids = teacher_topk(teacher, align, c.reft.topk)
    align = align.with_fields(topk_logits=vals, topk_ids=ids)
    frozen = None  # no teacher forward in the step
    log.info("student: teacher top-%d logits cached once: %.1f MB instead of a %.1f MB teacher in "
             "every step", c.reft.topk, (vals.nbytes + ids.nbytes) / 2**20,
             sum(x.nbytes for x in jax.tree.leaves(split_model(teacher)[1])) / 2**20)
  user = sft.tokenize(kept, tokenizer, c.data.seq_len, c.data.template)
  data = sft.MixedBatcher({"user": sft.Batcher(user, c.train.batch_size, seed=c.seed),
                           "align": sft.Batcher(align, c.reft.align_batch_size, seed=c.seed + 7)})
  student, history, stopped, _ = experiment.train_stage(
      c, workdir, "student", base, data, student_loss(c.reft.beta, c.reft.temperature, c.reft.topk > 0,
                                                     c.train.loss_chunk),
      mesh, rules, frozen=frozen)
  if not stopped:
    save_hf(student, os.path.join(workdir, "student", "model"), tokenizer)
  return student, stopped


# ------------------------------------------------------------------ the pipeline

def run(c, workdir: str, hooks=(), teacher_dir: str | None = None) -> dict:
  """teacher_dir: where the teacher stage lives (default: workdir). The teacher does not depend on
  the user data, so a sweep over p shares one."""
  import time

  start = time.perf_counter()
  mesh, rules = experiment.setup_mesh(c)
  user = experiment.read_examples(c)
  tokenizer = experiment.get_tokenizer(c, workdir, user)
  teacher_dir = teacher_dir or workdir
  stage_model = lambda root, stage: experiment.load_frozen(c, os.path.join(root, stage, "model"), mesh, rules)

  if not experiment.finished(teacher_dir, "teacher"):
    base = experiment.build_model(c, mesh, rules, tokenizer)
    _, _, stopped = train_teacher(c, teacher_dir, base, tokenizer, mesh, rules)
    if stopped:
      return {"stopped": True, "history": []}
  # The frozen teacher: its exported (LoRA-merged) weights, sharded on the same mesh as the student.
  teacher = stage_model(teacher_dir, "teacher")
  r = np.load(os.path.join(teacher_dir, "teacher", "refusal_direction.npy"))

  kept, summary = filter_user_data(c, workdir, teacher, r, tokenizer, user, mesh)
  log.info("filter: kept %d of %d (precision %s, recall %s, tau %.3f)", summary["kept"], summary["n"],
           summary["precision"], summary["recall"], summary["tau"])

  if experiment.finished(workdir, "student"):
    student = stage_model(workdir, "student")
  else:
    student, stopped = train_student(c, workdir, experiment.build_model(c, mesh, rules, tokenizer),
                                     teacher, tokenizer, kept, mesh, rules)
    if stopped:
      return {"stopped": True, "history": []}
  out = {"stopped": False, "history": [], "model_dir": os.path.join(workdir, "student", "model")}
  if c.eval.enabled:
    flt = {k: summary[k] for k in ("precision", "recall", "kept_fraction", "tau", "false_positive_rate")}
    out["results"] = experiment.evaluate_and_record(
        c, workdir, student, tokenizer, mesh, "reft",
        {"filter": flt, "wall_seconds": time.perf_counter() - start})
  return out
