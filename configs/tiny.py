"""A tiny run for tests and smoke checks (seconds): 4 layers, width 32, 200 Bible pairs."""

from configs import base


def get_config():
  c = base.get_config()
  c.num_steps = 8
  c.batch_size = 8
  c.log_every = 1
  c.progress_bar = False
  c.eval_every = 0
  c.eval_batches = 2
  c.eval_bleu_examples = 0
  c.model.num_layers = 4
  c.model.d_model = 32
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.head_dim = 8
  c.model.d_ff = 64
  c.data.max_examples = 200
  c.data.vocab_size = 300
  c.data.seq_len = 64
  c.optim.warmup_steps = 2
  c.checkpoint.every = 4
  c.checkpoint.async_save = False
  return c
