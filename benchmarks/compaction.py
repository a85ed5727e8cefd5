"""Compaction pays: params, XLA-counted FLOPs and median jitted inference latency of compacted / dense,
measured side by side (alternating) in one run, for the reference MLP (LeNet-300-100) and CNNs (LeNet-5, the
small ResNet) with 25%, 50%, 75% of every prunable group's units removed (by L2 magnitude; kept widths rounded up to
multiples of 8 with --round-to 8, since odd channel counts make XLA:CPU convolutions slower, not faster).
Target: at 50% for the MLP, latency ratio <= 1.25 x FLOP ratio.
Run: python benchmarks/compaction.py [--batch 256]
"""

import argparse
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import _common  # noqa: E402

import jprune as jp  # noqa: E402
from jprune import report, structured as S  # noqa: E402
from jprune.models import LeNet300, LeNet5, ResNet, resize  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=256)
  ap.add_argument("--rounds", type=int, default=7)
  ap.add_argument("--round-to", type=int, default=8, help="kept widths are multiples of this (hardware-friendly)")
  args = ap.parse_args()
  rows = []
  for name, model in (("lenet300 (MLP)", LeNet300()), ("lenet5 (CNN)", LeNet5()), ("resnet (CNN+BN)", ResNet())):
    x = jax.random.normal(jax.random.key(1), (args.batch, 28, 28, 1))
    variables = model.init(jax.random.key(0), x[:2])
    params, stats = variables["params"], variables.get("batch_stats")
    apply = lambda m: (lambda v, x: m.apply(v, x))
    if stats:
      groups = S.groups(lambda p, b, x: model.apply({"params": p, "batch_stats": b}, x), params, stats, x[:2])
    else:
      groups = S.groups(lambda p, x: model.apply({"params": p}, x), params, x[:2])
    gs = S.group_scores(groups, jp.scores(jp.magnitude(), params))
    dense_flops = report.flops(apply(model), variables, x)
    for frac in (0.25, 0.5, 0.75):
      gm = S.group_masks(groups, gs, frac, scope="group", max_ratio=0.95, round_to=args.round_to)
      if stats:
        small, _, small_stats = S.compact(params, groups, gm, extra=stats)
        sv = {"params": small, "batch_stats": small_stats}
      else:
        small, _ = S.compact(params, groups, gm)
        sv = {"params": small}
      sm = resize(model, small)
      flops = report.flops(apply(sm), sv, x)
      t_dense, t_small = [], []
      for _ in range(args.rounds):
        t_dense.append(report.latency(apply(model), variables, x, repeats=15))
        t_small.append(report.latency(apply(sm), sv, x, repeats=15))
      n_dense = sum(p.size for p in jax.tree.leaves(params))
      n_small = sum(p.size for p in jax.tree.leaves(small))
      lat_ratio = float(np.median(t_small) / np.median(t_dense))
      row = {"model": name, "removed": frac, "params_ratio": n_small / n_dense, "flops_ratio": flops / dense_flops,
             "latency_ratio": lat_ratio, "latency_over_flops": lat_ratio / (flops / dense_flops),
             "dense_latency_s": float(np.median(t_dense)), "compact_latency_s": float(np.median(t_small)),
             "speedup": 1 / lat_ratio}
      rows.append(row)
      print(f"{name} {frac:.0%} removed: params {row['params_ratio']:.3f}, FLOPs {row['flops_ratio']:.3f}, "
            f"latency {lat_ratio:.3f} ({row['speedup']:.2f}x faster; latency/FLOP ratio "
            f"{row['latency_over_flops']:.2f})", flush=True)
  mlp50 = next(r for r in rows if r["model"].startswith("lenet300") and r["removed"] == 0.5)
  path = _common.write("compaction", {"batch": args.batch, "rows": rows, "target_mlp50_latency_over_flops": 1.25,
                                      "mlp50_latency_over_flops": mlp50["latency_over_flops"]})
  print("wrote", path)


if __name__ == "__main__":
  main()
