"""The quick start's recipe run longer: 100 skip-aware steps of SmolLM2-135M-Instruct at 2x.

  python train.py --config configs/smollm2_2x_long.py --workdir runs/smollm2_2x_long

Evaluates validation loss and BLEU (32 validation verses, greedy) at 1x and 2x every 50 steps,
so `log.jsonl` holds the curve. Time and results: benchmarks/results/smollm2/quick_start.md.
"""

from configs import smollm2_2x


def get_config():
  c = smollm2_2x.get_config()
  c.num_steps = 100
  c.optim.warmup_steps = 10
  c.eval_every = 50
  c.eval_bleu_examples = 32
  c.eval_max_new_tokens = 64
  c.checkpoint.every = 50
  c.checkpoint.keep = 3
  return c
