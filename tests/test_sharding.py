"""Masks on params sharded over 8 forced host devices keep the params' sharding and equal 1-device masks."""

import os
import subprocess
import sys
import textwrap

from conftest import xla_flags

SCRIPT = textwrap.dedent("""
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import NamedSharding, PartitionSpec as P
import jprune as jp
assert jax.device_count() == 8, jax.devices()

def check(mesh):
  rng = np.random.default_rng(0)
  # leaves above the sort path's 16K entries (counting passes); Dense_1 and Dense_1b share a shape but not a
  # sharding, and Dense_1b's ties make the cut fall inside a leaf
  params = {"Dense_0": {"kernel": rng.standard_normal((64, 512)).astype(np.float32)},
            "Dense_1": {"kernel": rng.standard_normal((512, 64)).astype(np.float32)},
            "Dense_1b": {"kernel": np.round(rng.standard_normal((512, 64)), 1).astype(np.float32)}}
  specs = {"Dense_0": {"kernel": P("data", "model")}, "Dense_1": {"kernel": P("model", None)},
           "Dense_1b": {"kernel": P(None, "data")}}
  sharded = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs)
  for scope in ("layer", "global"):
    for gran in (jp.unstructured(), jp.nm(2, 4), jp.neurons()):
      f = jax.jit(lambda p: jp.topk(jp.scores(jp.magnitude(), p), 0.7, scope=scope, granularity=gran))
      single = f(params)
      multi = f(sharded)
      for a, b, p in zip(jax.tree.leaves(single), jax.tree.leaves(multi), jax.tree.leaves(sharded)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        if b.shape == p.shape:
          assert b.sharding.is_equivalent_to(p.sharding, b.ndim), (scope, b.sharding, p.sharding)
  # training step on sharded params: same result as one device, params stay sharded
  tx = jp.pruned(optax.sgd(0.1), schedule=jp.constant(0.8), scope="global")
  def step(p, s):
    u, s = tx.update(jax.tree.map(jnp.ones_like, p), s, p)
    return optax.apply_updates(p, u), s
  a, _ = jax.jit(step)(params, tx.init(params))
  b, sb = jax.jit(step)(sharded, tx.init(sharded))
  for x, y, p in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(sharded)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert y.sharding.is_equivalent_to(p.sharding, y.ndim)

from jax.sharding import AxisType
for axis_type in (AxisType.Explicit, AxisType.Auto):
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(axis_type, axis_type))
  check(mesh)
print("SHARDING-OK")
""")


def test_sharded_masks_match_single_device():
  env = dict(os.environ, XLA_FLAGS=xla_flags(8), JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
  assert out.returncode == 0, out.stderr[-4000:]
  assert "SHARDING-OK" in out.stdout
