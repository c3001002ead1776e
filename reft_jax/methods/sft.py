"""Plain supervised fine-tuning on the user data (the baseline every defence is compared with),
and language-model pretraining (`pretrain`: loss on every token), which builds the safety world's
unaligned base model."""

from __future__ import annotations

import logging
import os

from reft_jax import experiment
from reft_jax.data import sft
from reft_jax.losses import lm_loss
from reft_jax.model import save_hf, save_peft_adapter

log = logging.getLogger(__name__)


def run(c, workdir: str, hooks=()) -> dict:
  stage = c.method  # "sft" or "pretrain"
  mesh, rules = experiment.setup_mesh(c)
  examples = experiment.read_examples(c)
  tokenizer = experiment.get_tokenizer(c, workdir, examples)
  data = sft.tokenize(examples, tokenizer, c.data.seq_len, c.data.template,
                      loss_on="all" if stage == "pretrain" else "response")
  if data.num_truncated:
    log.warning("%d of %d examples were truncated to data.seq_len=%d", data.num_truncated,
                len(data), c.data.seq_len)
  model = experiment.build_model(c, mesh, rules, tokenizer)
  model, history, stopped, _ = experiment.train_stage(c, workdir, stage, model, data, lm_loss, mesh,
                                                      rules, hooks)
  out = {"stopped": stopped, "history": history}
  if stopped:
    return out
  out["model_dir"] = save_hf(model, os.path.join(workdir, stage, "model"), tokenizer)
  if model.options.lora is not None:
    out["adapter_dir"] = save_peft_adapter(model, os.path.join(workdir, stage, "adapter"),
                                           c.model.hf_path)
  if c.eval.enabled:
    out["results"] = experiment.evaluate_and_record(c, workdir, model, tokenizer, mesh, stage)
  return out
