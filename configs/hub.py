"""Presets that read hub checkpoints (online, or from the local cache): the 7B-class architecture/memory
presets and the protocol presets that reproduce a published cell. configs/default.py dispatches to them
(`--config=configs/default.py:paper_llama2_sst2`)."""

import ml_collections

# Architecture/memory presets: the chat/instruct checkpoints (already safety-aligned), for memory plans and
# as a starting point for user data. Not the published protocol (see the paper_* presets).
HUB_NAMES = {
  "llama2_7b": "meta-llama/Llama-2-7b-chat-hf",
  "gemma2_9b": "google/gemma-2-9b-it",
  "qwen2_7b": "Qwen/Qwen2-7B-Instruct",
}

# Protocol presets. Settings from git-disl/Booster @6421918 (the paper whose tables they reproduce; its
# script/finetune/* run every baseline of that paper with one protocol):
#   base checkpoints  script/finetune/*_model.sh (model_path; Llama-2-7b-hf is every script's default)
#   LoRA r=32, alpha=4 on q,k,v, both stages  train.py (LoraConfig; lora_dropout=0)
#   fine-tuning: lr 1e-5, 20 epochs, batch 10, weight decay 0.1, constant schedule (HF "constant" ignores
#     warmup_ratio), n=1000, p=0.1 (GSM8K: p=0.05)
#     script/finetune/{sft,smooth}_{poison_ratio,agnews,gsm8k}.sh
#   alignment: lr 5e-4, 20 epochs, batch 10, 5,000 refusals, constant  script/alignment/{sft,smooth_align}.sh
#   attack: BeaverTails harmful pairs, rows 0-99; Booster's harmful set: rows 5000-9999  utils.py
#   HS: the first 1,000 unsafe prompts of BeaverTails 30k_test, greedy, 512 new tokens
#     poison/evaluation/pred.py
#   FA: SST-2 validation (872), AG News test and GSM8K test (first 1,000), 200 new tokens  */pred_eval.py
#     (eval.task_max_new_tokens=200, eval.fa_match=official_exact: Booster's `==` label match)
PAPER_MODELS = {  # name -> (base checkpoint, architecture preset)
  "llama2": ("meta-llama/Llama-2-7b-hf", "llama2_7b"),
  "gemma2": ("google/gemma-2-9b", "gemma2_9b"),
  "qwen2": ("Qwen/Qwen2-7B", "qwen2_7b"),
}
PAPER_TASKS = {  # name -> (train source, test source, test size, harmful ratio p)
  "sst2": ("sst2", "sst2_test", 872, 0.1),
  "agnews": ("agnews", "agnews_test", 1000, 0.1),
  "gsm8k": ("gsm8k", "gsm8k_test", 1000, 0.05),
}
PAPER_N, PAPER_EPOCHS, PAPER_BATCH = 1000, 20, 10
ALIGN_N, ALIGN_EPOCHS, ALIGN_LR = 5000, 20, 5e-4


def _hub_arch(c: ml_collections.ConfigDict, arch: str) -> None:
  c.model.hf_path = HUB_NAMES[arch]
  c.model.arch = arch
  c.model.update(dtype="bfloat16", param_dtype="float32", scan_layers=True, remat="full")
  c.train.update(
    mode="lora",
    lora_rank=8,
    lora_alpha=16.0,
    lora_targets="q,k,v,o,gate,up,down",
    lr=1e-4,
    warmup_steps=20,
    batch_size=16,
    num_steps=1000,
  )
  c.data.update(seq_len=512, template="chat")
  c.checkpoint.every_steps = 200


def llama2_7b(c: ml_collections.ConfigDict) -> None:
  """Architecture/memory preset, not a protocol preset: Llama-2-7b-chat (already aligned), LoRA, bf16
  compute, scanned layers with remat, fsdp over all devices; no attack, task, alignment data or judge.
  For a published setting use paper_llama2_<task>.

  python -m reft_jax plan --config=configs/default.py:llama2_7b --workdir=runs/plan
  python -m reft_jax --config=configs/default.py:llama2_7b --workdir=runs/llama \
      --config.model.hf_path=/ckpt/Llama-2-7b-chat-hf --config.data.source=user.jsonl
  """
  _hub_arch(c, "llama2_7b")


def gemma2_9b(c: ml_collections.ConfigDict) -> None:
  """Architecture/memory preset, not a protocol preset: gemma-2-9b-it (already aligned); as llama2_7b.
  For a published setting use paper_gemma2_<task>.

  python -m reft_jax plan --config=configs/default.py:gemma2_9b --workdir=runs/plan
  """
  _hub_arch(c, "gemma2_9b")


def qwen2_7b(c: ml_collections.ConfigDict) -> None:
  """Architecture/memory preset, not a protocol preset: Qwen2-7B-Instruct (already aligned); as llama2_7b.
  For a published setting use paper_qwen2_<task>.

  python -m reft_jax plan --config=configs/default.py:qwen2_7b --workdir=runs/plan
  """
  _hub_arch(c, "qwen2_7b")


# ---------------------------------------------------------------- protocol presets (docs/PRESETS.md)


def _paper(c: ml_collections.ConfigDict, model: str, task: str) -> None:
  """The git-disl protocol (Booster's scripts, numbers at PAPER_MODELS) from a *base* checkpoint.

  method=reft: ReFT is our reconstruction (METHODS.md §1); its fine-tuning side is Booster's, its teacher
  trains like Booster's alignment stage. --config.method=demo runs demo.methods on the same settings.
  """
  hf_path, arch = PAPER_MODELS[model]
  train_source, test_source, n_test, p = PAPER_TASKS[task]
  k = round(p * PAPER_N)  # harmful examples in the user data
  c.method = "reft"
  c.model.update(hf_path=hf_path, arch=arch, dtype="bfloat16", param_dtype="float32", scan_layers=True, remat="full")
  # Fine-tuning stage: LoRA r=32/alpha=4 on q,k,v, lr 1e-5 constant, wd 0.1, 20 epochs of n=1000 at batch 10.
  c.train.update(
    mode="lora",
    lora_rank=32,
    lora_alpha=4.0,
    lora_targets="q,k,v",
    lr=1e-5,
    schedule="constant",
    warmup_steps=0,
    weight_decay=0.1,
    grad_clip=1.0,
    batch_size=PAPER_BATCH,
    num_steps=PAPER_EPOCHS * PAPER_N // PAPER_BATCH,
    loss_chunk=256,
  )  # exact, and no [B, T, V] logits (Gemma-2's vocabulary is 256k)
  # The attack: the first k harmful BeaverTails pairs (official: rows 0-99), the rest task rows. Official
  # sequences are cut at 2,048 tokens; 1,024 holds the tasks' and BeaverTails' examples.
  c.data.update(
    source=train_source,
    schema=task,
    attack="harmful_mix",
    harmful_source=f"beavertails_harmful[0:{k}]",
    n=PAPER_N,
    p=p,
    template="alpaca",
    seq_len=1024,
    buckets="128,256,512,1024",
  )
  # Alignment (every method's, and ReFT's teacher): BeaverTails harmful prompts from Booster's alignment
  # rows (5000-) -> refusals, plus harmless Alpaca requests -> their reference answers (ReFT's teacher needs
  # both classes); 5,000 examples x 20 epochs at lr 5e-4 as Booster's alignment stage.
  half = ALIGN_N // 2
  c.reft.alignment = "build"
  c.alignment.update(
    harmful=f"beavertails_harmful[5000:{5000 + half}]", harmless=f"alpaca[0:{half}]", n_harmful=0, n_harmless=0
  )
  c.teacher.update(lr=ALIGN_LR, num_steps=ALIGN_EPOCHS * ALIGN_N // PAPER_BATCH, batch_size=PAPER_BATCH, warmup_steps=0)
  probe_harmful, probe_harmless = "beavertails_harmful[10000:10512]", f"alpaca[{half}:{half + 512}]"
  c.reft.update(
    probe_harmful=probe_harmful, probe_harmless=probe_harmless, probe_size=256, align_batch_size=PAPER_BATCH
  )
  # Baselines as Booster's scripts run them: Booster's harmful set = BeaverTails rows 5000-9999 (disjoint from
  # the attack's), Vaccine rho=5 (script/alignment/vaccine.sh), Lisa rho=0.01 with K_a/K_f=100/900 over the
  # 2,000 steps (2 cycles, script/finetune/lisa_poison_ratio.sh).
  c.booster.harmful_source = "beavertails_harmful[5000:10000]"
  # Panacea's 1,000 harmful samples from row 5000 (script/finetune/panacea_gsm8k.sh); T-Vaccine's 200 (its
  # official ones are the alignment file's first unsafe rows: here from Booster's disjoint range).
  c.panacea.harmful_source = "beavertails_harmful[5000:6000]"
  c.tvaccine.harmful_source = "beavertails_harmful[5000:5200]"
  # Antidote's realignment set: rows 5000-6999 (train.py, bad_sample_num 2000); its pruning share per task
  # as its scripts (antidote_poison_ratio.sh: SST-2 0.1; antidote_agnews.sh, *_gsm8k.sh: 0.05).
  c.antidote.harmful_source = "beavertails_harmful[5000:7000]"
  c.antidote.dense_ratio = 0.1 if task == "sst2" else 0.05
  c.vaccine.rho = 5.0
  c.lisa.update(rho=0.01, min_cycles=2)
  c.demo.methods = "sft_base,sft_aligned,vaccine,lisa,booster,reft"
  _paper_eval(c, task, test_source, n_test, probe_harmful, probe_harmless, f"alpaca[{half + 512}:{half + 612}]")


def _paper_eval(
  c, task: str, test_source: str, n_test: int, probe_harmful: str, probe_harmless: str, eval_harmless: str
):
  """The protocol's evaluation (and the refusal-feature analysis on the same sets); over-refusal on
  `eval_harmless` is ours, not in the published protocol."""
  c.analyze.update(
    harmful_train=probe_harmful,
    harmless_train=probe_harmless,
    harmful_eval="beavertails_test_harmful",
    harmless_eval=eval_harmless,
    task_eval=test_source,
  )
  # HS: beaver-dam-7b (a local copy: --config.eval.judge_path=DIR) at 0.5 on the first 1,000 unsafe prompts of
  # BeaverTails 30k_test, greedy, 512 new tokens; FA on the published test size.
  c.eval.update(
    enabled=True,
    judge="classifier",
    judge_path="",
    judge_threshold=0.5,
    harmful="beavertails_test_harmful",
    n_harmful=1000,
    harmless=eval_harmless,
    n_harmless=100,
    tasks=f"{task}={test_source}",
    n_task=n_test,
    max_new_tokens=512,
    task_max_new_tokens=200,
    fa_match="official_exact",
  )  # Booster's pred_eval.py: 200 tokens, ==
  c.checkpoint.every_steps = 200


def paper_llama2_sst2(c: ml_collections.ConfigDict) -> None:
  """Booster's SST-2 setting (n=1000, p=0.1) on Llama-2-7B base: HS and FA of ReFT (our reconstruction).

  python -m reft_jax --config=configs/default.py:paper_llama2_sst2 --workdir=runs/paper_llama2_sst2 \
      --config.eval.judge_path=/ckpt/beaver-dam-7b [--config.method=demo]
  """
  _paper(c, "llama2", "sst2")


def paper_llama2_agnews(c: ml_collections.ConfigDict) -> None:
  """Booster's AG News setting (n=1000, p=0.1) on Llama-2-7B base.

  python -m reft_jax --config=configs/default.py:paper_llama2_agnews --workdir=runs/paper_llama2_agnews \
      --config.eval.judge_path=/ckpt/beaver-dam-7b [--config.method=demo]
  """
  _paper(c, "llama2", "agnews")


def paper_llama2_gsm8k(c: ml_collections.ConfigDict) -> None:
  """Booster's GSM8K setting (n=1000, p=0.05 as its *_gsm8k.sh scripts) on Llama-2-7B base.

  python -m reft_jax --config=configs/default.py:paper_llama2_gsm8k --workdir=runs/paper_llama2_gsm8k \
      --config.eval.judge_path=/ckpt/beaver-dam-7b [--config.method=demo]
  """
  _paper(c, "llama2", "gsm8k")


def paper_gemma2_sst2(c: ml_collections.ConfigDict) -> None:
  """Booster's model comparison (script/finetune/*_model.sh: SST-2, n=1000, p=0.1) on Gemma-2-9B base.

  python -m reft_jax --config=configs/default.py:paper_gemma2_sst2 --workdir=runs/paper_gemma2_sst2 \
      --config.eval.judge_path=/ckpt/beaver-dam-7b [--config.method=demo]
  """
  _paper(c, "gemma2", "sst2")


def paper_gemma2_agnews(c: ml_collections.ConfigDict) -> None:
  """Gemma-2-9B base on Booster's AG News setting. No published cell: Booster ran Gemma-2 on SST-2 only.

  python -m reft_jax --config=configs/default.py:paper_gemma2_agnews --workdir=runs/paper_gemma2_agnews \
      --config.eval.judge_path=/ckpt/beaver-dam-7b
  """
  _paper(c, "gemma2", "agnews")


def paper_gemma2_gsm8k(c: ml_collections.ConfigDict) -> None:
  """Gemma-2-9B base on Booster's GSM8K setting. No published cell: Booster ran Gemma-2 on SST-2 only.

  python -m reft_jax --config=configs/default.py:paper_gemma2_gsm8k --workdir=runs/paper_gemma2_gsm8k \
      --config.eval.judge_path=/ckpt/beaver-dam-7b
  """
  _paper(c, "gemma2", "gsm8k")


def paper_qwen2_sst2(c: ml_collections.ConfigDict) -> None:
  """Booster's model comparison (script/finetune/*_model.sh: SST-2, n=1000, p=0.1) on Qwen2-7B base.

  python -m reft_jax --config=configs/default.py:paper_qwen2_sst2 --workdir=runs/paper_qwen2_sst2 \
      --config.eval.judge_path=/ckpt/beaver-dam-7b [--config.method=demo]
  """
  _paper(c, "qwen2", "sst2")


def paper_qwen2_agnews(c: ml_collections.ConfigDict) -> None:
  """Qwen2-7B base on Booster's AG News setting. No published cell: Booster ran Qwen2 on SST-2 only.

  python -m reft_jax --config=configs/default.py:paper_qwen2_agnews --workdir=runs/paper_qwen2_agnews \
      --config.eval.judge_path=/ckpt/beaver-dam-7b
  """
  _paper(c, "qwen2", "agnews")


def paper_qwen2_gsm8k(c: ml_collections.ConfigDict) -> None:
  """Qwen2-7B base on Booster's GSM8K setting. No published cell: Booster ran Qwen2 on SST-2 only.

  python -m reft_jax --config=configs/default.py:paper_qwen2_gsm8k --workdir=runs/paper_qwen2_gsm8k \
      --config.eval.judge_path=/ckpt/beaver-dam-7b
  """
  _paper(c, "qwen2", "gsm8k")
