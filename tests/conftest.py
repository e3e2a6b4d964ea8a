"""Test-wide settings. Tiny models make XLA's CPU compile time dominate a test's run time, and
optimisation level 0 compiles about 3x faster, so every test (and every subprocess a test starts,
which inherits the environment) uses it; numerics are unchanged at the tolerances tested."""

import os

import pytest

_FAST = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FAST).strip()


@pytest.fixture(scope="module")
def one_torch_thread():
  """Tiny matmuls gain nothing from threads, and on a busy machine torch's spinning worker
  threads made each 32-wide linear take ~20 ms (test_hf.py took 80 s instead of 30 s)."""
  import torch
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)
