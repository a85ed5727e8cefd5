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
