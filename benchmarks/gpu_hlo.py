"""XLA:GPU's decode executables, compiled without a GPU: does any while loop copy or transpose a
KV-cache layer? The tests check this on XLA:CPU (`testing.loop_layer_ops`); XLA:GPU assigns layouts
differently (it transposed whole cache layers around continuous batching's refill loop, a
per-step copy XLA:CPU does not make), so this compiles every decoding loop we ship (each
`decode.generate` strategy, the baselines, speculative decoding's draft and verify loop, the
serving engine's `slots.decode_steps`) for an H100 with JAX's deviceless ahead-of-time
compilation, at XLA's default settings, and applies the same check. Every decoding change reruns
it (docs/accelerators.md); the counts live in benchmarks/results/gpu/gpu_hlo.md.

  python3 -m venv /tmp/gpu_venv
  /tmp/gpu_venv/bin/pip install "jax[cuda12]==$JAX_VERSION" "flax==$FLAX_VERSION" optax \
      orbax-checkpoint safetensors gguf tqdm ml_collections     # ~3 GB of wheels, no GPU needed
  JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 JAX_PLATFORMS=cpu,cuda /tmp/gpu_venv/bin/python \
      -m benchmarks.gpu_hlo [--model smollm2] [--attention einsum,cudnn] [--output FILE.json]

(JAX_SKIP_CUDA_CONSTRAINTS_CHECK: the CUDA plugin's version check needs a driver; run from the
repository root, which `python -m` puts on the path.) 3 prompts of 9 tokens, 10 new tokens; only
shapes are used. Each case compiles once per attention implementation of --attention: einsum
in float32 (the default model), or cuDNN's fused attention in bfloat16 (the dtypes it takes),
whose executables also report their fused-attention calls. Exits 1 if a case other than beam
search copies a layer (beam search gathers the cache by parent every step, and XLA copies the
result back into the loop's buffer: inherent to reordering).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import topologies

from ulskip_jax import baseline_decode, baseline_schedules, decode, engine, plan_layers, slots
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


ATTENTION = dict(einsum="float32", cudnn="bfloat16")  # implementation -> its compute dtype
FUSED_CALL = 'custom_call_target="__cudnn$fmha'


def cases(model):
  """name -> (lower: (graphdef, params spec, spec of a pytree) -> jax Lowered, cache layer shape
  [B, K, S, Hd])."""
  cfg, out = model.cfg, {}
  loop = jax.jit(engine.decode_loop, static_argnames=("graphdef", "strategy"))
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
    slots_ = 32 + (2 * SPEC["num_draft_tokens"] + 1 if "speculative" in kw else 0)
    beams = kw.get("num_beams", 1)
    out[name] = (functools.partial(_lower_loop, loop, strategy, x),
                 (x.rows.shape[0] * beams, cfg.num_kv_heads, slots_, cfg.head_dim))
  for name, strategy in [("early exit", baseline_decode.EarlyExit(16, exit_every=2)),
                         ("SkipDecode", baseline_decode.SkipDecode(
                             16, schedule=baseline_schedules.skipdecode_schedule(cfg.num_layers, 2,
                                                                                 16)))]:
    _, x = engine.checked_inputs(cfg, PROMPTS, max_new_tokens=10, eos_id=None, threshold=0.5)
    out[name] = (functools.partial(_lower_loop, loop, strategy, x),
                 (4, cfg.num_kv_heads, 32, cfg.head_dim))
  # The serving engine: 4 steps of every row of a pool of 4 rows x 32 slots, at ratio 2.
  plan = slots.Plan(skip=plan_layers(cfg.num_layers, 2), paper_mode=True, eos_id=-1,
                    pad_id=0)
  state = jax.eval_shape(lambda: slots.init_state(cfg, 4, 32, plan.skip, plan.pad_id))
  steps = jax.jit(slots.decode_steps, static_argnames=("graphdef", "plan", "steps"),
                  donate_argnames="state")
  out["serving: slots.decode_steps 2x"] = (
      lambda graphdef, params, spec: steps.lower(graphdef, params, spec(state),
                                                 spec(jnp.zeros((4,), bool)), plan=plan, steps=4),
      (4, cfg.num_kv_heads, 32, cfg.head_dim))
  return out


def _lower_loop(loop, strategy, x, graphdef, params, spec):
  return loop.lower(graphdef, params, spec(x), strategy=strategy)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", choices=tuple(CONFIGS), default="tiny")
  p.add_argument("--cases", help="only the cases whose names contain one of these (comma-separated)")
  p.add_argument("--attention", default="einsum",
                 help=f"attention implementations to compile (comma-separated), among "
                      f"{tuple(ATTENTION)}; einsum is the default model's")
  p.add_argument("--output", help="write the results as JSON here")
  args = p.parse_args(argv)
  impls = args.attention.split(",")
  if not set(impls) <= set(ATTENTION):
    p.error(f"--attention={args.attention!r}: allowed are {tuple(ATTENTION)}")
  topology = topologies.get_topology_desc(platform="cuda", target_config=H100, topology="1x1x1")
  mesh = topologies.make_mesh(topology, (1,), ("d",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  to_spec = lambda a: jax.ShapeDtypeStruct(jnp.shape(a), getattr(a, "dtype", None) or
                                           jnp.asarray(a).dtype, sharding=replicated)
  spec = lambda tree: jax.tree.map(to_spec, tree)
  results, failed = {impl: {} for impl in impls}, False
  for impl in impls:
    cfg = dataclasses.replace(CONFIGS[args.model], attention_impl=impl, dtype=ATTENTION[impl])
    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(model)
    print(f"\n{impl} attention, {cfg.dtype}\n| case | in-place layer writes | other layer-sized "
          "ops in loops | fused attention calls |\n|---|---|---|---|")
    for name, (lower, layer) in cases(model).items():
      if args.cases and not any(c in name for c in args.cases.split(",")):
        continue
      start = time.perf_counter()
      text = lower(graphdef, spec(params), spec).compile().as_text()
      in_place, others = loop_layer_ops(text, layer)
      results[impl][name] = dict(in_place=in_place, others=len(others), first_other=others[:1],
                                 fused_attention=text.count(FUSED_CALL),
                                 compile_s=round(time.perf_counter() - start, 1))
      print(f"| {name} | {in_place} | {len(others)} | {text.count(FUSED_CALL)} |", flush=True)
      failed |= bool(others) and not name.startswith("beam")
  if args.output:
    with open(args.output, "w") as f:
      json.dump(dict(device=topology.devices[0].device_kind, jax=jax.__version__,
                     model=args.model, results=results), f, indent=1)
  return int(failed)


if __name__ == "__main__":
  sys.exit(main())
