"""The quick start's run at 2x with the sandwich step (docs/distillation.md), KJV -> WEB.

  python train.py --config configs/smollm2_2x_sandwich.py --workdir runs/smollm2_2x_sandwich
  python infer.py --checkpoint runs/smollm2_2x_sandwich --input examples/kjv_test64.txt \\
      --output runs/smollm2_2x_sandwich/out.txt --ratio 1,2 --batch-size 32 \\
      --references examples/web_test64.txt

Each step trains full depth on the task's cross-entropy and the 2x path (15 of 30 layers kept:
ULS plan 0 2 4 6 8 10 12 15 17 19 21 23 25 27 29) on the KL to that same full-depth forward, so
full depth is trained rather than worn down, and the sub-model learns from its distribution
instead of the one-hot targets alone. A step costs about two of the quick start's. Results:
benchmarks/results/smollm2/recipes.md (`python -m benchmarks.recipes`).
"""

from configs import smollm2_quick


def get_config():
  c = smollm2_quick.get_config()
  c.skip.ratio = 2.0
  c.eval_ratios = (1.0, 2.0)
  c.distill.teacher = "self"
  c.distill.alpha = 1.0          # the 2x path learns from full depth alone
  c.distill.sandwich = True
  return c
