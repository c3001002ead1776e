"""Plain supervised fine-tuning on the user data (the baseline every defence is compared with),
and language-model pretraining (`pretrain`: loss on every token), which builds the safety world's
unaligned base model."""

from __future__ import annotations

import logging
import os
import time

from reft_jax import experiment
from reft_jax.data import sft
from reft_jax.losses import make_lm_loss
from reft_jax.model import save_hf, save_peft_adapter

log = logging.getLogger(__name__)


def train_and_export(c, workdir: str, stage: str, examples: list[sft.Example], tokenizer, mesh, rules,
                     *, loss_on: str = "response", hooks=()) -> dict:
  """Fine-tunes c.model (hf_path or random init) on `examples`; exports workdir/<stage>/model."""
  data = sft.tokenize(examples, tokenizer, c.data.seq_len, c.data.template, loss_on=loss_on)
  if data.num_truncated:
    log.warning("%s: %d of %d examples were truncated to data.seq_len=%d", stage, data.num_truncated,
                len(data), c.data.seq_len)
  model = experiment.build_model(c, mesh, rules, tokenizer)
  model, history, stopped, _ = experiment.train_stage(c, workdir, stage, model, data,
                                                      make_lm_loss(c.train.loss_chunk), mesh, rules, hooks)
  out = {"stopped": stopped, "history": history, "model": model}
  if not stopped:
    out["model_dir"] = save_hf(model, experiment.model_dir(workdir, stage), tokenizer)
    if model.options.lora is not None:
      out["adapter_dir"] = save_peft_adapter(model, os.path.join(workdir, stage, "adapter"),
                                             c.model.hf_path)
  return out


def run(c, workdir: str, hooks=()) -> dict:
  start = time.perf_counter()
  stage = c.method  # "sft" or "pretrain"
  mesh, rules = experiment.setup_mesh(c)
  examples = experiment.read_examples(c)
  tokenizer = experiment.get_tokenizer(c, workdir, examples)
  if experiment.finished(workdir, stage):
    out = {"stopped": False, "history": [], "model_dir": experiment.model_dir(workdir, stage),
           "model": experiment.load_frozen(c, experiment.model_dir(workdir, stage), mesh, rules)}
  else:
    out = train_and_export(c, workdir, stage, examples, tokenizer, mesh, rules,
                           loss_on="all" if stage == "pretrain" else "response", hooks=hooks)
  if not out["stopped"] and c.eval.enabled:
    out["results"] = experiment.evaluate_and_record(
        c, workdir, out["model"], tokenizer, mesh, stage, {"wall_seconds": time.perf_counter() - start,
                                                           "filter": None})
  return out
