"""Skip-aware training on 8 simulated devices against 1, and the step time of skip-aware steps.

  python -m benchmarks.train_parity                 # ~6 min on 2 busy CPU cores
  python -m benchmarks.train_parity --quick         # 5 parity steps, 3 timed rounds: ~3 min
  python -m benchmarks.train_parity --d-model 192   # the wider model bible_2x used to have

Both parts use the model, seq_len and batch size of configs/bible_2x.py (12 layers, d_model 128,
4 heads, 2 KV heads, a BPE vocabulary of 4096; 16 rows of 96 tokens) on Bible batches, with
skip-aware steps from step 0. `--d-model D` widens the model (head_dim D / 4, d_ff 4 D).

1. Parity: `--parity-steps` Trainer steps at ratio 2 in paper mode, once on 1 CPU device and once
   on 8 simulated ones as mesh (2, 2, 2) (data, fsdp, tensor): the same losses within 1e-5. Each
   device count is a child process, since XLA_FLAGS must be set before jax is imported.
2. Step time: one jitted train step (forward, backward, AdamW) on one fixed batch of `--batch`
   rows, full depth against ULS ratios 2 and 3, in paper mode (prompt at full depth, response
   through the kept layers) and everywhere mode (every token through the kept layers only).
   Every case is compiled and warmed up first, then timed in `--timing-steps` rounds of one step
   per case, so that a change in the machine's load hits all cases alike. ms/step is the median
   wall time, CPU ms/step the median CPU time of this process (all its threads), which varies
   less when other processes share the machine; speedups are against full depth, same mode.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-5


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="5 parity steps, 3 timed rounds")
  p.add_argument("--parity-steps", type=int, default=20)
  p.add_argument("--parity-batch", type=int, default=0, help="rows per parity step (0: bible_2x's)")
  p.add_argument("--batch", type=int, default=0, help="rows of the timed batch (0: bible_2x's)")
  p.add_argument("--d-model", type=int, default=0, help="model width (0: bible_2x's)")
  p.add_argument("--timing-steps", type=int, default=7)
  p.add_argument("--ratios", default="2,3")
  p.add_argument("--max-examples", type=int, default=4000,
                 help="Bible pairs per split (tokenizer training and batches)")
  p.add_argument("--skip-parity", action="store_true")
  p.add_argument("--skip-timing", action="store_true")
  p.add_argument("--child", choices=("parity", "timing"), help=argparse.SUPPRESS)
  p.add_argument("--mesh", default="-1,1,1", help=argparse.SUPPRESS)
  p.add_argument("--workdir", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.quick:
    args.parity_steps, args.timing_steps = 5, 3
  return args


def bible_2x_config(args, batch_size: int):
  from configs import bible_2x
  c = bible_2x.get_config()
  c.batch_size = batch_size or c.batch_size
  if args.d_model:
    d = args.d_model
    c.model.d_model, c.model.head_dim, c.model.d_ff = d, d // 4, 4 * d
  c.num_steps = max(args.parity_steps, 1)
  c.skip.full_depth_steps = 0   # skip-aware from the first step
  c.data.max_examples = args.max_examples
  c.checkpoint.async_save = False
  c.progress_bar = False
  return c


# ----------------------------------------------------------------------------------------------
# Children (jax is imported only here, after XLA_FLAGS is set).

def child_parity(args) -> dict:
  import jax

  from ulskip_jax import train_lib
  cfg = bible_2x_config(args, args.parity_batch)
  cfg.mesh.shape = tuple(int(x) for x in args.mesh.split(","))
  trainer = train_lib.Trainer(cfg, args.workdir)
  state, losses = trainer.init_state(), []
  for step in range(args.parity_steps):
    state, metrics = trainer.step(state, next(trainer.batcher), step)
    losses.append(float(metrics["loss"]))
  trainer.ckpt.close()
  return dict(losses=losses, mesh=dict(trainer.mesh.shape),
              params=sum(x.size for x in jax.tree.leaves(state["params"])),
              batch=[cfg.batch_size, cfg.data.seq_len], d_model=cfg.model.d_model,
              layers=cfg.model.num_layers)


def child_timing(args) -> dict:
  import functools
  import resource
  import time

  import jax
  import numpy as np

  from ulskip_jax import train_lib
  from ulskip_jax.skipping import plan_layers

  cfg = bible_2x_config(args, args.batch)
  trainer = train_lib.Trainer(cfg, args.workdir)
  batch = trainer.global_batch(next(trainer.batcher))
  num_layers = trainer.model_cfg.num_layers

  def cpu_s():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime

  cases = []  # each with its own jitted step and state, compiled and warmed up first
  for mode in ("paper", "everywhere"):
    step_fn = jax.jit(functools.partial(
        train_lib.train_step, graphdef=trainer.graphdef, optimizer=trainer.optimizer,
        paper=mode == "paper", accum_steps=1, prompt_capacity=trainer.prompt_capacity),
        static_argnums=2, donate_argnums=0)
    for ratio in [1.0] + [float(r) for r in args.ratios.split(",")]:
      skip = plan_layers(num_layers, ratio, cfg.skip.strategy).skipped
      case = dict(mode=mode, ratio=ratio, kept=num_layers - len(skip), skip=skip, fn=step_fn,
                  state=trainer.init_state(), wall=[], cpu=[])
      for _ in range(2):  # compile, then one more so that nothing first-time is timed
        case["state"], metrics = step_fn(case["state"], batch, skip)
        jax.block_until_ready(metrics)
      cases.append(case)
  # Rounds of one step per case, so that a change in the machine's load hits every case alike.
  for _ in range(args.timing_steps):
    for case in cases:
      t0, c0 = time.perf_counter(), cpu_s()
      case["state"], metrics = case["fn"](case["state"], batch, case["skip"])
      jax.block_until_ready(metrics)
      case["wall"].append(time.perf_counter() - t0)
      case["cpu"].append(cpu_s() - c0)
  rows = [dict(mode=c["mode"], ratio=c["ratio"], kept=c["kept"],
               ms=1e3 * float(np.median(c["wall"])), cpu_ms=1e3 * float(np.median(c["cpu"])))
          for c in cases]
  tokens = int(np.asarray(jax.device_get(batch["segment_ids"]) > 0).sum())
  return dict(rows=rows, batch=list(batch["tokens"].shape), tokens=tokens,
              cores=os.cpu_count(), jax=jax.__version__, layers=num_layers,
              d_model=cfg.model.d_model, load=os.getloadavg()[0])


# ----------------------------------------------------------------------------------------------
# Parent.

def run_child(args, kind: str, devices: int, workdir: str, mesh: str = "-1,1,1") -> dict:
  argv = [sys.executable, os.path.abspath(__file__), f"--child={kind}", f"--mesh={mesh}",
          f"--workdir={workdir}", f"--parity-steps={args.parity_steps}",
          f"--parity-batch={args.parity_batch}", f"--batch={args.batch}",
          f"--timing-steps={args.timing_steps}", f"--ratios={args.ratios}",
          f"--d-model={args.d_model}",
          f"--max-examples={args.max_examples}"]
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  proc = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=REPO)
  if proc.returncode:
    sys.exit(f"child {kind} on {devices} device(s) failed:\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def parity(args, root: str) -> float:
  one_dir, eight_dir = os.path.join(root, "one"), os.path.join(root, "eight")
  one = run_child(args, "parity", 1, one_dir)
  os.makedirs(eight_dir)  # the same tokenizer, not a second BPE training
  shutil.copytree(os.path.join(one_dir, "tokenizer"), os.path.join(eight_dir, "tokenizer"))
  eight = run_child(args, "parity", 8, eight_dir, mesh="2,2,2")
  b, t = one["batch"]
  print(f"## Parity: {args.parity_steps} steps at ratio 2 (paper mode), {one['layers']} layers, "
        f"d_model {one['d_model']} ({one['params'] / 1e6:.2f}M params), {b} rows x {t} tokens\n")
  print(f"| step | 1 device {one['mesh']} | 8 devices {eight['mesh']} | abs diff |")
  print("|---|---|---|---|")
  diffs = []
  for step, (a, b) in enumerate(zip(one["losses"], eight["losses"]), start=1):
    diffs.append(abs(a - b))
    print(f"| {step} | {a:.6f} | {b:.6f} | {diffs[-1]:.1e} |")
  worst = max(diffs)
  verdict = "OK" if worst <= TOLERANCE else "FAIL"
  print(f"\nmax |loss(1 device) - loss(8 devices)| = {worst:.2e} "
        f"(tolerance {TOLERANCE:.0e}): {verdict}\n")
  return worst


def timing(args, root: str) -> None:
  workdir = os.path.join(root, "timing")
  if os.path.isdir(os.path.join(root, "one", "tokenizer")):
    os.makedirs(workdir)
    shutil.copytree(os.path.join(root, "one", "tokenizer"), os.path.join(workdir, "tokenizer"))
  result = run_child(args, "timing", 1, workdir)
  b, t = result["batch"]
  print(f"## Train step time: {result['layers']} layers, d_model {result['d_model']}, batch {b} x "
        f"{t} ({result['tokens']} real tokens), 1 CPU device ({result['cores']} cores), "
        f"jax {result['jax']}, load average {result['load']:.1f} at the end\n")
  print("| mode | ratio | kept layers | ms/step | CPU ms/step | speedup (wall) | speedup (CPU) |")
  print("|---|---|---|---|---|---|---|")
  for row in result["rows"]:
    full = next(r for r in result["rows"] if r["mode"] == row["mode"] and r["ratio"] == 1.0)
    name = "full depth" if row["ratio"] == 1.0 else f"{row['ratio']:g}"
    print(f"| {row['mode']} | {name} | {row['kept']} | {row['ms']:.0f} | {row['cpu_ms']:.0f} | "
          f"{full['ms'] / row['ms']:.2f}x | {full['cpu_ms'] / row['cpu_ms']:.2f}x |")
  print()


def main():
  args = parse_args()
  if args.child:
    result = child_parity(args) if args.child == "parity" else child_timing(args)
    print(json.dumps(result))
    return
  root = tempfile.mkdtemp(prefix="train_parity_")
  try:
    worst = None if args.skip_parity else parity(args, root)
    if not args.skip_timing:
      timing(args, root)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  if worst is not None and worst > TOLERANCE:
    sys.exit(1)


if __name__ == "__main__":
  main()
