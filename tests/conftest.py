import os

os.environ.setdefault("JPRUNE_NO_PROGRESS", "1")

import jax
import pytest

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
