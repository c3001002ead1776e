"""Safe LoRA (Hsu et al., NeurIPS 2024), after the official IBM/SafeLoRA `model.py` (class SafeLoRA) and
`config.py` (SafeLoRAConfig) @ d81fda1.

After align-then-fine-tune, per decoder layer and per LoRA target module (the official uses the PEFT
adapter's `target_modules`; here `train.lora_targets`), in Hugging Face's [out, in] layout:

  V  = W_aligned - W_base                 the alignment matrix (official get_aligned_matrix)
  C  = V V^T / ||V||_F                    the official projector ("approx"; not idempotent in general)
       or V (V^T V)^+ V^T                 the paper's exact projection onto V's column space ("exact")
  dW = W_finetuned - W_aligned            the fine-tuning update (LoRA: (alpha/r) B A)
  s  = cos(vec(C dW), vec(dW))            rounded to 5 decimals, as numpy.round(.., 5) officially

A layer is projected, W = W_aligned + C dW, when s <= the threshold; every other layer keeps its
fine-tuned weights. The threshold is `threshold` (select_layers_type="threshold") or, by default
("number"), the num_proj_layers-th smallest similarity, so that the num_proj_layers least aligned
layers are projected (ties at that value included, as `numpy.sort(cos)[:n][-1]` with `<=` officially).

The official projects the adapter's lora_B (B <- C B): the update becomes C B A, the same as C dW with
dW read off the merged weights here, so a LoRA run is projected exactly as officially (the scale
alpha/r changes neither the cosine nor the projection). Documented choices: a full fine-tuning run is
projected the same way on its update of the `train.lora_targets` modules (the official handles LoRA
only); a module whose V is zero (no alignment direction; the official divides by zero) is never
projected.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from reft_jax import distributed as dist
from reft_jax.config import check, csv_list
from reft_jax.defences.registry import Defence, register
from reft_jax.defences.sft import aligned_stage, user_sft
from reft_jax.files import write_atomic
from reft_jax.model import load_hf, save_hf
from reft_jax.model.layers import LORA_SITES as SITES
from reft_jax.model.hf import hf_module_name
from reft_jax.stages import finished, model_dir

HIGHEST = jax.lax.Precision.HIGHEST  # float32 products (no TF32 on GPUs), as torch.mm by default


@dataclasses.dataclass(frozen=True)
class SafeLoRAConfig:
  select_layers_type: str = "number"  # number | threshold (official SafeLoRAConfig)
  num_proj_layers: int = 10  # "number": how many of the least similar layers are projected
  threshold: float = 0.5  # "threshold": project the layers with similarity <= this
  projection: str = "approx"  # approx: V V^T / ||V||_F (official code) | exact: V (V^T V)^+ V^T (paper)


def as_matrix(kernel, target: str):
  """A stacked kernel [L, *in, *out] as [L, I, O] (o contracts (heads, head_dim))."""
  n_in = 2 if target == "o" else 1
  return kernel.reshape(kernel.shape[0], math.prod(kernel.shape[1 : 1 + n_in]), -1)


def projector(v_IO, exact: bool = False):
  """C [O, O] of the alignment matrix v [I, O] (ours: HF's V^T), acting on the output space as HF's C acts on
  [out, in] weights: approx V V^T / ||V||_F = v^T v / ||v||_F; exact V (V^T V)^+ V^T = pinv(v) v."""
  v = v_IO.astype(jnp.float32)
  if exact:
    return jnp.matmul(jnp.linalg.pinv(v), v, precision=HIGHEST)
  return jnp.matmul(v.T, v, precision=HIGHEST) / jnp.linalg.norm(v)


def project(delta_IO, c_OO):
  """C dW in our layout: HF's C @ dW^T transposed is dW @ C^T, and C is symmetric."""
  return jnp.matmul(delta_IO.astype(jnp.float32), c_OO, precision=HIGHEST)


def similarity(a, b, eps: float = 1e-8):
  """torch.nn.functional.cosine_similarity of the flattened tensors."""
  a, b = a.astype(jnp.float32).ravel(), b.astype(jnp.float32).ravel()
  return jnp.dot(a, b, precision=HIGHEST) / jnp.maximum(jnp.linalg.norm(a) * jnp.linalg.norm(b), eps)


@functools.partial(jax.jit, static_argnames="exact")
def _similarity(v_IO, delta_IO, exact: bool):
  """cos(C dW, dW); NaN where V = 0 (no alignment direction)."""
  cos = similarity(project(delta_IO, projector(v_IO, exact)), delta_IO)
  return jnp.where(jnp.any(v_IO != 0), cos, jnp.nan)


@functools.partial(jax.jit, static_argnames="exact")
def _projected(aligned_IO, v_IO, delta_IO, exact: bool):
  """W_aligned + C dW, in the weights' dtype."""
  return (aligned_IO.astype(jnp.float32) + project(delta_IO, projector(v_IO, exact))).astype(aligned_IO.dtype)


def select(similarities: dict, cfg: SafeLoRAConfig) -> tuple[float, list]:
  """(threshold, names of the projected layers): those with similarity <= threshold; in "number" mode the
  threshold is the num_proj_layers-th smallest similarity (official numpy.sort(cos)[:n][-1])."""
  known = sorted(s for s in similarities.values() if not math.isnan(s))
  if cfg.select_layers_type == "number":
    thr = known[: cfg.num_proj_layers][-1] if known else -math.inf
  else:
    thr = cfg.threshold
  return thr, [k for k, s in similarities.items() if s <= thr]  # NaN <= thr is False


def safelora(base: dict, aligned: dict, tuned: dict, cfg: SafeLoRAConfig = SafeLoRAConfig()) -> tuple[dict, dict]:
  """base/aligned/tuned: {target: stacked kernel [L, *in, *out]}. Returns ({target: kernel}, report): the
  projected layers are W_aligned + C dW, the others the fine-tuned weights unchanged."""
  exact = cfg.projection == "exact"
  views = {}  # target -> (aligned, V, dW) as [L, I, O]
  sims = {}  # "<layer>.<HF module>" -> similarity, in the official order (layer by layer)
  for t in tuned:
    views[t] = (as_matrix(aligned[t], t), as_matrix(aligned[t] - base[t], t), as_matrix(tuned[t] - aligned[t], t))
  names = {}
  for layer in range(next(iter(tuned.values())).shape[0]):
    for t in tuned:
      name = f"{layer}.{hf_module_name(SITES[t])}"
      a, v, d = (x[layer] for x in views[t])
      sims[name] = float(np.round(float(_similarity(v, d, exact)), 5))  # official: numpy.round(cos, 5)
      names[name] = (t, layer)
  thr, chosen = select(sims, cfg)
  out = dict(tuned)
  for t in tuned:  # the chosen layers recomputed (not kept for every layer: memory), the rest as fine-tuned
    layers = [names[n][1] for n in chosen if names[n][0] == t]
    if layers:
      rows = [tuned[t][layer] for layer in range(tuned[t].shape[0])]
      for layer in layers:
        a, v, d = (x[layer] for x in views[t])
        rows[layer] = _projected(a, v, d, exact).reshape(tuned[t].shape[1:])
      out[t] = jnp.stack(rows)
  report = {
    "threshold": thr,
    "projected": chosen,
    "n_projected": len(chosen),
    "n_layers": len(sims),
    "similarity": {k: (None if math.isnan(s) else s) for k, s in sims.items()},
  }
  return out, report


# ---------------------------------------------------------------- the defence


def _kernels(model, targets) -> dict:
  blocks = nnx.to_pure_dict(nnx.state(model))["blocks"]
  return {t: blocks[SITES[t][0]][SITES[t][1]]["kernel"] for t in targets}


def _config(c) -> SafeLoRAConfig:
  s = c.safelora
  return SafeLoRAConfig(s.select_layers_type, s.num_proj_layers, s.threshold, s.projection)


def posthoc(env, root: str, aligned_dir: str, tuned_dir: str, user) -> tuple[str, dict]:
  """Projects the align-then-fine-tune model's update of the train.lora_targets modules (V from env.base_path
  and the aligned model); writes root/safelora/model and its report (reused by a rerun)."""
  c, out = env.c, model_dir(root, "safelora")
  report_path = os.path.join(root, "safelora", "report.json")
  if finished(root, "safelora"):
    with open(report_path) as f:
      return out, {"safelora": json.load(f)}
  targets = csv_list(c.train.lora_targets)
  load = lambda path: load_hf(path, c.model.param_dtype, env.mesh, rules=env.rules)
  base = _kernels(load(env.base_path), targets)  # the base model itself is dropped here
  aligned, tuned = load(aligned_dir), load(tuned_dir)
  kernels, report = safelora(base, _kernels(aligned, targets), _kernels(tuned, targets), _config(c))
  graphdef, state = nnx.split(tuned)
  params = nnx.to_pure_dict(state)
  for t, k in kernels.items():
    params["blocks"][SITES[t][0]][SITES[t][1]]["kernel"] = k
  report["targets"] = targets
  if dist.is_primary():  # before the export: a finished model always has its report
    os.makedirs(os.path.dirname(report_path), exist_ok=True)
    write_atomic(report_path, json.dumps(report, indent=2))
  save_hf(nnx.merge(graphdef, params), out, env.tokenizer)
  return out, {"safelora": report}


def _validate(c):
  s = c.safelora
  check(
    s.select_layers_type in ("number", "threshold"),
    "safelora.select_layers_type",
    s.select_layers_type,
    "must be number or threshold",
  )
  check(s.num_proj_layers >= 1, "safelora.num_proj_layers", s.num_proj_layers, "must be >= 1")
  check(-1 <= s.threshold <= 1, "safelora.threshold", s.threshold, "must lie in [-1, 1] (a cosine)")
  check(s.projection in ("approx", "exact"), "safelora.projection", s.projection, "must be approx or exact")
  bad = [t for t in csv_list(c.train.lora_targets) if t not in SITES]
  check(not bad, "train.lora_targets", c.train.lora_targets, f"safelora projects modules among {tuple(SITES)}")


SAFELORA = register(
  Defence(
    "safelora",
    "align-then-fine-tune, then the least aligned layers' updates projected onto the alignment subspace",
    # The same fine-tuning as sft_aligned (shared with it and restore in a cell); the projection is post hoc.
    finetune=user_sft("sft_aligned"),
    align=aligned_stage,
    posthoc=posthoc,
    section="safelora",
    # Official SafeLoRAConfig defaults: the 10 least similar layers projected with C = V V^T / ||V||_F.
    defaults={"select_layers_type": "number", "num_proj_layers": 10, "threshold": 0.5, "projection": "approx"},
    validate=_validate,
    source="Hsu et al., NeurIPS 2024; IBM/SafeLoRA",
  )
)
