"""The paper's claims side by side on the offline Bible corpus (KJV -> WEB), CPU scale.

  python -m benchmarks.reproduce --config configs/reproduce.py            # ~55 min, 2 CPU cores
  python -m benchmarks.reproduce --config configs/reproduce.py --quick    # ~2 min smoke run

Stages (each cached under `workdir`; a re-run skips the finished ones):
  1. base: the bible_2x model size (12 layers, d_model 128) trained from scratch at full depth;
  2. fine-tuning from the base with equal steps: ULS / top / bottom / random at each ratio, one
     multi-ratio ULS checkpoint (ratios 1, 2, 3, 5 drawn per step; kept at `multi_workdir` for the
     speculative-decoding benchmark), early exit (exit-point losses), SkipDecode per ratio, and
     ULS / top / random again with another data seed (replicates: which gaps are noise);
  3. quality on held-out test books (BLEU, chrF) and validation perplexity of target tokens;
  4. speed: the trained model at batch 1 / 8 / 32 (every method, real confidences), and a
     random-weight 24-layer model (speed does not depend on the weights) against transformers.
Results: benchmarks/results/*.md, *.png, results.json; measured numbers and their reading:
benchmarks/results/README.md.
"""

import ml_collections

from configs import bible_2x


def get_config():
  c = ml_collections.ConfigDict()
  c.workdir = "runs/repro"           # stage caches (checkpoints, HF exports, eval json)
  c.multi_workdir = "runs/bible_multi"
  c.results_dir = "benchmarks/results"

  c.base_init = ""                   # "": train the base from scratch (base_steps)
  c.base_layers_ratio = 0.0
  c.train = bible_2x.get_config()    # model size, data, optimizer of every run
  c.train.progress_bar = False
  c.train.log_every = 50
  c.train.eval_every = 0
  c.train.eval_bleu_examples = 0
  c.train.batch_size = 16
  c.base_steps = 400                 # full-depth training from scratch
  c.base_lr = 2e-3
  c.ft_steps = 150                   # fine-tuning steps, the same for every method
  c.ft_lr = 5e-4
  c.ft_warmup_steps = 5

  c.ratios = (2.0, 3.0, 5.0)         # target (average) speedup ratios
  c.ft_full = False                  # the base itself is the full-depth model
  c.ft_strategies = ("uls", "top", "bottom", "random")
  # Ratios a method is fine-tuned and evaluated at, where not all of `ratios` (e.g. dict(random=
  # (2.0,)) to save time: a 150-step fine-tuning run takes 70-130 s on 2 quiet CPU cores).
  c.method_ratios = ml_collections.ConfigDict()
  # The same fine-tuning again with another data order (random: also another plan), at every
  # ratio: how far apart two runs of one method land, i.e. which gaps between methods are noise.
  c.replicate_seeds = (1,)
  c.replicate_strategies = ("uls", "top", "random")
  c.replicate_ratios = ()            # () = each strategy's ratios
  c.multi_ratios = (1.0, 2.0, 3.0, 5.0)
  c.exit_every = 2                   # early exit: an exit point after every 2nd layer
  c.skipdecode_levels = 4            # SkipDecode: distinct depths (lax.switch branches)

  c.zero_shot = ml_collections.ConfigDict()  # the base with layers skipped, no fine-tuning
  c.zero_shot.ratios = c.ratios
  c.zero_shot.strategies = ("uls",)
  c.zero_shot.random_seeds = ()
  c.zero_shot.dynamic = False

  c.eval = ml_collections.ConfigDict()
  c.eval.test_examples = 96          # held-out test verses decoded for BLEU / chrF
  c.eval.tune_examples = 96          # validation verses for tuning the early-exit threshold
  c.eval.ppl_batches = 4             # validation batches (train.batch_size rows) for perplexity
  c.eval.batch_size = 16             # decode batch for quality (the early-exit threshold is
                                     # tuned at this batch size)
  c.eval.max_new_tokens = 64
  c.eval.tune_iterations = 8

  c.speed = ml_collections.ConfigDict()
  c.speed.batches = (1, 8, 32)
  c.speed.ratios = (1.0, 2.0, 3.0, 5.0)
  c.speed.min_prompts = 32           # test prompts timed at batch b: max(b, min_prompts)
  c.speed.random_model = True        # the random-weight speed stage
  c.speed.layers = 24                # random-weight speed model (Llama layout)
  c.speed.d_model = 512
  c.speed.d_ff = 1408
  c.speed.heads = 8
  c.speed.kv_heads = 4
  c.speed.vocab = 8192
  c.speed.prompt_len = 32
  c.speed.new_tokens = 64
  c.speed.repeats = 2                # timed calls per case (best is reported)
  c.speed.static_batch = 8           # the static strategies (same cost as ULS) at this batch
  c.speed.static_ratios = (2.0,)     # ... and these ratios
  c.speed.plot_batch = 8             # batch whose measured speedups the quality plot uses
  c.speed.torch_threads = (1, 2)
  return c


def quick(c):
  """A smoke run in a few minutes: a 6-layer model, one ratio, tiny sets; same code paths."""
  c.workdir = "runs/repro_quick"
  c.multi_workdir = "runs/repro_quick/bible_multi"
  c.results_dir = "runs/repro_quick/results"  # meaningless numbers: not committed
  c.base_steps = 60
  c.ft_steps = 6
  c.train.data.max_examples = 2000
  c.train.model.num_layers = 6
  c.train.model.d_model = 64
  c.train.model.head_dim = 16
  c.train.model.d_ff = 128
  c.train.data.vocab_size = 1024
  c.ratios = c.zero_shot.ratios = (2.0,)
  c.multi_ratios = (1.0, 2.0)
  c.replicate_strategies = ("uls",)
  c.speed.ratios = (1.0, 2.0)
  c.speed.layers = 8
  c.eval.test_examples = 16
  c.eval.tune_examples = 16
  c.eval.ppl_batches = 2
  c.eval.max_new_tokens = 24
  c.eval.tune_iterations = 3
  c.speed.batches = (1, 8)
  c.speed.min_prompts = 8
  c.speed.d_model = 128
  c.speed.d_ff = 352
  c.speed.heads = 4
  c.speed.kv_heads = 2
  c.speed.vocab = 2048
  c.speed.new_tokens = 32
  c.speed.repeats = 1
  return c
