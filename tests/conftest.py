"""Test-wide settings. Tiny models make XLA's CPU compile time dominate a test's run time, and
optimisation level 0 compiles about 3x faster, so every test (and every subprocess a test starts,
which inherits the environment) uses it; numerics are unchanged at the tolerances tested."""

import os

_FAST = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FAST).strip()
