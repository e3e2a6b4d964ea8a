"""configs/reproduce.py scaled to one GPU: a bigger model, more steps, bigger evaluation sets.

  python -m benchmarks.reproduce --config configs/reproduce_gpu.py

Not run yet (this project's CI has no GPU), so no time or score is claimed here. The speed part
uses the 24-layer, d_model 1024 model of benchmarks/decode_speed.py; transformers still runs on
the CPU (torch CPU build), so its column is a CPU reference only.
"""

from configs import reproduce


def get_config():
  c = reproduce.get_config()
  c.workdir = "runs/repro_gpu"
  c.multi_workdir = "runs/bible_multi_gpu"
  c.results_dir = "benchmarks/results/gpu"
  c.train.model.num_layers = 24
  c.train.model.d_model = 512
  c.train.model.num_heads = 8
  c.train.model.num_kv_heads = 4
  c.train.model.head_dim = 64
  c.train.model.d_ff = 1408
  c.train.data.seq_len = 128
  c.train.batch_size = 64
  c.base_steps = 6000
  c.base_lr = 1e-3
  c.ft_steps = 1000
  c.ft_lr = 3e-4
  c.ft_warmup_steps = 50
  c.eval.test_examples = 1000
  c.eval.tune_examples = 256
  c.eval.ppl_batches = 32
  c.eval.batch_size = 32
  c.speed.d_model = 1024
  c.speed.d_ff = 2816
  c.speed.heads = 16
  c.speed.vocab = 32000
  c.speed.trained_examples = 256
  c.speed.repeats = 5
  c.speed.torch_threads = (1, 4, 16)
  return c


def quick(c):
  return reproduce.quick(c)
