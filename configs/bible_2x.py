"""Offline default: KJV -> WEB Bible translation, a small model from scratch, then ULS 2x.

  python train.py --config configs/bible_2x.py --workdir runs/bible_2x

Steps 0-399 train the 12-layer base model at full depth (standing in for a pretrained checkpoint);
steps 400-599 fine-tune it skip-aware at 2x in paper mode (prompt at full depth, response through
the 6 kept layers, loss on the response). A smoke run: it cannot translate (docs/training.md).
"""

from configs import base


def get_config():
  c = base.get_config()
  c.num_steps = 600
  c.skip.full_depth_steps = 400
  c.skip.ratio = 2.0
  c.batch_size = 16
  c.model.num_layers = 12
  c.model.d_model = 128
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.head_dim = 32
  c.model.d_ff = 512
  c.data.vocab_size = 4096
  c.data.seq_len = 96
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 50
  c.eval_every = 200
  c.eval_ratios = (1.0, 2.0)
  c.eval_bleu_examples = 64
  c.eval_max_new_tokens = 64
  c.checkpoint.every = 200
  return c
