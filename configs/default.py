"""reft-jax run configs.

  python -m reft_jax --config=configs/default.py:tiny --workdir=/tmp/reft_tiny
  python -m reft_jax --config=configs/default.py:llama2_7b --workdir=gs://bucket/run \
      --config.model.hf_path=/ckpt/Llama-2-7b-chat-hf --config.data.train_path=user.jsonl

Presets: tiny (offline: random tiny Llama, word tokenizer and built-in data), llama2_7b,
gemma2_9b, qwen2_7b (LoRA, bf16 compute, scanned layers with remat; fsdp over all devices).
Any field can be overridden with --config.<a.b>=<value>; unknown keys and wrong types fail at once.
"""

import ml_collections

HUB_NAMES = {
    "llama2_7b": "meta-llama/Llama-2-7b-chat-hf",
    "gemma2_9b": "google/gemma-2-9b-it",
    "qwen2_7b": "Qwen/Qwen2-7B-Instruct",
}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.preset = arg
  c.method = "sft"
  c.seed = 0

  c.model = ml_collections.ConfigDict(dict(
      hf_path="",  # local HF directory (or hub name when online); "" = random init of `arch`
      arch="tiny",  # architecture preset used when hf_path is "" (and for memory plans)
      tokenizer="",  # "" = the checkpoint's tokenizer, or a word-level one built from the data
      dtype="float32",  # compute dtype
      param_dtype="float32",
      scan_layers=False,
      remat="none",  # none | full | dots | dots_no_batch
  ))
  c.train = ml_collections.ConfigDict(dict(
      mode="full",  # full | lora | regex
      lora_rank=8, lora_alpha=16.0, lora_targets="q,v",  # comma-separated: q,k,v,o,gate,up,down
      trainable_regex="",  # with mode=regex, e.g. "blocks/mlp/.*"
      lr=3e-3, schedule="cosine", warmup_steps=10, weight_decay=0.0, grad_clip=1.0,
      b1=0.9, b2=0.999,
      batch_size=8, grad_accum=1, num_steps=200,
  ))
  c.data = ml_collections.ConfigDict(dict(
      train_path="",  # JSONL with prompt/response (and optional input); "" = built-in toy data
      prompt_field="prompt", response_field="response", input_field="input",
      builtin_examples=512,
      template="alpaca",  # alpaca | chat | none
      seq_len=64,
      buckets="",  # e.g. "32,64": batches cut to the smallest bucket that fits (less padding)
  ))
  c.mesh = ml_collections.ConfigDict(dict(
      data=1, fsdp=-1, tensor=1,  # -1 = the remaining devices
      rules="",  # overrides of the logical->mesh rules, e.g. "embed=fsdp,mlp=tensor+fsdp,vocab=none"
  ))
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=20, max_to_keep=2, async_save=True))
  c.log = ml_collections.ConfigDict(dict(
      every_steps=1,
      peak_flops=0.0,  # per-device peak FLOP/s for MFU (e.g. 989e12 for H100 bf16); 0 = not logged
      tensorboard=True, progress=True,
  ))

  if arg == "tiny":
    pass
  elif arg in HUB_NAMES:
    c.model.hf_path = HUB_NAMES[arg]
    c.model.arch = arg
    c.model.update(dtype="bfloat16", param_dtype="float32", scan_layers=True, remat="full")
    c.train.update(mode="lora", lora_rank=8, lora_alpha=16.0, lora_targets="q,k,v,o,gate,up,down",
                   lr=1e-4, warmup_steps=20, batch_size=16, num_steps=1000)
    c.data.update(seq_len=512, template="chat")
    c.checkpoint.every_steps = 200
  else:
    raise ValueError(f"unknown preset {arg!r}; choose tiny, {', '.join(HUB_NAMES)}")
  return c
