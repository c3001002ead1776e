"""Alignment data for a real model, built offline (config: reft.alignment="build", section `alignment`).

No registry package ships refusals or helpful answers, so (documented rule):
  harmful prompts   (e.g. AdvBench rows + Do-Not-Answer) -> one of REFUSALS, picked by a seeded rng;
  harmless prompts  with a reference answer (e.g. gsm_symbolic's worked solution) keep it; those without
                    one (the ordinary requests of builtin:requests_train) get the base model's own greedy
                    answer (self-distillation: alignment must not change how the model helps), or, for
                    a pretrained model that cannot answer yet, those of `alignment.answer_model` (e.g.
                    SmolLM2-Instruct for Gemma 3 270M: distillation of its chat behaviour). Answers that
                    eval.judges.is_refusal reads as refusals are dropped, so the set never teaches
                    over-refusal.
The set is written once to WORKDIR/alignment/alignment.jsonl (+ summary.json) and every stage reads it
through reft.alignment, which `prepare` points at that file.
"""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np

from reft_jax import files
from reft_jax.config import BUILD_ALIGNMENT
from reft_jax.data import sft
from reft_jax.data.formats import write_jsonl
from reft_jax.data.load import get_tokenizer, load
from reft_jax.data.tokenizer import load_tokenizer
from reft_jax.eval.judges import is_refusal
from reft_jax.generate import generate_texts
from reft_jax.model.build import load_frozen, model_dir, setup_mesh

log = logging.getLogger(__name__)

REFUSALS = (
  "I'm sorry, but I can't help with that. It could cause real harm to people.",
  "I cannot assist with this request. It could be dangerous or illegal, and I won't provide it.",
  "I'm sorry, I can't provide that. If you have another question, I'm happy to help.",
  # Opens with a listed phrase: a refusal we teach must be one the keyword judge and is_refusal see.
  "I'm sorry, but I won't help with this, because it could hurt someone. Is there something else I can do for you?",
  "I can't assist with that request. Helping would be unsafe and unethical.",
  "Sorry, but I cannot help with this. It could be used to harm others.",
)


def refusal_answers(harmful: list[sft.Example], seed: int) -> list[sft.Example]:
  rng = np.random.default_rng(seed)
  return [
    sft.Example(
      e.prompt,
      str(rng.choice(REFUSALS)),
      e.input,
      {**e.meta, "is_harmful": True, "response_rule": "refusal_template"},
      e.system,
    )
    for e in harmful
  ]


def helpful_answers(harmless: list[sft.Example], answer_fn, is_refusal) -> tuple[list[sft.Example], int]:
  """Keeps reference answers; asks answer_fn(list of examples) -> texts for the rest. Returns (examples,
  number dropped because the answer was empty or a refusal)."""
  need = [e for e in harmless if not e.response.strip()]
  generated = dict(zip(map(id, need), answer_fn(need))) if need else {}
  out, dropped = [], 0
  for e in harmless:
    if e.response.strip():
      out.append(
        sft.Example(
          e.prompt, e.response, e.input, {**e.meta, "is_harmful": False, "response_rule": "reference"}, e.system
        )
      )
      continue
    text = generated[id(e)].strip()
    if not text or is_refusal(text):
      dropped += 1
      continue
    out.append(
      sft.Example(e.prompt, text, e.input, {**e.meta, "is_harmful": False, "response_rule": "self_generated"}, e.system)
    )
  return out, dropped


def build(c, out_dir: str, mesh=None, rules=None) -> str:
  """Writes out_dir/alignment.jsonl from c.alignment (skipped when it exists); returns its path."""

  path = os.path.join(out_dir, "alignment.jsonl")
  if os.path.exists(path):
    return path
  a = c.alignment
  start = time.perf_counter()
  harmful = load(c, a.harmful, a.n_harmful)
  harmless = load(c, a.harmless, a.n_harmless)
  if not harmful or not harmless:
    raise ValueError(
      f"alignment.harmful={a.harmful!r} and alignment.harmless={a.harmless!r} must both "
      f"give examples; got {len(harmful)} and {len(harmless)}"
    )
  tokenizer = get_tokenizer(c, out_dir, [])

  def answer(examples):
    writer, writer_tok = c.model.hf_path, tokenizer
    if a.answer_model:  # another model writes the answers, in its own chat template
      writer = model_dir(a.answer_model)
      writer_tok = load_tokenizer(writer)
    if not writer:
      raise ValueError("alignment: self-generated answers need the base model (model.hf_path or model.gguf)")
    model = load_frozen(c, writer, mesh, rules)
    prompts = [sft.format_prompt(e, c.data.template, writer_tok) for e in examples]
    return generate_texts(
      model,
      writer_tok,
      prompts,
      max_new_tokens=a.max_new_tokens,
      batch_size=c.eval.batch_size,
      mesh=mesh,
      progress=c.log.progress,
    )

  helpful, dropped = helpful_answers(harmless, answer, is_refusal)
  examples = refusal_answers(harmful, c.seed) + helpful
  order = np.random.default_rng(c.seed).permutation(len(examples))
  os.makedirs(out_dir, exist_ok=True)
  write_jsonl([examples[i] for i in order], path + ".tmp")
  summary = {
    "harmful": len(harmful),
    "harmless": len(helpful),
    "dropped_refusing_answers": dropped,
    "self_generated": sum(e.meta["response_rule"] == "self_generated" for e in helpful),
    "wall_seconds": time.perf_counter() - start,
    "harmful_sources": a.harmful,
    "harmless_sources": a.harmless,
    "answer_model": a.answer_model or "the base model",
  }
  files.write_atomic(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=2))
  os.replace(path + ".tmp", path)  # last: its presence means the set is complete
  log.info(
    "alignment set: %d refusals, %d helpful answers (%d self-generated, %d refusing answers dropped) in %.0f s -> %s",
    len(harmful),
    len(helpful),
    summary["self_generated"],
    dropped,
    summary["wall_seconds"],
    path,
  )
  return path


def prepare(c, workdir: str):
  """With reft.alignment="build": builds the set under workdir/alignment and returns a copy of the config
  whose reft.alignment names that file. Any other config is returned as it is."""
  if c.reft.alignment != BUILD_ALIGNMENT:
    return c

  mesh, rules = setup_mesh(c)
  path = build(c, os.path.join(workdir, "alignment"), mesh, rules)
  c = c.copy_and_resolve_references()
  with c.unlocked():
    c.reft.alignment = path
  return c
