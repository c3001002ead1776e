"""Antidote (Huang et al., ICML 2025), after the official git-disl/Antidote @ 26e2ade: `utils.py`
(prune_wanda_outlier, find_layers, WrappedGPT), `trainer.py` (AntidoteTrainer.save_mask), `train.py`
(the realignment set and `param.data *= (1 - bad_mask)`) and `script/finetune/antidote_poison_ratio.sh`.

After align-then-fine-tune, one-shot pruning of the weights most important on a harmful *realignment*
set (harmful prompt + harmful answer pairs disjoint from the attack's), by the Wanda score

  S_ij = |W_ij| * ||X_j||_2     X_j: input feature j of that linear map over every token of the set

ranked within each output row (HF's [out, in] rows: each output unit ranks its inputs; official
`torch.sort(W_metric, dim=-1, stable=True)`): in each row the I - int(I (1 - dense_ratio)) highest-scored
entries form the harmful mask and are set to zero. The activations are the fine-tuned model's (one
forward pass; the masks never change the model while they are computed). ||X_j||^2 is summed over the
tokens here and averaged over samples officially, a positive factor per layer that leaves every
ranking unchanged; padding (the official runs batches of one) is left out.

What is scored (official find_layers):
  LoRA (train.mode=lora): the fine-tuning adapter's factors, as the official prunes its PEFT
    adapter over the merged aligned model: A (HF lora_A [r, in], its input the module's input x) and
    B (lora_B [out, r], its input x A), for every LoRA target module. The fine-tuning stage
    (`antidote_sft`) keeps its adapter in antidote_sft/lora.npz; the result is W_aligned + (alpha/r) A'B'.
  full fine-tuning (any other mode): the fine-tuned q, k, v weights themselves (`--full_finetuning
    True`), from sft_aligned's fine-tuned model.

Defaults: dense_ratio 0.1 (antidote_poison_ratio.sh, LoRA), dense_ratio_full 1e-5
(antidote_poison_ratio_full.sh), up to 2,000 harmful examples (bad_sample_num; officially BeaverTails
unsafe rows 5001-6999, the attack's rows start at 0).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from reft_jax import distributed as dist
from reft_jax import sharding as shd
from reft_jax.config import check
from reft_jax.data import sft
from reft_jax.defences.registry import Defence, register
from reft_jax.defences.sft import aligned_stage, disjoint_harmful_set, user_sft
from reft_jax.files import write_atomic
from reft_jax.model import load_hf, save_hf
from reft_jax.model.layers import LORA_SITES as SITES
from reft_jax.model.build import run_options
from reft_jax.stages import Env, StageSpec, finished, model_dir

FULL_TARGETS = ("q", "k", "v")  # official find_layers with full_finetuning: q_proj, k_proj, v_proj
FINETUNE_LORA = "antidote_sft"  # the LoRA fine-tuning stage, which keeps its adapter
ADAPTER = "lora.npz"


# ---------------------------------------------------------------- the math (pure)


def n_in_dims(target: str) -> int:
  return 2 if target == "o" else 1  # o contracts (heads, head_dim)


def wanda_scores(w_LIO, sq_LI):
  """|W| * ||X||_2 for W [L, I, O] (our layout: inputs on axis 1) and the summed squared inputs [L, I]."""
  return jnp.abs(w_LIO.astype(jnp.float32)) * jnp.sqrt(sq_LI.astype(jnp.float32))[:, :, None]


def harmful_mask(score_LIO, dense_ratio: float):
  """True on the I - int(I (1 - dense_ratio)) highest scores of every output unit (axis 1 ranked per (L, O)),
  the official per-row selection: a stable ascending sort whose last entries form the mask (so among equal
  scores the later inputs are masked first)."""
  n = score_LIO.shape[1]
  kept = int(n * (1 - dense_ratio))  # official: int(W_metric.shape[1] * layer_sparsity_ratio)
  order = jnp.argsort(score_LIO, axis=1, stable=True)
  rank = jnp.argsort(order, axis=1)  # each entry's position in the ascending order
  return rank >= kept


def prune(w, mask):
  """W * (1 - mask) (official `param.data *= (1 - bad_mask[name])`)."""
  return jnp.where(mask.reshape(w.shape), jnp.zeros((), w.dtype), w)


@functools.partial(jax.jit, static_argnums=2)
def _mask(w_LIO, sq_LI, dense_ratio: float):
  return harmful_mask(wanda_scores(w_LIO, sq_LI), dense_ratio)


def _as_rows(w, n_in: int):
  """A stacked [L, *in, *out] tensor as [L, I, O]."""
  return w.reshape(w.shape[0], math.prod(w.shape[1 : 1 + n_in]), -1)


def prune_params(blocks: dict, stats: dict, dense_ratio: float, lora: bool) -> tuple[dict, dict]:
  """blocks: the decoder blocks' pure params; stats: {target: {"x": [L, *in] summed squared inputs, "h": [L, r]
  summed squared x A}} (activation_stats). Prunes each target's kernel (full) or its lora_a and lora_b (LoRA);
  returns (blocks, {"pruned": n, "scored": n})."""
  blocks = jax.tree.map(lambda x: x, blocks)  # a copy of the nesting: the caller's dict is left alone
  pruned = scored = 0
  for t, s in stats.items():
    module = blocks[SITES[t][0]][SITES[t][1]]
    n_in = n_in_dims(t)
    x = s["x"].reshape(s["x"].shape[0], -1)
    # (weight name, [L, I, O] view, its input statistics [L, I])
    if lora:
      parts = [("lora_a", _as_rows(module["lora_a"], n_in), x), ("lora_b", _as_rows(module["lora_b"], 1), s["h"])]
    else:
      parts = [("kernel", _as_rows(module["kernel"], n_in), x)]
    for name, w, sq in parts:
      mask = _mask(w, sq, dense_ratio)
      module[name] = prune(module[name], mask)
      pruned += int(jnp.sum(mask))
      scored += int(mask.size)
  return blocks, {"pruned": pruned, "scored": scored}


# ---------------------------------------------------------------- the inputs of each linear map

_SINK: contextvars.ContextVar = contextvars.ContextVar("antidote_sink")


class _Recorder(nnx.Module):
  """Wraps one Linear of a private copy of the model: adds sum(mask x^2) over batch and time of its input
  (and of x A when it has a LoRA adapter) to the active sink, then runs it unchanged."""

  def __init__(self, inner, target: str):
    self.inner, self.target = inner, target

  def __call__(self, x):
    mask, sink = _SINK.get()
    # where, not a product: nothing computed at a left-out position (e.g. NaN) can reach the sums
    sq = lambda a: jnp.sum(
      jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 2)) > 0, jnp.square(a.astype(jnp.float32)), 0.0), axis=(0, 1)
    )
    rec = sink.setdefault(self.target, {"x": [], "h": []})
    rec["x"].append(sq(x))
    lin = self.inner
    if lin.lora_a is not None:  # lora_B's input: lora_A(x) (no dropout), before the alpha/r scale
      rec["h"].append(sq(jnp.tensordot(x.astype(lin.dtype), lin.lora_a[...].astype(lin.dtype), axes=lin.n_in)))
    return lin(x)


def _instrumented(model, targets) -> tuple:
  """(graphdef, params) of a copy of `model` whose target Linears record their inputs (the model is untouched)."""
  graphdef, state = nnx.split(model)
  copy = nnx.merge(graphdef, state)
  for t in targets:
    parent = getattr(copy.blocks, SITES[t][0])
    setattr(parent, SITES[t][1], _Recorder(getattr(parent, SITES[t][1]), t))
  graphdef, state = nnx.split(copy)
  return graphdef, nnx.to_pure_dict(state)


@functools.lru_cache(maxsize=8)
def _stats_fn(graphdef, mesh=None):
  @jax.jit
  def run(params, tokens, mask, rows):
    model = nnx.merge(graphdef, params)
    sink = {}
    token = _SINK.set((mask * rows[:, None], sink))  # the real tokens of the real rows
    try:
      with shd.activation_sharding(mesh) if mesh is not None else contextlib.nullcontext():
        model.forward(tokens, mask, stop_after=model.cfg.num_layers)
    finally:
      _SINK.reset(token)
    # Layers run unrolled, in order: the i-th record of a target is block i's.
    return {t: {k: jnp.stack(v) for k, v in r.items() if v} for t, r in sink.items()}

  return run


def activation_stats(model, data: sft.TokenizedSet, targets, batch_size: int = 8, mesh=None) -> dict:
  """{target: {"x": [L, *in], "h": [L, r] (LoRA)}}: each target Linear's input squared and summed over the
  real tokens of `data` (the Wanda statistic). The model must run its layers unrolled (scan_layers=False,
  remat="none"): the records are collected while the forward is traced."""
  if model.options.scan_layers or model.options.remat != "none":
    raise ValueError("activation_stats needs a model loaded with scan_layers=False and remat='none'")
  graphdef, params = _instrumented(model, targets)
  fn = _stats_fn(graphdef, mesh)
  data = data.trimmed()
  n, total = len(data), None
  for start in range(0, n, batch_size):
    idx = np.arange(start, min(start + batch_size, n))
    mask = data.attention_mask[idx]
    tokens = data.tokens[idx]
    rows = (np.arange(batch_size) < len(idx)).astype(mask.dtype)
    if len(idx) < batch_size:  # a fixed batch shape (one compile): copies of the last row, left out of the sums
      fill = batch_size - len(idx)
      tokens, mask = (np.concatenate([a, np.repeat(a[-1:], fill, 0)]) for a in (tokens, mask))
    arrays = (tokens, mask, rows)
    if mesh is not None:
      arrays = tuple(dist.put(a, shd.batch_sharding(mesh, ndim=a.ndim)) for a in arrays)
    out = fn(params, *arrays)
    total = out if total is None else jax.tree.map(jnp.add, total, out)
  return total


# ---------------------------------------------------------------- the defence


def harmful_set(env: Env) -> list[sft.Example]:
  """antidote.harmful_source (up to antidote.n_harmful; official: BeaverTails unsafe rows from 5001 for the
  realignment set, from 0 for the attack), disjoint from the attack's pool (checked)."""
  return disjoint_harmful_set(env, "antidote", env.c.antidote.n_harmful)


def _adapter_path(root: str) -> str:
  return os.path.join(root, FINETUNE_LORA, ADAPTER)


def finetune(env: Env, root: str, start: str, user) -> StageSpec:
  """LoRA: SFT from the aligned model in its own stage, which keeps the trained adapter (A, B) that Antidote
  prunes; full fine-tuning: sft_aligned's stage (the same model, shared with it in a cell)."""
  if env.c.train.mode != "lora":
    return user_sft("sft_aligned")(env, root, start, user)
  spec = user_sft(FINETUNE_LORA)(env, root, start, user)

  def keep_adapter(model, extras):
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)))
    arrays = {"/".join(k): dist.to_host(v) for k, v in flat.items()}  # every process takes part
    if dist.is_primary():
      path = _adapter_path(root)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      np.savez(path + ".tmp.npz", **arrays)
      os.replace(path + ".tmp.npz", path)
    dist.barrier("antidote_adapter")

  return dataclasses.replace(spec, finish=keep_adapter)


def _with_adapter(model, path: str):
  """`model` (LoRA options, fresh adapters) with the adapter saved by the fine-tuning stage."""
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"{path}: the LoRA fine-tuning stage kept no adapter (finished by an older version?); remove "
      f"{os.path.dirname(path)} and rerun"
    )
  saved = dict(np.load(path))
  graphdef, state = nnx.split(model)
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
  lora = {k: v for k, v in flat.items() if k[-1] in ("lora_a", "lora_b")}
  if sorted("/".join(k) for k in lora) != sorted(saved):
    raise ValueError(f"{path}: its adapter {sorted(saved)} does not match train.lora_targets")
  for k, v in lora.items():
    flat[k] = jax.device_put(jnp.asarray(saved["/".join(k)], v.dtype), v.sharding)
  return nnx.merge(graphdef, traverse_util.unflatten_dict(flat))


def posthoc(env, root: str, aligned_dir: str, tuned_dir: str, user) -> tuple[str, dict]:
  """Prunes the fine-tuned model by the Wanda scores on the realignment set; writes root/antidote/model and
  its report (reused by a rerun)."""
  c, out = env.c, model_dir(root, "antidote")
  report_path = os.path.join(root, "antidote", "report.json")
  if finished(root, "antidote"):
    with open(report_path) as f:
      return out, {"antidote": json.load(f)}
  harmful = harmful_set(env)  # a config error before any model is loaded
  lora = c.train.mode == "lora"
  options = run_options(c)
  # Unrolled layers without remat: the Wanda statistics are recorded while the forward is traced.
  options = dataclasses.replace(options, scan_layers=False, remat="none", lora=options.lora if lora else None)
  if lora:
    model = _with_adapter(load_hf(aligned_dir, mesh=env.mesh, options=options, rules=env.rules), _adapter_path(root))
    targets, ratio = tuple(options.lora.targets), c.antidote.dense_ratio
  else:
    model = load_hf(tuned_dir, mesh=env.mesh, options=options, rules=env.rules)
    targets, ratio = FULL_TARGETS, c.antidote.dense_ratio_full
  stats = activation_stats(model, env.tokenize(harmful), targets, c.eval.batch_size, env.mesh)
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  params["blocks"], counts = prune_params(params["blocks"], stats, ratio, lora)
  report = {
    "variant": "lora" if lora else "full",  # what was scored: the adapter or the weights
    "targets": list(targets),
    "dense_ratio": ratio,
    "harmful_examples": len(harmful),
    **counts,
    "pruned_share": counts["pruned"] / max(counts["scored"], 1),
  }
  if dist.is_primary():  # before the export: a finished model always has its report
    os.makedirs(os.path.dirname(report_path), exist_ok=True)
    write_atomic(report_path, json.dumps(report, indent=2))
  save_hf(nnx.merge(graphdef, params), out, env.tokenizer)  # LoRA: W_aligned + (alpha/r) A'B'
  return out, {"antidote": report}


def _validate(c):
  a = c.antidote
  check(0 <= a.dense_ratio <= 1, "antidote.dense_ratio", a.dense_ratio, "must lie in [0, 1]")
  check(0 <= a.dense_ratio_full <= 1, "antidote.dense_ratio_full", a.dense_ratio_full, "must lie in [0, 1]")
  check(bool(a.harmful_source), "antidote.harmful_source", a.harmful_source, "must name a source")
  check(a.n_harmful >= 0, "antidote.n_harmful", a.n_harmful, "must be >= 0 (0 = all)")


ANTIDOTE = register(
  Defence(
    "antidote",
    "align-then-fine-tune, then the weights most important on a harmful set (Wanda score) pruned",
    finetune=finetune,
    align=aligned_stage,
    posthoc=posthoc,
    section="antidote",
    # Official antidote_poison_ratio.sh (LoRA) dense_ratio 0.1, antidote_poison_ratio_full.sh 1e-5, 2,000
    # harmful examples; the realignment set is disjoint from the attack's pool (as booster.harmful_source).
    defaults={
      "dense_ratio": 0.1,
      "dense_ratio_full": 1e-5,
      "harmful_source": "world:harmful_pool[500:1000]",
      "n_harmful": 2000,
    },
    validate=_validate,
    source="Huang et al., ICML 2025; git-disl/Antidote",
  )
)
