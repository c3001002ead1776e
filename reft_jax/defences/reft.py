"""ReFT — Refusal-Feature-guided Teacher (METHODS.md §1, our reconstruction).

Stages (registered as the defence "reft"; each checkpointed and skipped when its outputs exist):
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
from reft_jax import files
from reft_jax import losses, refusal
from reft_jax.config import BUILD_ALIGNMENT, check
from reft_jax.data import sft
from reft_jax.data.load import load
from reft_jax.defences.reft_filter import (  # noqa: F401  (the filter's vocabulary, re-exported)
  AUTO_LAYER,
  TAU_MODES,
  calibrate_tau,
  choose_tau,
  filter_user_data,
  fpr_tau,
  label_metrics,
  layer_of,
  probe_sets,
  score_prompts,
  select_layer,
  youden_tau,
)
from reft_jax.defences.registry import Defence, register
from reft_jax.defences.reft_student import student_loss, teacher_topk  # noqa: F401  (re-exported)
from reft_jax.defences.sft import alignment_budget
from reft_jax.model import read_hf_config
from reft_jax.model.hf import resolve_checkpoint
from reft_jax.model.build import load_frozen
from reft_jax.stages import Env, MethodState, StageSpec
from reft_jax.train import split_model

log = logging.getLogger(__name__)


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
    aux = {
      "ce": total / jnp.maximum(count, 1),
      "reg": reg,
      "cos_harmful": jnp.sum(cos * w) / jnp.maximum(jnp.sum(w), 1),
      "cos_harmless": jnp.sum(cos * (1 - w)) / jnp.maximum(jnp.sum(1 - w), 1),
      "_sum_h": sum_h,
      "_n_h": n_h,
      "_sum_b": sum_b,
      "_n_b": n_b,
    }
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


def teacher_stage(env: Env) -> StageSpec:
  """The teacher: from the base model, CE on the alignment data (harmful and harmless halves in every
  batch) + lam * the refusal regularizer; R re-estimated on the probe set every K steps (or an EMA)."""
  c, tokenizer, mesh = env.c, env.tokenizer, env.mesh
  probes = probe_sets(c, tokenizer)
  est_h, est_s, held_h, held_s = probes
  out_dir = os.path.join(env.shared_dir, "teacher")
  layer = teacher_layer(env, probes, out_dir)

  def estimate(model):
    fh = refusal.prompt_features(model, est_h, layer, mesh=mesh)
    fs = refusal.prompt_features(model, est_s, layer, mesh=mesh)
    return fh.mean(0) - fs.mean(0)

  def separation(model, r):
    sh = np.asarray(refusal.cosine(refusal.prompt_features(model, held_h, layer, mesh=mesh), r))
    ss = np.asarray(refusal.cosine(refusal.prompt_features(model, held_s, layer, mesh=mesh), r))
    return {"auroc": refusal.auroc(sh, ss), "held_cos_harmful": float(sh.mean()), "held_cos_harmless": float(ss.mean())}

  align = load(c, c.reft.alignment)
  harm = [e for e in align if e.meta.get("is_harmful")]
  safe = [e for e in align if not e.meta.get("is_harmful")]
  if not harm or not safe:
    raise ValueError(
      f"reft.alignment={c.reft.alignment!r} must hold harmful (is_harmful) and harmless "
      f"examples; got {len(harm)} harmful and {len(safe)} harmless"
    )
  budget = alignment_budget(env)
  tok = lambda exs: env.tokenize(exs, align_seq_len(c)).trimmed()
  half = max(budget["batch_size"] // 2, 1)
  data = sft.MixedBatcher(
    {"harmful": sft.Batcher(tok(harm), half, seed=c.seed), "harmless": sft.Batcher(tok(safe), half, seed=c.seed + 1)}
  )
  every = c.reft.update_every or max(budget["num_steps"] // 10, 1)
  log_path = os.path.join(out_dir, "refusal.jsonl")

  def setup(base):
    graphdef, _ = split_model(base)

    def refresh(step, state):
      """Probe mode: every K steps, R <- difference of means on the probe set, current weights."""
      if c.reft.ema_momentum > 0 or step % every or step == 0:
        return state
      model = nnx.merge(graphdef, state.params)
      r = estimate(model)
      _append_json(log_path, {"step": step, **separation(model, r)})
      return state.replace(extras={**state.extras, "R": jax.device_put(r, state.extras["R"].sharding)})

    os.makedirs(out_dir, exist_ok=True)
    r0 = estimate(base)
    _append_json(log_path, {"step": 0, **separation(base, r0)})
    return MethodState({"R": jnp.asarray(r0)}, update=ema_update(c.reft.ema_momentum), before_step=refresh)

  def finish(teacher, extras):
    # The direction the filter uses: re-estimated on the final teacher (or the EMA's last value).
    r = np.asarray(extras["R"]) if c.reft.ema_momentum > 0 else estimate(teacher)
    final = {"step": budget["num_steps"], "layer": layer, **separation(teacher, r)}
    _append_json(log_path, final)
    if dist.is_primary():
      np.save(os.path.join(out_dir, "refusal_direction.npy"), r)
      with open(os.path.join(out_dir, "refusal.json"), "w") as f:
        json.dump(final, f, indent=2)

  return StageSpec(
    "teacher", data, init=env.base_path, loss=teacher_loss(layer, c.reft.lam), train=budget, setup=setup, finish=finish
  )


def teacher_layer(env: Env, probes, out_dir: str) -> int:
  """reft.layer; 0 = num_layers // 2; AUTO_LAYER = select_layer on the base model, chosen once and kept in
  out_dir/layer.json (a resumed run, the filter and `screen` use the same layer)."""
  c = env.c
  if c.reft.layer != AUTO_LAYER:
    return c.reft.layer or read_hf_config(resolve_checkpoint(env.base_path)).num_layers // 2  # a hub name too
  path = os.path.join(out_dir, "layer.json")
  if os.path.exists(path):
    with open(path) as f:
      return int(json.load(f)["layer"])
  layer, rows = select_layer(load_frozen(c, env.base_path, env.mesh, env.rules), probes, env.mesh)
  log.info("teacher: refusal-feature layer %d chosen on the probe sets' held-out halves (base model)", layer)
  if dist.is_primary():
    os.makedirs(out_dir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
      json.dump({"layer": layer, "criterion": "d_prime, then auroc", "rows": rows}, f, indent=2)
    os.replace(path + ".tmp", path)
  return layer


def recorded_layer(teacher_dir: str) -> int:
  """The layer a trained teacher's direction belongs to (its refusal.json), 0 when it records none."""
  path = os.path.join(os.path.dirname(teacher_dir), "refusal.json")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return int(json.load(f).get("layer") or 0)


def _append_json(path: str, record: dict) -> None:
  """One whole line (a torn tail from a killed run is cut first), by the one writer of the shared workdir."""
  if dist.is_primary():
    files.repair_tail(path)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
      files.append_line(fd, json.dumps(record) + "\n")
    finally:
      os.close(fd)


# ------------------------------------------------------------------ student


def align_seq_len(c) -> int:
  return c.reft.align_seq_len or c.data.seq_len


def student_stage(env: Env, root: str, teacher_dir: str, user: list[sft.Example]) -> StageSpec:
  """The frozen teacher filters the user data (root/filter); the student, from the base model, trains on
  what is kept while distilling the teacher on the alignment data."""
  c = env.c
  teacher = load_frozen(c, teacher_dir, env.mesh, env.rules)  # exported (LoRA-merged), on the student's mesh
  r = np.load(os.path.join(os.path.dirname(teacher_dir), "refusal_direction.npy"))
  kept, summary = filter_user_data(c, root, teacher, r, env.tokenizer, user, env.mesh, recorded_layer(teacher_dir))
  log.info(
    "filter: kept %d of %d (precision %s, recall %s, tau %.3f)",
    summary["kept"],
    summary["n"],
    summary["precision"],
    summary["recall"],
    summary["tau"],
  )
  align = env.tokenize(load(c, c.reft.alignment), align_seq_len(c)).trimmed()
  frozen = teacher
  if c.reft.topk > 0:
    vals, ids = teacher_topk(teacher, align, c.reft.topk)
    align = align.with_fields(topk_logits=vals, topk_ids=ids)
    frozen = None  # no teacher forward in the step
    log.info(
      "student: teacher top-%d logits cached once: %.1f MB instead of a %.1f MB teacher in every step",
      c.reft.topk,
      (vals.nbytes + ids.nbytes) / 2**20,
      sum(x.nbytes for x in jax.tree.leaves(split_model(teacher)[1])) / 2**20,
    )
  data = sft.MixedBatcher(
    {
      "user": sft.Batcher(env.tokenize(kept).trimmed(), c.train.batch_size, seed=c.seed),
      "align": sft.Batcher(align, c.reft.align_batch_size, seed=c.seed + 7),
    }
  )
  layer = recorded_layer(teacher_dir) or layer_of(c, teacher)
  feature = (layer, r, c.reft.student_lam) if c.reft.student_lam > 0 else None
  loss = student_loss(c.reft.beta, c.reft.temperature, c.reft.topk > 0, c.train.loss_chunk, feature)
  flt = {k: summary[k] for k in ("precision", "recall", "kept_fraction", "tau", "false_positive_rate")}
  return StageSpec("student", data, init=env.base_path, loss=loss, frozen=frozen, record={"filter": flt})


def _validate(c):
  r = c.reft
  check(r.layer >= AUTO_LAYER, "reft.layer", r.layer, "must be >= 0 (0 = num_layers // 2) or -1 (chosen on the probes)")
  check(
    min(r.lam, r.beta, r.student_lam) >= 0, "reft.lam/beta/student_lam", (r.lam, r.beta, r.student_lam), "must be >= 0"
  )
  check(r.temperature > 0, "reft.temperature", r.temperature, "must be positive")
  check(0 <= r.ema_momentum < 1, "reft.ema_momentum", r.ema_momentum, "must lie in [0, 1)")
  check(r.tau_mode in TAU_MODES, "reft.tau_mode", r.tau_mode, f"must be one of {', '.join(TAU_MODES)}")
  check(0 <= r.target_fpr < 1, "reft.target_fpr", r.target_fpr, "must lie in [0, 1)")
  check(0 < r.target_recall <= 1, "reft.target_recall", r.target_recall, "must lie in (0, 1]")
  check(
    r.align_seq_len == 0 or r.align_seq_len >= 8,
    "reft.align_seq_len",
    r.align_seq_len,
    "must be 0 (= data.seq_len) or >= 8",
  )
  check(r.probe_size >= 2, "reft.probe_size", r.probe_size, "must be >= 2")
  check(
    r.topk >= 0 and r.align_batch_size > 0,
    "reft.topk/align_batch_size",
    (r.topk, r.align_batch_size),
    "topk must be >= 0 and align_batch_size positive",
  )
  if r.alignment == BUILD_ALIGNMENT:
    a = c.alignment
    for f in ("harmful", "harmless"):
      check(bool(a[f]), f"alignment.{f}", a[f], "must name a source when reft.alignment=build")
    check(
      a.n_harmful >= 0 and a.n_harmless >= 0,
      "alignment.n_harmful/n_harmless",
      (a.n_harmful, a.n_harmless),
      "must be >= 0 (0 = all)",
    )
    check(a.max_new_tokens > 0, "alignment.max_new_tokens", a.max_new_tokens, "must be positive")
  for f in ("lr", "num_steps", "batch_size"):
    check(c.teacher[f] > 0, f"teacher.{f}", c.teacher[f], "must be positive")
  check(
    c.teacher.batch_size >= 2,
    "teacher.batch_size",
    c.teacher.batch_size,
    "must be >= 2 (every batch holds both classes)",
  )


REFT = register(
  Defence(
    "reft",
    "refusal-feature-guided teacher: filter the user data, distil the teacher while fine-tuning",
    finetune=student_stage,
    align=teacher_stage,
    section="reft",
    validate=_validate,
    source="ReFT (METHODS.md §1; our reconstruction)",
    defaults=dict(
      layer=0,  # refusal-feature layer; 0 = num_layers // 2; -1 = chosen on the probe sets (select_layer)
      lam=1.0,  # weight of the refusal regularizer
      update_every=0,  # re-estimate R on the probe set every K teacher steps; 0 = 1/10 of training
      ema_momentum=0.0,  # > 0: R <- m R + (1 - m) R_batch instead of probe re-estimation
      probe_size=256,  # prompts per class: half estimate R, half measure the held-out separation
      probe_harmful="world:probe_harmful",
      probe_harmless="world:probe_harmless",
      alignment="world:alignment",  # harmful -> refusal and harmless -> helpful, with is_harmful
      # fixed | calibrated (largest tau with recall >= target_recall on held-out harmful probes) |
      # fpr (smallest tau that flags at most target_fpr of the held-out harmless probes) |
      # youden (max recall - false-positive rate on both held-out halves, mid-gap)
      tau=0.0,
      tau_mode="fixed",
      target_recall=0.99,
      target_fpr=0.01,
      beta=1.0,
      temperature=1.0,  # distillation weight and temperature
      student_lam=0.0,  # > 0: + the refusal regularizer on the student's features against the teacher's R
      topk=0,  # > 0: cache the teacher's top-k logits once instead of a teacher forward per step
      align_batch_size=8,
      align_seq_len=0,  # alignment examples' length cap (teacher and distillation); 0 = data.seq_len
      # The filter's guard rails (reft_filter.check_kept): fewer kept user examples than min_kept is an error
      # (0 = one batch, train.batch_size); dropping more than warn_dropped of them warns loudly.
      min_kept=0,
      warn_dropped=0.5,
    ),
  )
)
