"""The main job with structured pruning: LeNet-300-100 on Fashion-MNIST, 50% of hidden neurons removed
(coupled groups from the jaxpr), fine-tuned, compacted. Targets: loses <= 1.0 point, runs >= 1.8x faster.
Same code path as `jprune run --granularity neurons --sparsity 0.5 --compact`.
Run: python benchmarks/structured_accuracy.py [--out runs/accuracy/lenet300]   (reuses that dense checkpoint)
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import _common  # noqa: E402

from jprune import job  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="runs/accuracy/lenet300")
  args = ap.parse_args()
  cfg = job.RunConfig(model="lenet300", granularity="neurons", sparsity=0.5, compact=True, schedule="one-shot",
                      out=args.out, epochs=20, finetune_epochs=20, noise=())
  m = job.run(cfg)
  c = m["compact"]
  drop = 100 * (m["dense"]["top1"] - c["top1"])
  out = {"dense_top1": m["dense"]["top1"], "compact_top1": c["top1"], "drop_points": drop,
         "speedup": c["speedup"], "params": c["params"], "dense_params": c["dense_params"], "flops": c["flops"],
         "dense_flops": c["dense_flops"], "widths": c["widths"], "targets": {"drop_points": 1.0, "speedup": 1.8},
         "met": drop <= 1.0 and c["speedup"] >= 1.8}
  path = _common.write("structured_accuracy", out)
  print(f"lenet300, 50% hidden neurons removed: top-1 {100 * c['top1']:.2f}% (dense {100 * m['dense']['top1']:.2f}%, "
        f"drop {drop:.2f} points), {c['speedup']:.2f}x faster, {c['params']:,}/{c['dense_params']:,} params; "
        f"wrote {path}")


if __name__ == "__main__":
  main()
