"""`--config.method=sft|pretrain`: one training stage of c.model on the configured data (plain supervised
fine-tuning: the loss on response tokens; pretraining: on every token, which builds the safety world's
base model), exported as a HF directory (and a PEFT adapter in LoRA mode), then evaluated."""

from __future__ import annotations

import logging
import os
import time

from reft_jax.data import sft
from reft_jax.data.load import get_tokenizer, read_examples
from reft_jax.eval.record import evaluate_and_record
from reft_jax.model import save_peft_adapter
from reft_jax.model.build import load_frozen, setup_mesh
from reft_jax.stages import Env, StageSpec, finished, model_dir, run_stage

log = logging.getLogger(__name__)


def train_and_export(
  c, workdir: str, stage: str, examples: list[sft.Example], tokenizer, mesh, rules, *, loss_on: str = "response"
) -> dict:
  """Trains c.model (hf_path or random init) on `examples` as workdir/<stage>; raises stages.Stopped."""
  data = sft.tokenize(examples, tokenizer, c.data.seq_len, c.data.template, loss_on=loss_on)
  if data.num_truncated:
    log.warning(
      "%s: %d of %d examples were truncated to data.seq_len=%d", stage, data.num_truncated, len(data), c.data.seq_len
    )
  env = Env(c, mesh, rules, tokenizer, c.model.hf_path, workdir)
  result = run_stage(env, workdir, StageSpec(stage, data))
  out = {"history": result.history, "model": result.model, "model_dir": result.model_dir}
  if result.model is not None and result.model.options.lora is not None:
    out["adapter_dir"] = save_peft_adapter(result.model, os.path.join(workdir, stage, "adapter"), c.model.hf_path)
  return out


def run(c, workdir: str) -> dict:
  start = time.perf_counter()
  stage = c.method  # "sft" or "pretrain"
  mesh, rules = setup_mesh(c)
  examples = read_examples(c)
  tokenizer = get_tokenizer(c, workdir, examples)
  reused = finished(workdir, stage)
  out = train_and_export(
    c, workdir, stage, examples, tokenizer, mesh, rules, loss_on="all" if stage == "pretrain" else "response"
  )
  out["reused"] = reused
  if c.eval.enabled:
    model = out["model"] or load_frozen(c, model_dir(workdir, stage), mesh, rules)
    out["results"] = evaluate_and_record(
      c, workdir, model, tokenizer, mesh, stage, {"wall_seconds": time.perf_counter() - start, "filter": None}
    )
  return out
