import os
import shutil
import tempfile

os.environ.setdefault("JPRUNE_NO_PROGRESS", "1")

# Hermetic and cheaper test runs. Each run (all xdist workers of it together) gets one fresh folder holding
# (a) XLA's persistent compilation cache, so a program compiled by one test, worker or `jprune` subprocess is not
# compiled again by the next (tests build the same small models many times; a cached executable is the one XLA
# would compile, so no result changes), and (b) tfds's data folder, so no test reads or writes
# ~/tensorflow_datasets. Nothing survives the run: no test depends on what an earlier run left on disk.
_OWNS_RUN_DIR = "JPRUNE_TEST_RUN_DIR" not in os.environ   # xdist workers inherit the controller's folder
if _OWNS_RUN_DIR:
  os.environ["JPRUNE_TEST_RUN_DIR"] = tempfile.mkdtemp(prefix="jprune-tests-")
_RUN_DIR = os.environ["JPRUNE_TEST_RUN_DIR"]
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(_RUN_DIR, "xla")
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
os.environ["TFDS_DATA_DIR"] = os.path.join(_RUN_DIR, "tfds")
# XLA's CPU backend compiles at LLVM -O0 in tests: the same HLO and the same HLO passes, about half the compile
# time (most of the suite is compiling small programs); IEEE semantics hold at any level. Subprocesses get the
# same flags (`xla_flags`), so a result compared bit for bit across processes is compiled the same way.
# Benchmarks and users keep XLA's default.
_TEST_XLA_FLAGS = ["--xla_backend_optimization_level=0"]


def xla_flags(devices=None) -> str:
  """XLA_FLAGS for this test run, with `devices` forced host devices (default: as set)."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if f not in _TEST_XLA_FLAGS]
  if devices is not None:
    flags = [f for f in flags if not f.startswith("--xla_force_host_platform_device_count")]
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  return " ".join(flags + _TEST_XLA_FLAGS)


os.environ["XLA_FLAGS"] = xla_flags()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
  if _OWNS_RUN_DIR:
    shutil.rmtree(_RUN_DIR, ignore_errors=True)


jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def mlp_params():
  k = jax.random.split(jax.random.key(0), 3)
  return {
      "Dense_0": {"kernel": jax.random.normal(k[0], (16, 32)), "bias": jax.numpy.zeros((32,))},
      "Dense_1": {"kernel": jax.random.normal(k[1], (32, 8)), "bias": jax.numpy.zeros((8,))},
  }


@pytest.fixture(scope="session")
def smollm2():
  """SmolLM2-135M (config, float32 params, tokenizer), read from its GGUF once per test run."""
  from jprune import llm
  return llm.load_gguf()


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
  """Frees each module's compiled executables: XLA:CPU maps memory per executable, and one long session of
  ~160 tests otherwise creeps toward the kernel's limit on memory mappings (vm.max_map_count)."""
  yield
  import gc
  import sys
  llm = sys.modules.get("jprune.llm")
  if llm is not None:
    llm.clear_caches()
  jax.clear_caches()
  gc.collect()
