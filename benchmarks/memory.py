"""Peak memory of a jitted optimizer step: `pruned(adam)` against plain `adam`, same params, same gradients.

For each tree (LeNet-300-100; SmolLM2-135M's parameter shapes, 135M float32 entries) and each optimizer, the step
`(params, state, grads) -> (params', state')` is compiled with params and state donated (updated in place, as a
training loop does) and measured two ways:
- XLA's `compiled.memory_analysis()`: arguments + outputs + temporaries − aliased (donated) bytes, i.e. what the
  program needs at its peak, and the temporaries alone;
- peak RSS of the same fresh process, which compiles the step, then builds the params, the optimizer state and the
  gradients, and runs 3 steps (VmHWM from /proc/self/status), minus the RSS after `import jax, jprune` (the
  interpreter and libraries); split into what the process keeps after compiling (the compiler's memory and the
  executable: `compile_rss_bytes`) and the peak above that while the arrays are built and the step runs
  (`run_rss_bytes`, `run_rss_ratio`).
The gradients are an argument, so the model's forward/backward (the same in both) is left out: the comparison is
the optimizer's own cost. `pruned` uses magnitude scores, global scope and a polynomial schedule whose first mask
update is at step 0 (the step measured runs the k-th-key search and builds masks).

Run: python benchmarks/memory.py      (~1.5 minutes on 2 CPU cores) → benchmarks/results/memory.json
"""

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))

CHILD = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np, optax
import jprune as jp

def status(key):   # from /proc: VmHWM is this address space's own peak (getrusage's ru_maxrss survives exec and
  for line in open("/proc/self/status"):   # starts at the parent's resident size)
    if line.startswith(key + ":"):
      return int(line.split()[1]) * 1024

base = status("VmRSS")
tree, kind, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.path.insert(0, sys.argv[4])
from memory import compiled_step, analysis
shp, tx, step = compiled_step(tree, kind)   # first, alone: the compiler's memory
compiled_rss, compile_peak = status("VmRSS"), status("VmHWM")
keys = jax.random.split(jax.random.key(0), len(jax.tree.leaves(shp)))
leaves = [jax.random.normal(k, s.shape, jnp.float32) * 0.02 for k, s in zip(keys, jax.tree.leaves(shp))]
params = jax.tree.unflatten(jax.tree.structure(shp), leaves)
grads = jax.tree.map(lambda p: p * 0.1, params)
state = jax.jit(tx.init)(params)
for _ in range(steps):
  params, state = step(params, state, grads)
jax.block_until_ready(params)
peak = status("VmHWM")
print(json.dumps({"peak_rss": peak, "base_rss": base, "compiled_rss": compiled_rss, "compile_peak": compile_peak,
                  "xla": analysis(step, shp)}))
"""


def shapes(tree: str):
  import jax
  import jax.numpy as jnp
  from jprune import models
  if tree == "lenet300":
    return jax.eval_shape(lambda: models.LeNet300().init(jax.random.key(0), jnp.zeros((1, 28, 28, 1))))["params"]
  cfg = models.LlamaConfig.smollm2_135m()
  return jax.eval_shape(lambda: models.Llama(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"]


def optimizer(kind: str):
  import optax
  import jprune as jp
  adam = optax.adam(1e-3)
  if kind == "adam":
    return adam
  return jp.pruned(adam, schedule=jp.polynomial(final=0.9, begin=0, end=1000, every=100), scope="global")


def compiled_step(tree: str, kind: str):
  """(param shapes, optimizer, the step `(params, state, grads) -> (params', state')` jitted with params and
  state donated and compiled for those shapes)."""
  import jax
  import optax
  shp = shapes(tree)
  tx = optimizer(kind)
  step = jax.jit(lambda p, s, g: (lambda u_s: (optax.apply_updates(p, u_s[0]), u_s[1]))(tx.update(g, s, p)),
                 donate_argnums=(0, 1))
  return shp, tx, step.lower(shp, jax.eval_shape(tx.init, shp), shp).compile()


def analysis(compiled, shp) -> dict:
  """XLA's memory analysis of a compiled step."""
  import jax
  m = compiled.memory_analysis()
  total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
  return {"xla_total_bytes": int(total), "xla_temp_bytes": int(m.temp_size_in_bytes),
          "argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
          "alias_bytes": int(m.alias_size_in_bytes),
          "param_bytes": int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shp)))}


def rss(tree: str, kind: str, steps: int = 3) -> dict:
  out = subprocess.run([sys.executable, "-c", CHILD, tree, kind, str(steps), os.path.dirname(__file__)],
                       capture_output=True, text=True, timeout=1800)
  if out.returncode != 0:
    raise RuntimeError(out.stderr[-2000:])
  r = json.loads(out.stdout.strip().splitlines()[-1])
  return {**r["xla"], "peak_rss_bytes": r["peak_rss"], "rss_above_imports_bytes": r["peak_rss"] - r["base_rss"],
          "compile_rss_bytes": r["compiled_rss"] - r["base_rss"], "compile_peak_rss_bytes": r["compile_peak"] - r["base_rss"],
          "run_rss_bytes": r["peak_rss"] - r["compiled_rss"]}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--trees", default="lenet300,smollm2")
  args = ap.parse_args()
  import _common
  rows = []
  for tree in args.trees.split(","):
    got = {kind: rss(tree, kind) for kind in ("adam", "pruned")}   # the child compiles once and reports both
    a, p = got["adam"], got["pruned"]
    row = {"tree": tree, "adam": a, "pruned": p,
           "xla_ratio": p["xla_total_bytes"] / a["xla_total_bytes"],
           "rss_ratio": p["rss_above_imports_bytes"] / a["rss_above_imports_bytes"],
           "run_rss_ratio": p["run_rss_bytes"] / a["run_rss_bytes"]}
    rows.append(row)
    print(f"{tree}: params {a['param_bytes'] / 2**20:.1f} MiB | XLA peak adam {a['xla_total_bytes'] / 2**20:.1f} MiB, "
          f"pruned {p['xla_total_bytes'] / 2**20:.1f} MiB (x{row['xla_ratio']:.3f}; temporaries "
          f"{a['xla_temp_bytes'] / 2**20:.1f} vs {p['xla_temp_bytes'] / 2**20:.1f} MiB) | RSS above imports adam "
          f"{a['rss_above_imports_bytes'] / 2**20:.0f} MiB, pruned {p['rss_above_imports_bytes'] / 2**20:.0f} MiB "
          f"(x{row['rss_ratio']:.3f}), of which the compiler keeps {a['compile_rss_bytes'] / 2**20:.0f} / "
          f"{p['compile_rss_bytes'] / 2**20:.0f} MiB; running the step {a['run_rss_bytes'] / 2**20:.0f} / "
          f"{p['run_rss_bytes'] / 2**20:.0f} MiB (x{row['run_rss_ratio']:.3f})", flush=True)
  if args.trees == "lenet300,smollm2":
    print("wrote", _common.write("memory", {"rows": rows, "target_ratio": 1.3}))


if __name__ == "__main__":
  main()
