"""A small pruning run used by the checkpoint tests: train to --until, saving at --save-at steps (or every
step with --save-every), resuming from the latest complete checkpoint in --dir. Writes the final state."""

import argparse
import pickle
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jprune as jp

N = 24


def make(big: int = 0):
  k = jax.random.key(0)
  params = {"Dense_0": {"kernel": jax.random.normal(k, (16, 32)), "bias": jnp.zeros((32,))},
            "Dense_1": {"kernel": jax.random.normal(jax.random.fold_in(k, 1), (32, 4)), "bias": jnp.zeros((4,))}}
  if big:
    params["Big"] = {"kernel": jax.random.normal(jax.random.fold_in(k, 2), (big, 1024)) * 0.01}
  # the Dense kernels are pruned; Big (only there to make each save slow) is trained but not pruned
  tx = jp.pruned(optax.adamw(0.01, weight_decay=0.1), criterion=jp.taylor(ema=0.9),
                 schedule=jp.polynomial(final=0.8, begin=4, end=20, every=4), where=r"^Dense_\d+/kernel$")
  return params, tx


def loss(params, x, y):
  h = jax.nn.relu(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"][None])
  out = h @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"][None]
  extra = sum(jnp.sum(v["kernel"] ** 2) * 1e-4 for k, v in params.items() if k == "Big")
  return jnp.mean((out - y) ** 2) + extra


def batch(step):
  k = jax.random.fold_in(jax.random.key(42), step)
  return jax.random.normal(k, (8, 16)), jax.random.normal(jax.random.fold_in(k, 1), (8, 4))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--dir", required=True)
  ap.add_argument("--until", type=int, default=N)
  ap.add_argument("--save-at", default="")
  ap.add_argument("--save-every", type=int, default=0)
  ap.add_argument("--big", type=int, default=0)
  ap.add_argument("--out", default="")
  args = ap.parse_args()
  params, tx = make(args.big)
  state = {"params": params, "opt": tx.init(params), "key": jax.random.key(7), "data_pos": np.int32(0)}
  like = jax.eval_shape(lambda s: s, state)
  save_at = {int(s) for s in args.save_at.split(",") if s}
  with jp.checkpoint.Manager(args.dir) as mngr:
    start = mngr.latest_step()
    if start is not None:
      state = mngr.restore(start, like=like)
    step_fn = jax.jit(lambda s, x, y: _step(tx, s, x, y))
    t = int(state["data_pos"])
    while t < args.until:
      state = step_fn(state, *batch(t))
      t += 1
      assert int(state["data_pos"]) == t
      if t in save_at or (args.save_every and t % args.save_every == 0):
        print(f"saving {t}", flush=True)
        mngr.save(t, state)
        print(f"saved {t}", flush=True)
  if args.out:
    with open(args.out, "wb") as f:
      pickle.dump(jax.tree.map(lambda x: np.asarray(jax.random.key_data(x) if jnp.issubdtype(
          x.dtype, jax.dtypes.prng_key) else x), state), f)


def _step(tx, s, x, y):
  g = jax.grad(loss)(s["params"], x, y)
  u, opt = tx.update(g, s["opt"], s["params"])
  key, _ = jax.random.split(s["key"])
  return {"params": optax.apply_updates(s["params"], u), "opt": opt, "key": key, "data_pos": s["data_pos"] + 1}


if __name__ == "__main__":
  sys.exit(main())
