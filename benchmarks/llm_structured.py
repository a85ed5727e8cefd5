"""Structured pruning of SmolLM2-135M that pays off in llama.cpp: quality, recovery, export fidelity and speed.

Text: the Jargon File. Calibration windows and distillation training windows come from its first half,
perplexity from its last `--eval-windows` × `--eval-len` tokens (disjoint). One run measures:
  1. every criterion (l2 baseline, activation, flap, taylor, fisher) at 10 / 20 / 30% of the decoder blocks'
     params removed (MLP neurons, per-layer allocation; fisher also global), perplexity before recovery, and
     at 20% also with least-squares reconstruction;
  2. recovery of the best 20% model by distillation from the dense model (KL + α·LM loss on the training half,
     α = 0.5 by default) for `--distill-minutes` (the L2 baseline too, for as long, with
     `--baseline-recovery`), perplexity after;
  3. GGUF exports run by llama.cpp (node-llama-cpp's prebuilt CPU binary): dense f32/f16/q8_0 and the recovered
     compacted model against jprune's perplexity on the same token ids, greedy tokens on 5 prompts, Wanda 50%
     and SparseGPT 2:4 exports;
  4. llama.cpp speed, dense vs compacted, alternating between them: prompt processing (one 256-token batch)
     and generation tokens/s; time saved per token vs MACs saved per token.

Run: python benchmarks/llm_structured.py [--distill-minutes 30] [--quick]
Writes benchmarks/results/llm_structured.json and llm_structured.png.

A killed run resumes: finished stage-1 cells and the distillation checkpoint live in
`runs/llm_structured/<digest>/`, where the digest covers every argument, the script's `RECIPE_VERSION` and every `jprune/`
source file, so nothing is reused unless everything that produced it is the same (`--fresh` ignores it).
"""

import argparse
import glob
import hashlib
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import _common  # noqa: E402

from jprune import llm  # noqa: E402
from jprune.llm import distill, llamacpp, width  # noqa: E402
from jprune.llm.job import _llamacpp_speed  # noqa: E402
from jprune.llm.text import train_windows  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--calib", type=int, default=32)
  ap.add_argument("--calib-len", type=int, default=256)
  ap.add_argument("--eval-windows", type=int, default=16)
  ap.add_argument("--eval-len", type=int, default=512)
  ap.add_argument("--distill-minutes", type=float, default=30.0)
  ap.add_argument("--distill-lr", type=float, default=3e-4)
  ap.add_argument("--alpha", type=float, default=0.5, help="weight of the LM loss on the training half next to KD")
  ap.add_argument("--baseline-recovery", action="store_true", help="also distil the L2 baseline as long")
  ap.add_argument("--quick", action="store_true", help="fewer cells, 2 minutes of distillation (a smoke run)")
  ap.add_argument("--points-for", default=None,
                  help="criterion-allocation pairs measured at 10/30%% too (default: all), e.g. l2-layer,flap-layer")
  ap.add_argument("--reconstruct-for", default=None,
                  help="criterion-allocation pairs also measured with reconstruction at 20%% (default: all)")
  ap.add_argument("--fresh", action="store_true", help="recompute everything (ignore the resume folder)")
  args = ap.parse_args()
  work = _work_dir(args)
  cache_path = os.path.join(work, "cells.json")
  cached = {} if args.fresh or not os.path.exists(cache_path) else json.load(open(cache_path))
  print(f"resume folder {work} ({len(cached)} finished cells)", flush=True)
  t_start = time.perf_counter()
  if args.quick:
    args.distill_minutes, args.eval_windows = min(args.distill_minutes, 2.0), 4

  cfg, params, tok = llm.load_gguf()
  ids = tok.encode(llm.jargon_text())
  cal, evals = llm.split_text_tokens(ids, args.calib, args.calib_len, args.eval_windows, args.eval_len)
  train = train_windows(ids, 256)
  dense_ppl = llm.perplexity(cfg, params, evals, seq_len=args.eval_len)
  print(f"dense perplexity {dense_ppl:.2f} on {evals.shape}; calibration {cal.shape}, training windows {train.shape}",
        flush=True)
  out = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to f32), Jargon File", "params": width.n_params(params),
         "block_params": sum(cfg.block_params(i) for i in range(cfg.n_layers)), "dense_perplexity": dense_ppl,
         "macs_per_token": cfg.macs_per_token(), "calibration": list(cal.shape), "eval": list(evals.shape),
         "train_windows": list(train.shape), "cells": []}

  # 1. criteria x sparsity, before recovery
  t0 = time.perf_counter()
  stats = width.activation_stats(cfg, params, cal)
  gates = width.gate_gradients(cfg, params, cal)
  scores = {c: width.unit_scores(cfg, params, cal, c, stats=stats, gates=gates) for c in width.CRITERIA}
  out["scoring_seconds"] = time.perf_counter() - t0
  sparsities = (0.2,) if args.quick else (0.1, 0.2, 0.3)
  settings = [(c, "layer") for c in width.CRITERIA] + [("fisher", "global")]
  results = {}
  def chosen(spec, c, a):
    return spec is None or f"{c}-{a}" in spec.split(",")
  cells = ([(c, a, s, False) for c, a in settings for s in sparsities if s == 0.2 or chosen(args.points_for, c, a)]
           + [(c, a, 0.2, True) for c, a in settings if chosen(args.reconstruct_for, c, a)])
  def prune_cell(name):
    crit, alloc, s, rec = specs[name]
    return width.prune_width(cfg, params, cal, sparsity=s, criterion=crit, kinds=("mlp",), allocation=alloc,
                             reconstruct=rec, scores=scores[crit], stats=stats, progress=False)

  def pruned(name):   # only the models later stages use stay in memory (18 pruned copies would not fit in 24 GB)
    if name not in results:
      results[name] = prune_cell(name)
    return results[name]

  specs = {f"{c}-{a}-{s:g}" + ("-reconstructed" if r else ""): (c, a, s, r) for c, a, s, r in cells}
  for name, (crit, alloc, s, rec) in specs.items():
    if name in cached:
      cell = cached[name]
    else:
      res = prune_cell(name)
      ppl = llm.perplexity(res.config, res.params, evals, seq_len=args.eval_len)
      cell = {"name": name, "criterion": crit, "allocation": alloc, "sparsity": s, "reconstruct": rec,
              "removed_fraction_of_blocks": res.info["removed_fraction_of_blocks"],
              "params_after": res.info["params_after"], "macs_per_token_after": res.info["macs_per_token_after"],
              "perplexity_before_recovery": ppl}
      cached[name] = cell
      _atomic_json(cache_path, cached)
      del res
    out["cells"].append(cell)
    print(f"{name:34s} {100 * cell['removed_fraction_of_blocks']:.1f}% of block params: "
          f"perplexity {cell['perplexity_before_recovery']:10.2f}", flush=True)
  at20 = {c["name"]: c for c in out["cells"] if c["sparsity"] == 0.2}
  best = min((c for c in at20.values() if c["criterion"] != "l2"), key=lambda c: c["perplexity_before_recovery"])
  l2 = min((c for c in at20.values() if c["criterion"] == "l2"), key=lambda c: c["perplexity_before_recovery"])
  out["best_at_20"] = best["name"]
  out["best_vs_l2_at_20"] = {"best": best["perplexity_before_recovery"], "l2": l2["perplexity_before_recovery"]}

  # 2. recovery by distillation
  recovered = {}
  for name in [best["name"]] + ([l2["name"]] if args.baseline_recovery else []):
    res = pruned(name)
    d = distill.distill(res.config, res.params, cfg, params, train, steps=10 ** 6, batch_size=8, lr=args.distill_lr,
                        alpha=args.alpha, warmup=10, max_seconds=60 * args.distill_minutes, log_every=10,
                        checkpoint_dir=os.path.join(work, f"distill-{name}"), save_every=100, progress=True)
    ppl = llm.perplexity(res.config, d.params, evals, seq_len=args.eval_len)
    recovered[name] = d.params
    cell = next(c for c in out["cells"] if c["name"] == name)
    cell.update(perplexity_after_recovery=ppl, distill_steps=d.steps, distill_seconds=d.seconds,
                distill_tokens=d.steps * 8 * 256, distill_history=d.history)
    print(f"{name}: recovered {ppl:.2f} ({ppl / dense_ppl:.3f}x dense) after {d.steps} steps, "
          f"{d.seconds / 60:.1f} min", flush=True)
  out["recovered_over_dense"] = recovered and (next(c for c in out["cells"] if c["name"] == best["name"])
                                              ["perplexity_after_recovery"] / dense_ppl)

  # 3. exports run by llama.cpp
  tmp = tempfile.mkdtemp(prefix="jprune-llm-bench-")
  fid = {}
  prompts = ["The capital of France is", "A hacker is a person who", "In the beginning", "The kernel of Unix",
             "Emacs is a text editor that"]
  p_ids = [tok.encode(p) for p in prompts]
  want = [llm.generate(cfg, params, p, 8) for p in p_ids]
  paths = {}
  for dtype in ("f32", "f16", "q8_0"):
    path = os.path.join(tmp, f"dense-{dtype}.gguf")
    info = llm.save_gguf(path, cfg, params, tok, dtype=dtype)
    got = llamacpp.run(path, windows=evals, prompts=p_ids, new_tokens=8)
    ppl = float(np.exp(sum(got["nll"]) / sum(got["count"])))
    fid[f"dense-{dtype}"] = {"llamacpp_perplexity": ppl, "jprune_perplexity": dense_ppl,
                             "relative_difference": ppl / dense_ppl - 1, "bytes": info["bytes"],
                             "greedy_agree": int(sum(g == w for g, w in zip(got["greedy"], want)))}
    paths[f"dense-{dtype}"] = path
  small_name = best["name"]
  res = pruned(small_name)
  small_params = recovered.get(small_name, res.params)
  path = os.path.join(tmp, "pruned-f32.gguf")
  info = llm.save_gguf(path, res.config, small_params, tok, dtype="f32")
  got = llamacpp.run(path, windows=evals)
  ppl_cpp = float(np.exp(sum(got["nll"]) / sum(got["count"])))
  ppl_j = llm.perplexity(res.config, small_params, evals, seq_len=args.eval_len)
  fid["pruned-f32"] = {"llamacpp_perplexity": ppl_cpp, "jprune_perplexity": ppl_j,
                       "relative_difference": ppl_cpp / ppl_j - 1, "bytes": info["bytes"],
                       "architecture": info["architecture"]}
  paths["pruned-f32"] = path
  for method, gran in (("wanda", "unstructured"), ("sparsegpt", "2:4")):
    if args.quick and method == "sparsegpt":
      continue
    pr = llm.prune(cfg, params, cal, method=method, sparsity=0.5, granularity=gran, progress=False)
    path = os.path.join(tmp, f"{method}.gguf")
    llm.save_gguf(path, cfg, pr.params, tok, dtype="f32")
    got = llamacpp.run(path, windows=evals)
    ppl_cpp = float(np.exp(sum(got["nll"]) / sum(got["count"])))
    ppl_j = llm.perplexity(cfg, pr.params, evals, seq_len=args.eval_len)
    fid[f"{method}-{gran}"] = {"llamacpp_perplexity": ppl_cpp, "jprune_perplexity": ppl_j,
                               "relative_difference": ppl_cpp / ppl_j - 1}
  for k, v in fid.items():
    print(f"export {k:22s} llama.cpp {v['llamacpp_perplexity']:9.3f}  jprune {v['jprune_perplexity']:9.3f}  "
          f"({100 * v['relative_difference']:+.2f}%)" + (f"  greedy {v['greedy_agree']}/5" if "greedy_agree" in v
                                                           else ""), flush=True)
  out["fidelity"] = fid

  # 4. speed in llama.cpp, dense vs compacted (f32 both), alternating
  speed = _llamacpp_speed({"dense": paths["dense-f32"], "pruned": paths["pruned-f32"]},
                          [int(t) for t in ids[:256]], rounds=2 if args.quick else 4, gen=32)
  macs_ratio = best["macs_per_token_after"] / out["macs_per_token"]
  time_ratio_pp = speed["dense"]["pp_tokens_per_s"] / speed["pruned"]["pp_tokens_per_s"]
  time_ratio_tg = speed["dense"]["tg_tokens_per_s"] / speed["pruned"]["tg_tokens_per_s"]
  out["speed"] = speed
  out["speed_checks"] = {"macs_saved": 1 - macs_ratio, "pp_time_saved": 1 - time_ratio_pp,
                         "tg_time_saved": 1 - time_ratio_tg,
                         "pp_time_saved_over_macs_saved": (1 - time_ratio_pp) / (1 - macs_ratio)}
  print(f"llama.cpp prompt t/s dense {speed['dense']['pp_tokens_per_s']:.1f} pruned "
        f"{speed['pruned']['pp_tokens_per_s']:.1f}; generation {speed['dense']['tg_tokens_per_s']:.1f} / "
        f"{speed['pruned']['tg_tokens_per_s']:.1f}; MACs saved {100 * (1 - macs_ratio):.1f}%, prompt time saved "
        f"{100 * (1 - time_ratio_pp):.1f}%, generation time saved {100 * (1 - time_ratio_tg):.1f}%", flush=True)
  for p in os.listdir(tmp):
    os.unlink(os.path.join(tmp, p))
  os.rmdir(tmp)

  out["targets"] = {"recovered_over_dense_max": 1.35, "pp_time_saved_over_macs_saved_min": 0.8,
                    "export_relative_difference_max": {"f32": 0.01, "f16": 0.01, "q8_0": 0.03, "pruned": 0.01}}
  out["wall_seconds"] = time.perf_counter() - t_start
  name = "llm_structured_quick" if args.quick else "llm_structured"
  path = _common.write(name, out)
  _plot(out, os.path.join(_common.RESULTS, f"{name}.png"))
  print("wrote", path)


# Bump when this script changes how a cell or the distillation is computed (the digest then changes).
RECIPE_VERSION = 1


def _work_dir(args) -> str:
  """`runs/llm_structured/<digest>`: the digest covers the arguments, `RECIPE_VERSION` and every jprune source."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  h = hashlib.sha256(json.dumps({k: v for k, v in sorted(vars(args).items()) if k != "fresh"}).encode())
  h.update(f"recipe {RECIPE_VERSION}".encode())
  for f in sorted(glob.glob(os.path.join(root, "jprune", "**", "*.py"), recursive=True)):
    h.update(f.encode())
    h.update(open(f, "rb").read())
  work = os.path.join(root, "runs", "llm_structured", h.hexdigest()[:16])
  os.makedirs(work, exist_ok=True)
  return work


def _atomic_json(path, obj):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _plot(out, path):
  from jprune import report
  curves = {}
  for c in out["cells"]:
    if c["reconstruct"]:
      continue
    key = f"{c['criterion']} ({c['allocation']})"
    xs, ys = curves.setdefault(key, ([], []))
    xs.append(100 * c["removed_fraction_of_blocks"])
    ys.append(c["perplexity_before_recovery"])
  for c in out["cells"]:
    if "perplexity_after_recovery" in c:
      curves[f"{c['name']} after distillation"] = ([100 * c["removed_fraction_of_blocks"]],
                                                   [c["perplexity_after_recovery"]])
    if c["reconstruct"]:
      curves[c["name"]] = ([100 * c["removed_fraction_of_blocks"]], [c["perplexity_before_recovery"]])
  curves = {k: v for k, v in curves.items() if max(v[1]) < 20 * out["dense_perplexity"]}  # l2's blow-ups off-scale
  report.plot_lines(curves, path, xlabel="% of decoder-block params removed", ylabel="perplexity (held-out Jargon)",
                    title="SmolLM2-135M structured pruning", baseline=out["dense_perplexity"])


if __name__ == "__main__":
  main()
