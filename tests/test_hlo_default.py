"""No per-step cache copy in the executables users run: the while-loop checks of test_decode and
test_speculative, on executables built at XLA's default settings. The suite compiles at
optimisation level 0 (conftest.py) and test_speculative without the fusion emitters; a copy that
only the default pipeline makes (through its fusion and layout passes) would pass those. So the
executables here are built in a child process with XLA_FLAGS cleared and no compiler options.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in the child: builds each executable as `generate` would and reads its HLO.
CHILD = r"""
import json, sys
from ulskip_jax import engine, plan_layers
from ulskip_jax import testing as tiny
assert not engine.COMPILER_OPTIONS
model = tiny.tiny_model(seed=0)
cfg = model.cfg
spec = dict(draft_ratio=2, num_draft_tokens=4, draft_cache="separate")
cases = {  # name: (generate options, rows B, cache slots S)
    "greedy": (dict(ratio=2, mode="everywhere"), 4, 32),
    "speculative": (dict(speculative=spec, continuous_rows=2), 2, 41),
}
out = {}
for name, (kw, rows, slots) in cases.items():
  compiled = tiny.compile_generate(model, 3, 9, max_new_tokens=10, eos_id=None, **kw)
  in_place, others = tiny.loop_layer_ops(compiled.as_text(),
                                         (rows, cfg.num_kv_heads, slots, cfg.head_dim))
  out[name] = dict(in_place=in_place, others=others[:2])
print(json.dumps(out))
"""


def test_decode_loops_update_caches_in_place_at_default_settings():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  found = json.loads(proc.stdout.strip().splitlines()[-1])
  for name, result in found.items():
    assert not result["others"], (name, result["others"])
    # K and V of each kept layer written in the loop (speculative: verify and draft layers).
    assert result["in_place"] >= 4, (name, result)
