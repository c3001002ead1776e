"""Post-hoc safety restoration (Yang et al., IEEE S&P 2025; METHODS.md §7), after the official
kangyangWHU/LLMAlignment `sgdg_rollback_final.py` (AlignParamRollback) and `run_recover_exp.py`.

theta_A: aligned weights, theta_F: fine-tuned. On the model truncated to its first
k = floor(2/3 L) blocks, h(x; theta) is the residual after block k at the last prompt token.
d_h = mean h(harmful prompts; theta_A), d_b = mean h(task prompts; theta_F). A direction loss is
sum over batches of -cos(batch mean h, d) (the official loop calls backward once per batch).

One restore step: g = grad of the harmful loss; candidates are the non-norm weights of blocks [0, k)
where moving theta to theta_A is a descent direction (theta - theta_A and g have the same strict
sign; weights already equal to theta_A never are); the threshold is the c-th largest |g| of the
candidates with c = ceil(rate x all decoder-block parameters, every layer and norms included), and
the candidates with |g| strictly above it are set to theta_A. Outside the rollback phase g
accumulates over the steps (the official code never zeroes `.grad` there and carries it across
devices on purpose); in the rollback phase it is fresh each step.
One rollback (after a restore step): the benign loss's gradient g_b; candidates are this step's
restored weights where moving back to theta_F is a descent direction of it; those with |g_b| strictly
above the ceil(rollback_frac x #candidates)-th largest go back to theta_F.

Run: `warmup_steps` restore steps; then the task metric. Below min_task_ratio x the fine-tuned
model's metric: restart from theta_F and run all `steps` steps with rollback; else continue to
`steps` without. The result is the official checkpoint choice: the metric is read every `eval_every`
steps (and at the last); at the first checkpoint with metric <= min_task_ratio x original, the
previous checkpoint (theta_F at step 0) is the result, else the last one. (Documented choice: with
an original metric <= 0 there is no minimum to keep.)
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from reft_jax import refusal
from reft_jax.config import check
from reft_jax.data import sft
from reft_jax.defences.registry import Defence, register
from reft_jax.defences.sft import aligned_stage, user_sft
from reft_jax.eval.metrics import percent, task_correct
from reft_jax.generate import generate_texts
from reft_jax.model import load_hf, save_hf
from reft_jax.stages import finished, model_dir


@dataclasses.dataclass(frozen=True)
class RestoreConfig:
  rate: float = 0.002  # restored per step, as a share of all decoder-block parameters
  steps: int = 20
  warmup_steps: int = 5  # restore steps before the task metric decides on rollback
  rollback_frac: float = 0.2  # share of each step's rollback candidates sent back to theta_F
  min_task_ratio: float = 0.95  # official metric_drop = 0.05
  layer_fraction: float = 2 / 3  # official layer_end_mapping: floor(2L/3)
  eval_every: int = 5  # official save_step: checkpoints whose task metric picks the result
  batch_size: int = 8  # official run_recover_exp batch size (one cosine per batch)


def _is_norm(path: tuple) -> bool:
  # The official code skips parameters named "*layernorm*" (HF Llama/Gemma/Mistral/Qwen2 norms).
  return any("norm" in str(p) for p in path)


def edit_mask(blocks: dict, k: int) -> dict:
  """True on the non-norm weights of blocks [0, k) (block params are stacked on axis 0)."""

  def one(path, v):
    keep = np.zeros(v.shape[0], bool)
    if not _is_norm(path):
      keep[:k] = True
    return jnp.broadcast_to(jnp.asarray(keep).reshape((-1,) + (1,) * (v.ndim - 1)), v.shape)

  return jax.tree_util.tree_map_with_path(lambda p, v: one(tuple(getattr(e, "key", e) for e in p), v), blocks)


@jax.jit
def descent_candidates(theta: dict, target: dict, grad: dict, allowed: dict) -> tuple[dict, jax.Array]:
  """Entries of `allowed` where moving theta to target decreases the loss to first order (the
  official get_select_mask: (theta - target) and grad both < 0 or both > 0); and their count."""

  def one(t, a, g, m):
    d = t.astype(jnp.float32) - a.astype(jnp.float32)
    return m & (((d < 0) & (g < 0)) | ((d > 0) & (g > 0)))

  se = jax.tree.map(one, theta, target, grad, allowed)
  return se, sum(jnp.sum(m, dtype=jnp.int32) for m in jax.tree.leaves(se))


@jax.jit
def above_kth(grad: dict, candidates: dict, k) -> dict:
  """Candidates whose |grad| is strictly above the k-th largest candidate |grad| (the official
  find_threshold + get_threshold_mask: k - 1 entries when the scores are distinct); none if k < 1."""
  flat = jnp.concatenate(
    [
      jnp.where(m, jnp.abs(g).astype(jnp.float32), -jnp.inf).ravel()
      for g, m in zip(jax.tree.leaves(grad), jax.tree.leaves(candidates))
    ]
  )
  thr = jnp.sort(flat)[flat.size - jnp.maximum(k, 1)]
  return jax.tree.map(lambda g, m: m & (jnp.abs(g).astype(jnp.float32) > thr) & (k >= 1), grad, candidates)


@jax.jit
def assign(theta: dict, source: dict, mask: dict) -> dict:
  return jax.tree.map(lambda t, s, m: jnp.where(m, s, t), theta, source, mask)


def _count(mask: dict) -> int:
  return int(sum(int(jnp.sum(m)) for m in jax.tree.leaves(mask)))


@functools.lru_cache(maxsize=8)
def _direction_grad_fn(graphdef, k: int):
  """(params, batches, target) -> (sum over batches of -cos(batch mean h^k, target), its gradient
  w.r.t. params["blocks"] in float32)."""

  @jax.jit
  def run(params, tokens_NBT, mask_NBT, last_NB, weight_NB, target_D):
    rest = {n: v for n, v in params.items() if n != "blocks"}

    def loss(blocks, batch):
      tokens, mask, last, w = batch
      h = refusal.last_prompt_features(nnx.merge(graphdef, {**rest, "blocks": blocks}), tokens, mask, last, k)
      mean = jnp.sum(h * w[:, None], 0) / jnp.maximum(jnp.sum(w), 1.0)
      return -refusal.cosine(mean[None], target_D)[0]

    def body(carry, batch):
      v, g = jax.value_and_grad(loss)(params["blocks"], batch)
      return (carry[0] + v, jax.tree.map(lambda a, b: a + b.astype(jnp.float32), carry[1], g)), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params["blocks"])
    init = (jnp.zeros((), jnp.float32), zeros)
    return jax.lax.scan(body, init, (tokens_NBT, mask_NBT, last_NB, weight_NB))[0]

  return run


def _batches(data: sft.TokenizedSet, batch_size: int) -> tuple:
  """[num_batches, batch_size, ...] arrays; the last batch is padded with zero-weight rows."""
  data = data.trimmed()
  n = len(data)
  nb = -(-n // batch_size)
  idx = np.concatenate([np.arange(n), np.zeros(nb * batch_size - n, int)])
  w = (np.arange(nb * batch_size) < n).astype(np.float32)
  shape = lambda a: jnp.asarray(a[idx].reshape((nb, batch_size) + a.shape[1:]))
  last = np.minimum(data.last_prompt, data.tokens.shape[1] - 1)
  return (shape(data.tokens), shape(data.attention_mask), shape(last), jnp.asarray(w.reshape(nb, batch_size)))


def _split(model):
  graphdef, state = nnx.split(model)
  return graphdef, nnx.to_pure_dict(state)


def restore_safety(
  aligned,
  finetuned,
  harmful: sft.TokenizedSet,
  cfg: RestoreConfig = RestoreConfig(),
  task_metric=None,
  benign: sft.TokenizedSet | None = None,
):
  """Returns (restored model, report). harmful / benign: prompts-only TokenizedSets
  (refusal.tokenize_prompts) of harmful prompts and of the task's training prompts.
  task_metric(model) -> score (higher is better) drives the restart and the checkpoint choice;
  without it (or without benign prompts, which the rollback needs) every step restores, no rollback."""
  k = max(1, int(cfg.layer_fraction * aligned.cfg.num_layers))
  (graphdef, pa), (_, pf) = _split(aligned), _split(finetuned)
  allowed = edit_mask(pa["blocks"], k)
  per_step = int(math.ceil(sum(int(v.size) for v in jax.tree.leaves(pa["blocks"])) * cfg.rate))  # get_total_param
  grad_fn = _direction_grad_fn(graphdef, k)
  harm = _batches(harmful, cfg.batch_size)
  d_h = jnp.asarray(refusal.prompt_features(aligned, harmful, k).mean(0))
  can_rollback = benign is not None and len(benign) > 0
  if can_rollback:  # the benign batches and direction d_b
    ben, d_b = _batches(benign, cfg.batch_size), jnp.asarray(refusal.prompt_features(finetuned, benign, k).mean(0))

  def step(theta, acc, i, phase):
    value, g = grad_fn(theta, *harm, d_h)
    if acc is not None and phase != "rollback":
      g = jax.tree.map(jnp.add, acc, g)  # `.grad` keeps accumulating outside the rollback phase
    se, n = descent_candidates(theta["blocks"], pa["blocks"], g, allowed)
    restored = above_kth(g, se, min(per_step, int(n)))
    blocks = assign(theta["blocks"], pa["blocks"], restored)
    neg_cos = float(value) / harm[0].shape[0]  # mean over batches
    rec = {"step": i, "phase": phase, "neg_cos": neg_cos, "restored": _count(restored), "rolled_back": 0}
    if phase == "rollback":
      _, gb = grad_fn({**theta, "blocks": blocks}, *ben, d_b)
      se_b, n_b = descent_candidates(blocks, pf["blocks"], gb, restored)
      back = above_kth(gb, se_b, int(math.ceil(cfg.rollback_frac * int(n_b))))
      blocks = assign(blocks, pf["blocks"], back)
      rec["rolled_back"] = _count(back)
    history.append(rec)
    return {**theta, "blocks": blocks}, (None if phase == "rollback" else g)

  model_of = lambda p: nnx.merge(graphdef, p)
  history, checkpoints = [], []
  report = {"edited_layers": k, "per_step": per_step, "restarted": False, "task_before": None, "task_warmup": None}
  minimum, previous, chosen = None, (pf, 0), None

  def checkpoint(theta, at, score=None) -> bool:
    """The metric at a checkpoint; True (stop) at the first one <= the minimum: its predecessor is the result."""
    nonlocal previous, chosen
    score = float(task_metric(model_of(theta))) if score is None else score
    checkpoints.append({"step": at, "task": score})
    if score <= minimum:
      chosen = previous
      return True
    previous = (theta, at)
    return False

  theta, acc, warm = pf, None, min(cfg.warmup_steps, cfg.steps)
  for i in range(warm):
    theta, acc = step(theta, acc, i, "warmup")
  start, phase, stop = warm, "restore", False
  if task_metric is not None:
    before = float(task_metric(finetuned))
    # A model with no task skill left (metric <= 0) has nothing to protect: with a minimum of 0 the
    # official `<=` pick would always return theta_F.
    minimum = cfg.min_task_ratio * before if before > 0 else -math.inf
    score = float(task_metric(model_of(theta)))
    report.update(task_before=before, task_warmup=score)
    if score < minimum and can_rollback:  # restart from theta_F; every step rolls back
      theta, acc, start, phase = pf, None, 0, "rollback"
      report["restarted"] = True
    elif warm:
      stop = checkpoint(theta, warm, score)  # the warm-up model is always saved and evaluated
  for i in range(start, cfg.steps if not stop else start):
    theta, acc = step(theta, acc, i, phase)
    if minimum is not None and ((i + 1) % cfg.eval_every == 0 or i + 1 == cfg.steps) and checkpoint(theta, i + 1):
      break
  chosen_theta, chosen_step = chosen if chosen is not None else (theta, cfg.steps)
  _finish_report(report, history, checkpoints, chosen_theta, chosen_step, pf)
  return model_of(chosen_theta), report


def _finish_report(report: dict, history: list, checkpoints: list, theta: dict, at: int, pf: dict) -> None:
  scores = {0: report["task_before"], **{c["step"]: c["task"] for c in checkpoints}}
  changed = jax.tree.map(lambda c, f: c != f, theta["blocks"], pf["blocks"])
  report.update(
    history=history,
    checkpoints=checkpoints,
    checkpoint=at,
    task_after=scores.get(at),
    restored_weights=_count(changed),
    rolled_back=sum(r["rolled_back"] for r in history),
  )


# ---------------------------------------------------------------- the defence


def posthoc(env, root: str, aligned_dir: str, tuned_dir: str, user) -> tuple[str, dict]:
  """Restores the align-then-fine-tune model toward the aligned one: the benign direction comes from up to
  256 benign user prompts (the official task training prompts); the task metric for the restart rule and
  the checkpoint choice is the finetune accuracy on 64 labelled benign user examples."""
  c = env.c
  if finished(root, "restore"):
    return model_dir(root, "restore"), {}
  load = lambda path: load_hf(path, c.model.param_dtype, env.mesh, rules=env.rules)
  aligned_model, finetuned = load(aligned_dir), load(tuned_dir)
  harmful = refusal.tokenize_prompts(
    env.load(c.reft.probe_harmful, c.reft.probe_size), env.tokenizer, c.data.seq_len, c.data.template
  )
  plain = [e for e in user if not e.meta.get("is_harmful")]
  benign = refusal.tokenize_prompts(plain[:256], env.tokenizer, c.data.seq_len, c.data.template) if plain else None
  labelled = [e for e in plain if "label" in e.meta][:64]
  metric = None
  if labelled:
    prompts = [sft.format_prompt(e, c.data.template, env.tokenizer) for e in labelled]

    def metric(model):
      answers = generate_texts(
        model,
        env.tokenizer,
        prompts,
        batch_size=c.eval.batch_size,
        max_new_tokens=c.eval.task_max_new_tokens or c.eval.max_new_tokens,
      )
      return percent(
        task_correct(e.meta.get("task", "sst2"), a, str(e.meta["label"]), c.eval.fa_match)
        for e, a in zip(labelled, answers)
      )

  r = c.restore
  cfg = RestoreConfig(
    rate=r.rate,
    steps=r.steps,
    warmup_steps=r.warmup_steps,
    rollback_frac=r.rollback_frac,
    min_task_ratio=r.min_task_ratio,
  )
  model, report = restore_safety(aligned_model, finetuned, harmful, cfg, metric, benign)
  save_hf(model, model_dir(root, "restore"), env.tokenizer)
  keys = (
    "edited_layers",
    "per_step",
    "restored_weights",
    "rolled_back",
    "restarted",
    "checkpoint",
    "task_before",
    "task_warmup",
    "task_after",
  )
  return model_dir(root, "restore"), {"restore": {k: report.get(k) for k in keys}}


def _validate(c):
  rs = c.restore
  check(0 < rs.rate <= 1, "restore.rate", rs.rate, "must lie in (0, 1]")
  check(
    rs.steps >= 1 and 0 <= rs.warmup_steps <= rs.steps,
    "restore.steps/warmup_steps",
    (rs.steps, rs.warmup_steps),
    "steps must be >= 1 and 0 <= warmup_steps <= steps",
  )
  check(0 <= rs.rollback_frac <= 1, "restore.rollback_frac", rs.rollback_frac, "must lie in [0, 1]")
  check(0 < rs.min_task_ratio <= 1, "restore.min_task_ratio", rs.min_task_ratio, "must lie in (0, 1]")


RESTORE = register(
  Defence(
    "restore",
    "align-then-fine-tune, then a share of the weights restored toward the aligned model",
    finetune=user_sft("sft_aligned"),
    align=aligned_stage,
    posthoc=posthoc,
    section="restore",
    # Per-step restore share, warm-up steps, rollback share; restart from the fine-tuned weights when the
    # task metric falls below min_task_ratio x the original.
    defaults={"rate": 0.002, "steps": 20, "warmup_steps": 5, "rollback_frac": 0.2, "min_task_ratio": 0.95},
    validate=_validate,
    source="Yang et al., IEEE S&P 2025; kangyangWHU/LLMAlignment",
  )
)
