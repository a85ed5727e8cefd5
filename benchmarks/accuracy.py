"""Accuracy of pruned reference models on the full Fashion-MNIST test set, against the issue's targets.

LeNet-300-100: dense, gradual magnitude at 90/95/98%, plus at 90% the seeds' one-shot gradient workflow
(prune by |∂L/∂w| after training, then retrain), one-shot magnitude and gradual Taylor. LeNet-5: dense and
gradual magnitude at 90%. Every pruned model starts from the same dense checkpoint of its architecture.
Run: python benchmarks/accuracy.py [--out runs/accuracy] [--only lenet300]
"""

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import _common  # noqa: E402

import jprune as jp  # noqa: E402
from jprune import job, train  # noqa: E402

# Recipes: gradual magnitude with one global threshold; higher sparsity gets a longer recovery (95%: distillation
# from the dense model and 40 epochs; 98%: 60 epochs at a higher learning rate without weight decay), as in Han
# et al. (longer retraining for more aggressive pruning). Other rows use the defaults (global scope, 20 epochs).
RECIPES = {0.9: dict(scope="global"),
           0.95: dict(scope="global", distill=True, finetune_epochs=40),
           0.98: dict(scope="global", finetune_epochs=60, finetune_lr=2e-3, weight_decay=0.0)}
ROWS = {
    "lenet300": [
        ("gradual magnitude", dict(criterion="magnitude", schedule="polynomial"), (0.9, 0.95, 0.98)),
        ("one-shot gradient magnitude (seeds)", dict(criterion="gradient", schedule="one-shot"), (0.9,)),
        ("one-shot magnitude", dict(criterion="magnitude", schedule="one-shot"), (0.9,)),
        ("gradual Taylor w·g", dict(criterion="taylor", schedule="polynomial"), (0.9,)),
    ],
    "lenet5": [("gradual magnitude", dict(criterion="magnitude", schedule="polynomial"), (0.9,))],
}
TARGETS = {("lenet300", None): 0.895, ("lenet300", 0.9): 0.3, ("lenet300", 0.95): 1.0, ("lenet300", 0.98): 2.5,
           ("lenet5", None): 0.91, ("lenet5", 0.9): 0.3}
RECIPE = dict(epochs=20, finetune_epochs=20, finetune_lr=1e-3)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="runs/accuracy")
  ap.add_argument("--only", default="lenet300,lenet5")
  args = ap.parse_args()
  results = []
  for model_name in args.only.split(","):
    cfg = job.RunConfig(model=model_name, out=os.path.join(args.out, model_name), progress=True, **RECIPE)
    ds = job.load_data(cfg)
    model = job._model_for(cfg, ds)
    t = time.time()
    dense, _ = job.train_dense(cfg, ds, model)
    d = train.evaluate(model, dense["params"], dense.get("batch_stats"), ds.x_test, ds.y_test)
    results.append({"model": model_name, "method": "dense", "sparsity": 0.0, "top1": d["top1"], "top5": d["top5"],
                    "drop_points": 0.0, "target": f">= {100 * TARGETS[(model_name, None)]:.1f}%",
                    "met": d["top1"] >= TARGETS[(model_name, None)], "seconds": time.time() - t})
    print(f"{model_name} dense: {100 * d['top1']:.2f}%", flush=True)
    for label, kw, sparsities in ROWS[model_name]:
      for s in sparsities:
        t = time.time()
        recipe = RECIPES[s] if label.startswith("gradual") else {}
        sub = dataclasses.replace(cfg, sparsity=s, **{**recipe, **kw})
        r = job.prune_and_finetune(sub, ds, model, dense)
        e = train.evaluate(model, r["state"]["params"], r["state"].get("batch_stats"), ds.x_test, ds.y_test)
        drop = 100 * (d["top1"] - e["top1"])
        limit = TARGETS.get((model_name, s)) if label == "gradual magnitude" else None
        results.append({"model": model_name, "method": label, "sparsity": s, "recipe": {**recipe, **kw}, "top1": e["top1"], "top5": e["top5"],
                        "reached": float(jp.sparsity(r["masks"], r["state"]["params"])), "drop_points": drop,
                        "target": None if limit is None else f"drop <= {limit}", "met": None if limit is None
                        else drop <= limit, "seconds": time.time() - t})
        print(f"{model_name} {label} {s:.0%}: {100 * e['top1']:.2f}% (drop {drop:+.2f} points)", flush=True)
  table = "| model | method | sparsity | top-1 | drop (points) | target | met |\n|---|---|---:|---:|---:|---|---|\n"
  for r in results:
    table += (f"| {r['model']} | {r['method']} | {r['sparsity']:.0%} | {100 * r['top1']:.2f}% | "
              f"{r['drop_points']:+.2f} | {r['target'] or ''} | {'' if r['met'] is None else ('yes' if r['met'] else 'NO')} |\n")
  path = _common.write("accuracy", {"recipe": RECIPE, "rows": results, "table": table})
  with open(os.path.join(_common.RESULTS, "accuracy.md"), "w") as f:
    f.write(table)
  print(table)
  print("wrote", path)


if __name__ == "__main__":
  main()
