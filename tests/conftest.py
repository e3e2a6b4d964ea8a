"""Test-wide settings. Tiny models make XLA's CPU compile time dominate a test's run time, and
optimisation level 0 and the older fusion emitters compile several times faster, so every test on
the CPU (and every subprocess a test starts, which inherits the environment) uses them; numerics
are unchanged at the tolerances tested, and test_hlo_default checks the default pipeline's
executables. On a GPU or TPU the compiler keeps its defaults: the tests then check what users
run."""

import importlib.metadata
import os
import re
import shutil
import tempfile

import pytest

_FAST = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
         "--xla_cpu_use_fusion_emitters=false")
# JAX's accelerator plugins (jax-cuda12-plugin, jax-rocm7-plugin, libtpu, ...): with one
# installed, JAX runs on its device rather than the CPU by default.
_ACCELERATOR_PLUGIN = re.compile(r"jax[-_](cuda|rocm)\d*[-_]plugin|libtpu(-nightly)?", re.I)


def _on_cpu() -> bool:
  """Whether JAX will run on the CPU, decided without initialising a backend (flags must be set
  before that): JAX_PLATFORMS when set, else whether an accelerator plugin is installed (one with
  no device present leaves the flags off: slower compiles, the same results)."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not any(_ACCELERATOR_PLUGIN.fullmatch(d.metadata["Name"] or "")
                 for d in importlib.metadata.distributions())


if _on_cpu() and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FAST).strip()
_SESSION_CACHE = None
if _on_cpu() and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  # Compiling is most of a tiny model's test, and modules, workers and the train.py / infer.py
  # children the tests start build many of the same executables: one persistent cache for the
  # session (its workers and children inherit the variables), removed at its end.
  _SESSION_CACHE = tempfile.mkdtemp(prefix="ulskip_test_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_CACHE
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
if not _on_cpu() and os.environ.get("PYTEST_XDIST_WORKER"):
  # Workers share one accelerator: each takes memory as it needs it, not 75% up front.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def pytest_unconfigure(config):
  if _SESSION_CACHE:  # only the process that made it (workers inherit the variable)
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(session, config, items):
  """The longest test modules first (a module's size stands for its run time): with -n N each
  worker takes a whole module at a time, and a long one dealt last leaves the others idle."""
  size = {}
  def cost(item):
    path = str(item.path)
    if path not in size:
      size[path] = os.path.getsize(path)
    return -size[path]
  items.sort(key=cost)  # stable: a module's tests keep their order


@pytest.fixture(scope="module")
def one_torch_thread():
  """Tiny matmuls gain nothing from threads, and on a busy machine torch's spinning worker
  threads made each 32-wide linear take ~20 ms (test_hf.py took 80 s instead of 30 s)."""
  import torch
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fast_engine_compile():
  """The engine's own executables take compiler options of their own (`engine.COMPILER_OPTIONS`,
  which override XLA_FLAGS): the same fast settings for a module's decoding tests, restored after
  it. None where XLA_FLAGS already hold them (the CPU, above): an option passed explicitly, even
  at the flags' value, files the same program under another persistent-cache key, so modules with
  and without this fixture would each compile the decode loops they share."""
  import jax
  from ulskip_jax import engine
  saved = dict(engine.COMPILER_OPTIONS)
  if _FAST not in os.environ.get("XLA_FLAGS", ""):
    engine.COMPILER_OPTIONS.update(xla_backend_optimization_level=0,
                                   xla_llvm_disable_expensive_passes=True)
    if jax.default_backend() == "cpu":  # an XLA:CPU option: other backends refuse it
      engine.COMPILER_OPTIONS.update(xla_cpu_use_fusion_emitters=False)
  yield
  engine.COMPILER_OPTIONS.clear()
  engine.COMPILER_OPTIONS.update(saved)
