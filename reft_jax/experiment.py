"""Building blocks every method's stages share: mesh, tokenizer, data, model, and a train stage."""

from __future__ import annotations

import functools
import json
import logging
import os
import time

import jax
import ml_collections
from flax import nnx

from reft_jax import config as config_lib
from reft_jax import distributed as dist
from reft_jax import sharding as shd
from reft_jax.checkpoint import Checkpointer
from reft_jax.data import attacks, builtin, safety_world, sft, sources
from reft_jax.data.tokenizer import build_word_tokenizer, load_tokenizer
from reft_jax.metrics import MetricWriter
from reft_jax.model import PRESETS, Transformer, abstract_model, load_hf
from reft_jax.model.hf import resolve_checkpoint
from reft_jax.optim import make_optimizer
from reft_jax.train import (batch_shardings, flops_per_token, init_train_state, jit_step,
                            make_train_step, split_model, train_loop, trainable_subset, with_trainable)

log = logging.getLogger(__name__)


def model_dir(root: str, stage: str) -> str:
  """Where a stage exports its final model (a HF directory)."""
  return os.path.join(root, stage, "model")


def finished(root: str, stage: str) -> bool:
  # save_hf writes config.json last, so its presence means the stage finished.
  return os.path.exists(os.path.join(model_dir(root, stage), "config.json"))


def setup_mesh(c: ml_collections.ConfigDict):
  return shd.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor), shd.parse_rules(c.mesh.rules)


@functools.lru_cache(maxsize=4)
def _world(cfg: safety_world.WorldConfig) -> safety_world.World:
  return safety_world.build_world(cfg)


def world(c: ml_collections.ConfigDict) -> safety_world.World:
  return _world(safety_world.WorldConfig(**c.world.to_dict()))


def uses_world(c: ml_collections.ConfigDict) -> bool:
  specs = [c.data.source, c.data.harmful_source if c.data.attack != "none" else ""]
  if c.eval.enabled:
    specs += [c.eval.harmful, c.eval.harmless, *config_lib.eval_tasks(c).values(),
              *config_lib.eval_harmless_sets(c).values()]
  return any("world:" in s for s in specs)


def load(c: ml_collections.ConfigDict, spec: str, limit: int = 0, **kw) -> list[sft.Example]:
  return sources.load_source(spec, limit=limit, world=world(c) if "world:" in spec else None, **kw)


def read_examples(c: ml_collections.ConfigDict) -> list[sft.Example]:
  """The user's fine-tuning data, after the configured attack (with hidden is_harmful labels)."""
  d = c.data
  if d.source == "builtin":
    examples = builtin.toy_instructions(d.builtin_examples, seed=c.seed)
  else:
    examples = load(c, d.source, schema=d.schema, fields=d.fields, split=d.split)
  if d.attack == "none":
    return examples
  return attacks.build_user_data(d.attack, examples, load(c, d.harmful_source), d.n, d.p, seed=c.seed)


def get_tokenizer(c: ml_collections.ConfigDict, workdir: str, examples: list[sft.Example]):
  if c.model.tokenizer:
    return load_tokenizer(c.model.tokenizer)
  if c.model.hf_path:
    return load_tokenizer(resolve_checkpoint(c.model.hf_path))
  path = os.path.join(workdir, "tokenizer")
  dist.barrier("get_tokenizer")  # every process sees the same files: none is being written now
  if os.path.exists(os.path.join(path, "tokenizer.json")):  # reuse: a resumed run must not change it
    return load_tokenizer(path)
  texts = [sft.format_prompt(e, "alpaca") + " " + e.response for e in examples]
  if uses_world(c):  # the whole world's vocabulary, so held-out eval prompts have no unknown words
    texts += world(c).all_texts()
  return build_word_tokenizer(texts, path)


def build_model(c: ml_collections.ConfigDict, mesh, rules, tokenizer=None) -> Transformer:
  """From a HF checkpoint (model.hf_path), or randomly initialised from `model.arch`, sharded."""
  options = config_lib.run_options(c)
  if c.model.hf_path:
    return load_hf(c.model.hf_path, mesh=mesh, options=options, rules=rules, seed=c.seed)
  cfg = PRESETS[c.model.arch]
  if tokenizer is not None:
    vocab = -(-len(tokenizer) // 8) * 8
    cfg = cfg.replace(vocab_size=vocab, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
  graphdef, abstract = nnx.split(abstract_model(cfg, options))
  shardings = shd.state_shardings(abstract, mesh, rules)

  def init():
    return nnx.to_pure_dict(nnx.state(Transformer(cfg, options, rngs=nnx.Rngs(params=c.seed))))

  return nnx.merge(graphdef, jax.jit(init, out_shardings=shardings)())


def load_frozen(c: ml_collections.ConfigDict, path: str, mesh, rules) -> Transformer:
  """A model that is only run, never trained (teacher, filter, evaluation, generation): weights kept in
  the compute dtype (a bf16 teacher: half the memory, no f32 master copy needed), layers scanned and
  attention as configured, no LoRA adapters."""
  import dataclasses

  options = dataclasses.replace(config_lib.run_options(c), param_dtype=c.model.dtype, lora=None, remat="none")
  return load_hf(path, mesh=mesh, options=options, rules=rules)


def train_stage(c: ml_collections.ConfigDict, workdir: str, stage: str, model: Transformer,
                data: sft.TokenizedSet | sft.MixedBatcher, loss_fn, mesh, rules, hooks=(), *,
                train_cfg: ml_collections.ConfigDict | None = None, frozen: Transformer | None = None,
                extras: dict | None = None, update_extras=None, before_step=None):
  """Trains `model` with `loss_fn` on `data` (one TokenizedSet, or a MixedBatcher of several);
  checkpoints to workdir/<stage>/checkpoints and resumes from there.

  train_cfg: the optimisation sub-config (default c.train). frozen: a model passed into every step
  as ctx.frozen (the teacher): sharded like the student, never donated, never optimised, never
  checkpointed. extras/update_extras/before_step: method state (see train.make_train_step).
  Returns (trained model, metrics history, stopped_by_signal, final TrainState.extras).
  """
  t = train_cfg or c.train
  stage_dir = os.path.join(workdir, stage)
  graphdef, params = split_model(model)
  tx, schedule, labels = make_optimizer(
      params, lr=t.lr, num_steps=t.num_steps, warmup_steps=t.warmup_steps, schedule=t.schedule,
      weight_decay=t.weight_decay, grad_clip=t.grad_clip, b1=t.b1, b2=t.b2, mode=t.mode,
      trainable_regex=t.trainable_regex)
  state, state_sh = init_train_state(params, tx, mesh, extras)
  if isinstance(data, sft.TokenizedSet):
    batcher = sft.Batcher(data, t.batch_size, seed=c.seed, buckets=config_lib.buckets(c))
    seq_len = data.tokens.shape[1]
  else:
    batcher, seq_len = data, max(b.data.tokens.shape[1] for b in data.parts.values())
  batch_sh = batch_shardings(batcher.local_batch(0), mesh, rules)
  frozen_graphdef, frozen_params, frozen_sh = None, None, None
  if frozen is not None:
    frozen_graphdef, frozen_params = split_model(frozen)
    frozen_sh = jax.tree.map(lambda x: x.sharding, frozen_params)
  jitted = jit_step(make_train_step(graphdef, tx, loss_fn, schedule, labels, t.grad_accum,
                                    frozen_graphdef, update_extras), state_sh, batch_sh, mesh, frozen_sh,
                    rules)
  step_fn = jitted if frozen is None else (lambda s, b: jitted(s, b, frozen_params))
  ckpt = Checkpointer(os.path.join(stage_dir, "checkpoints"), c.checkpoint.every_steps,
                      c.checkpoint.max_to_keep, c.checkpoint.async_save)
  latest = ckpt.latest_step()
  if latest is not None:
    subset, meta = ckpt.restore(latest, trainable_subset(state, labels))
    state = with_trainable(state, subset)
    log.info("%s: resumed from step %d (data position %s)", stage, latest, meta["data_position"])
  writer = MetricWriter(stage_dir, tensorboard=c.log.tensorboard)
  start = time.perf_counter()
  try:
    state, history, stopped = train_loop(
        state, step_fn, batcher, batch_sh, num_steps=t.num_steps, writer=writer, checkpointer=ckpt,
        save_state=lambda s: trainable_subset(s, labels), log_every=c.log.every_steps,
        flops_token=flops_per_token(model.cfg, seq_len), peak_flops=c.log.peak_flops,
        hooks=hooks, progress=c.log.progress, before_step=before_step)
    if not stopped:
      ckpt.save(t.num_steps, trainable_subset(state, labels),
                {"step": t.num_steps, "data_position": t.num_steps})
  finally:
    ckpt.close()
    writer.close()
  if history:
    summary = {"stage": stage, "steps": t.num_steps, "final_loss": history[-1]["loss"],
               "wall_seconds": time.perf_counter() - start,
               "tokens_per_sec": _median([h["tokens_per_sec"] for h in history[1:]] or [0.0]),
               "stopped_by_signal": stopped}
    if dist.is_primary():
      with open(os.path.join(stage_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
  return nnx.merge(graphdef, state.params), history, stopped, state.extras


def _median(xs):
  xs = sorted(xs)
  return xs[len(xs) // 2]


def training_harmful(c: ml_collections.ConfigDict) -> list[sft.Example]:
  """Every harmful prompt training may see: probe set, alignment refusals, the attack's harmful pool."""
  built = c.reft.alignment == config_lib.BUILD_ALIGNMENT
  specs = [c.reft.probe_harmful, c.alignment.harmful if built else ""]
  specs.append(c.data.harmful_source if c.data.attack != "none" else "")
  out = [x for s in specs if s for x in load(c, s)]
  if not built:
    out += [x for x in load(c, c.reft.alignment) if x.meta.get("is_harmful")]
  return out


def evaluate_and_record(c: ml_collections.ConfigDict, workdir: str, model, tokenizer, mesh,
                        method: str, extra: dict | None = None) -> dict:
  """Evaluates `model` on the configured sets; records it as runs[<eval.name or method>]."""
  from reft_jax import config as config_lib
  from reft_jax.eval.judges import make_judge
  from reft_jax.eval.run import evaluate, update_results

  e = c.eval
  name = e.name or method
  # All of it when overlaps are dropped (the first n_harmful that remain are evaluated).
  harmful = load(c, e.harmful, 0 if e.drop_overlap > 0 else e.n_harmful) if e.harmful else []
  n_overlap = 0
  if e.drop_overlap > 0 and harmful:  # held out means held out: no (near) repeat of a training prompt
    from reft_jax.data.assets import drop_overlapping

    kept = drop_overlapping(harmful, training_harmful(c), e.drop_overlap)
    n_overlap = len(harmful) - len(kept)
    harmful = kept
  # The harmful and harmless prompts under the attack's prompt (eval.prompt_style; auto = AOA for the
  # AOA attacks, as the official evaluation does); the task prompts stay plain, as the official code
  # never evaluates task utility under the AOA template.
  style = attacks.eval_prompt_style(e.prompt_style, c.data.attack)
  run = evaluate(
      model, tokenizer,
      harmful=attacks.dress_prompts(harmful[:e.n_harmful], style),
      harmless=attacks.dress_prompts(load(c, e.harmless, e.n_harmless) if e.harmless else [], style),
      harmless_sets={n: attacks.dress_prompts(load(c, s), style)
                     for n, s in config_lib.eval_harmless_sets(c).items()},
      tasks={t: load(c, s, e.n_task) for t, s in config_lib.eval_tasks(c).items()},
      judge=make_judge(e.judge, e.judge_path, e.judge_threshold, mesh), template=c.data.template,
      max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, mesh=mesh,
      task_max_new_tokens=e.task_max_new_tokens, fa_match=e.fa_match,
      examples_path=os.path.join(workdir, "eval", f"{name}.jsonl"), progress=c.log.progress)
  run.update(extra or {})
  run["eval_prompt_style"] = style
  if e.drop_overlap > 0:
    run["eval_harmful_dropped_as_overlapping"] = n_overlap
  update_results(workdir, name, run, c.to_dict())
  return run
