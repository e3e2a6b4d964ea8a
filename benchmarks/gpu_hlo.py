"""XLA:GPU's decode executables, compiled without a GPU: does any while loop copy or transpose a
KV-cache layer? The tests check this on XLA:CPU (`testing.loop_layer_ops`); XLA:GPU assigns layouts
differently (it transposed whole cache layers around continuous batching's refill loop, a
per-step copy XLA:CPU does not make), so this compiles every strategy for an H100 with JAX's
deviceless ahead-of-time compilation and applies the same check.

  python3 -m venv /tmp/gpuvenv && . /tmp/gpuvenv/bin/activate
  pip install "jax[cuda12]==$JAX_VERSION" flax optax orbax-checkpoint safetensors gguf tqdm \
      ml_collections pytest && pip install --no-deps -e .        # ~6 GB, no GPU needed
  JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 JAX_PLATFORMS=cpu,cuda python -m benchmarks.gpu_hlo \
      [--model smollm2]   # ~10 s for the tiny test model; ~2 min at SmolLM2-135M's shapes

(JAX_SKIP_CUDA_CONSTRAINTS_CHECK: the CUDA plugin's version check needs a driver.) 3 prompts of
9 tokens, 10 new tokens; only shapes are used. Exits 1 if a case other than beam search
copies a layer (beam search gathers the cache by parent every step, and XLA copies the result
back into the loop's buffer: inherent to reordering).
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import topologies

from ulskip_jax import baselines, decode, engine
from ulskip_jax.model import Decoder, ModelConfig
from ulskip_jax.testing import loop_layer_ops

# An H100 SXM's device description (XLA's GpuTargetConfig text proto).
H100 = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84929347584 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 7 }
runtime_version { major: 12 minor: 8 patch: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
CONFIGS = dict(  # SmolLM2-135M's shapes (random weights: only shapes matter here)
    tiny=ModelConfig(vocab_size=97, num_layers=4, d_model=32, num_heads=4, num_kv_heads=2,
                     head_dim=8, d_ff=64, max_position=128),
    smollm2=ModelConfig(vocab_size=49152, num_layers=30, d_model=576, num_heads=9, num_kv_heads=3,
                        head_dim=64, d_ff=1536, rope_theta=100000.0, norm_eps=1e-5,
                        max_position=8192, tie_embeddings=True))
PROMPTS = [[1] * 9] * 3
SPEC = dict(draft_ratio=2, num_draft_tokens=4)


def cases(model):
  """name -> (strategy, Inputs, cache layer shape [B, K, S, Hd])."""
  cfg, out = model.cfg, {}
  for name, kw, rows in [
      ("greedy 2x everywhere", dict(ratio=2, mode="everywhere"), None),
      ("greedy 2x paper", dict(ratio=2), None),
      ("continuous greedy 2x", dict(ratio=2), 2),
      ("continuous sampling", dict(temperature=1.0, top_p=0.9), 2),
      ("continuous n-gram bans", dict(no_repeat_ngram_size=2), 2),
      ("beam search, 2 beams", dict(ratio=2, num_beams=2), None),
      ("speculative shared", dict(speculative=dict(SPEC, draft_cache="shared")), None),
      ("speculative separate", dict(speculative=dict(SPEC, draft_cache="separate")), None),
      ("continuous speculative shared", dict(speculative=dict(SPEC, draft_cache="shared")), 2),
      ("continuous speculative separate", dict(speculative=dict(SPEC, draft_cache="separate")),
       2)]:
    strategy, x = decode.plan_call(model, PROMPTS, max_new_tokens=10, eos_id=None,
                                   continuous_rows=rows, **kw)
    slots = 32 + (2 * SPEC["num_draft_tokens"] + 1 if "speculative" in kw else 0)
    beams = kw.get("num_beams", 1)
    out[name] = strategy, x, (x.rows.shape[0] * beams, cfg.num_kv_heads, slots, cfg.head_dim)
  for name, strategy in [("early exit", baselines.EarlyExit(16, exit_every=2)),
                         ("SkipDecode", baselines.SkipDecode(16, schedule=baselines.skipdecode_schedule(
                             cfg.num_layers, 2, 16)))]:
    _, x = engine.checked_inputs(cfg, PROMPTS, max_new_tokens=10, eos_id=None, threshold=0.5)
    out[name] = strategy, x, (4, cfg.num_kv_heads, 32, cfg.head_dim)
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", choices=tuple(CONFIGS), default="tiny")
  p.add_argument("--cases", help="only the cases whose names contain one of these (comma-separated)")
  p.add_argument("--output", help="write the results as JSON here")
  args = p.parse_args(argv)
  topology = topologies.get_topology_desc(platform="cuda", target_config=H100, topology="1x1x1")
  mesh = topologies.make_mesh(topology, (1,), ("d",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  spec = lambda a: jax.ShapeDtypeStruct(jnp.shape(a), getattr(a, "dtype", None) or
                                       jnp.asarray(a).dtype, sharding=replicated)
  model = nnx.eval_shape(lambda: Decoder(CONFIGS[args.model], rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(model)
  jitted = jax.jit(engine.decode_loop, static_argnames=("graphdef", "strategy"))
  results, failed = {}, False
  print("| case | in-place layer writes | other layer-sized ops in loops |\n|---|---|---|")
  for name, (strategy, x, layer) in cases(model).items():
    if args.cases and not any(c in name for c in args.cases.split(",")):
      continue
    compiled = jitted.lower(graphdef, jax.tree.map(spec, params), jax.tree.map(spec, x),
                            strategy=strategy).compile()
    in_place, others = loop_layer_ops(compiled.as_text(), layer)
    results[name] = dict(in_place=in_place, others=len(others), first_other=others[:1])
    print(f"| {name} | {in_place} | {len(others)} |")
    failed |= bool(others) and not name.startswith("beam")
  if args.output:
    with open(args.output, "w") as f:
      json.dump(dict(device=topology.devices[0].device_kind, jax=jax.__version__,
                     model=args.model, results=results), f, indent=1)
  return int(failed)


if __name__ == "__main__":
  sys.exit(main())
