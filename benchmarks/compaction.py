"""Compaction pays: params, XLA-counted FLOPs and median jitted inference latency of compacted / dense,
measured side by side (alternating) in one run, for the reference MLP (LeNet-300-100) and CNNs (LeNet-5, the
small ResNet) with 25%, 50%, 75% of every prunable group's units removed (by L2 magnitude; kept widths rounded up to
multiples of 8 with --round-to 8, since odd channel counts make XLA:CPU convolutions slower, not faster).
Target: at 50% for the MLP, latency ratio <= 1.25 x FLOP ratio.
Also three linen models jprune does not ship (a CNN with BatchNorm and dropout, an MLP-Mixer, a ViT whose attention
heads are pruned too), 32x32x3 inputs, run compacted through `jprune.resize.resized` (no hand-written small copy).
Run: python benchmarks/compaction.py [--batch 256]
"""

import argparse
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import _common  # noqa: E402

import jprune as jp  # noqa: E402
from jprune import report, structured as S  # noqa: E402
from jprune.models import LeNet300, LeNet5, ResNet, resize  # noqa: E402


class UserCNN(nn.Module):
  """A user's CNN: conv-BN-ReLU x3 (64/128/128, stride 2 twice), dropout, a 256-wide hidden Dense."""
  @nn.compact
  def __call__(self, x, train=False):
    for i, (c, s) in enumerate(((64, 1), (128, 2), (128, 2))):
      x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(c, (3, 3), strides=s)(x)))
    x = nn.Dropout(0.25, deterministic=not train)(x).mean((1, 2))
    return nn.Dense(10)(nn.relu(nn.Dense(256)(x)))


class UserMixer(nn.Module):
  """MLP-Mixer: 4x4 patches, width 128, token MLP 64, channel MLP 512, 4 blocks (tests use smaller ones)."""
  width: int = 128
  token_mlp: int = 64
  channel_mlp: int = 512
  depth: int = 4

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.width, (4, 4), strides=4)(x)
    x = x.reshape(x.shape[0], -1, self.width)
    for _ in range(self.depth):
      y = jnp.swapaxes(nn.LayerNorm()(x), 1, 2)                     # token mixing along the patch axis
      x = x + jnp.swapaxes(nn.Dense(x.shape[1])(nn.gelu(nn.Dense(self.token_mlp)(y))), 1, 2)
      x = x + nn.Dense(self.width)(nn.gelu(nn.Dense(self.channel_mlp)(nn.LayerNorm()(x))))
    return nn.Dense(10)(nn.LayerNorm()(x).mean(1))


class UserViT(nn.Module):
  """ViT: 4x4 patches, width 128, 8 heads of 16, MLP 512, 4 blocks (tests use smaller ones)."""
  width: int = 128
  heads: int = 8
  mlp: int = 512
  depth: int = 4

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.width, (4, 4), strides=4)(x)
    x = x.reshape(x.shape[0], -1, self.width)
    x = x + self.param("pos", nn.initializers.normal(0.02), (1, x.shape[1], self.width))
    for _ in range(self.depth):
      y = nn.LayerNorm()(x)
      x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(y, y)
      x = x + nn.Dense(self.width)(nn.gelu(nn.Dense(self.mlp)(nn.LayerNorm()(x))))
    return nn.Dense(10)(nn.LayerNorm()(x).mean(1))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=256)
  ap.add_argument("--rounds", type=int, default=7)
  ap.add_argument("--round-to", type=int, default=8, help="kept widths are multiples of this (hardware-friendly)")
  ap.add_argument("--models", default="", help="comma-separated name parts to run (default: all)")
  args = ap.parse_args()
  rows = []
  mnist, cifar = (28, 28, 1), (32, 32, 3)
  for name, model, shape in (("lenet300 (MLP)", LeNet300(), mnist), ("lenet5 (CNN)", LeNet5(), mnist),
                             ("resnet (CNN+BN)", ResNet(), mnist), ("user CNN+BN+dropout (linen)", UserCNN(), cifar),
                             ("user MLP-Mixer (linen)", UserMixer(), cifar), ("user ViT (linen)", UserViT(), cifar)):
    if args.models and not any(m in name for m in args.models.split(",")):
      continue
    x = jax.random.normal(jax.random.key(1), (args.batch, *shape))
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
      sm = resize(model, small)   # jprune's models: rebuilt; the user models: jprune.resize.resized(model)
      masked = dict(variables, params=jp.apply(params, S.to_param_masks(groups, gm, params)))
      diff = float(jnp.max(jnp.abs(sm.apply(sv, x[:16]) - model.apply(masked, x[:16]))))   # compacted == masked
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
             "speedup": 1 / lat_ratio, "max_abs_diff_vs_masked": diff}
      rows.append(row)
      print(f"{name} {frac:.0%} removed: params {row['params_ratio']:.3f}, FLOPs {row['flops_ratio']:.3f}, "
            f"latency {lat_ratio:.3f} ({row['speedup']:.2f}x faster; latency/FLOP ratio "
            f"{row['latency_over_flops']:.2f}; |compacted - masked| <= {diff:.1e})", flush=True)
  command = " ".join(["python benchmarks/compaction.py", *sys.argv[1:]])
  mlp50 = next((r for r in rows if r["model"].startswith("lenet300") and r["removed"] == 0.5), None)
  if mlp50 is None or args.models:   # a partial run: its own file, never mixed into the full run's
    slug = "-".join(sorted(m.strip().replace(" ", "_") for m in args.models.split(",") if m.strip())) or "partial"
    print("wrote", _common.write(f"compaction-{slug}", {"batch": args.batch, "rows": rows, "command": command}))
    return
  path = _common.write("compaction", {"batch": args.batch, "rows": rows, "target_mlp50_latency_over_flops": 1.25,
                                      "mlp50_latency_over_flops": mlp50["latency_over_flops"],
                                      "command": command})
  print("wrote", path)


if __name__ == "__main__":
  main()
