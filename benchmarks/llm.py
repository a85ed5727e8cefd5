"""LLM one-shot pruning on SmolLM2-135M with the Jargon File: perplexity and time per method.

Calibration windows come from the first half of the Jargon File, perplexity from its last `--eval-windows`
windows (disjoint). Time of each method is divided by the time of one forward pass of the whole model over the
calibration tokens, measured in the same run. Block 0 of each method includes compilation; the "steady" time
replaces it by the median of the other blocks (the forward pass is likewise timed warm).

Run: python benchmarks/llm.py [--calib 32] [--calib-len 256] [--eval-windows 16] [--random-config llama_1b]
(`--random-config` prunes a random-init model of that LlamaConfig instead: timings only, for GPUs.)
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import _common  # noqa: E402

import jprune as jp  # noqa: E402
from jprune import llm  # noqa: E402
from jprune.models import Llama, LlamaConfig  # noqa: E402

SETTINGS = [(m, s, g) for m in ("magnitude", "gradient", "wanda", "sparsegpt")
            for (s, g) in ((0.5, "unstructured"), (0.5, "4:8"), (0.5, "2:4"))] + [("gradient", 0.2, "unstructured")]


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--calib", type=int, default=32, help="calibration sequences")
  ap.add_argument("--calib-len", type=int, default=256)
  ap.add_argument("--eval-windows", type=int, default=16)
  ap.add_argument("--eval-len", type=int, default=512)
  ap.add_argument("--batch-size", type=int, default=8)
  ap.add_argument("--methods", default="", help="comma-separated subset of method names")
  ap.add_argument("--random-config", default="", help="e.g. llama_1b: random-init model, timings only")
  args = ap.parse_args()

  if args.random_config:
    cfg = getattr(LlamaConfig, args.random_config)()
    model = Llama(cfg)
    params = jax.jit(lambda k: model.init(k, jnp.zeros((1, 8), jnp.int32))["params"])(jax.random.key(0))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (args.calib + args.eval_windows * 2) * max(args.calib_len, args.eval_len))
    source = f"random-init {args.random_config}, random tokens"
  else:
    cfg, params, tok = llm.load_gguf()
    model = Llama(cfg)
    ids = np.asarray(tok.encode(llm.jargon_text()), np.int32)
    source = "SmolLM2-135M-Instruct (GGUF Q4_1/Q8_0 dequantized to f32), Jargon File"
  n_params = sum(x.size for x in jax.tree.leaves(params))
  half = len(ids) // 2
  step = max(args.calib_len, (half - args.calib_len) // args.calib)
  calib = np.stack([ids[i * step: i * step + args.calib_len] for i in range(args.calib)])
  evals = llm.token_windows(ids[-args.eval_windows * args.eval_len:], args.eval_len)

  fwd = llm.forward_fn(cfg)
  batches = [jnp.asarray(calib[s: s + args.batch_size]) for s in range(0, len(calib), args.batch_size)]

  def calib_forward():
    return [fwd(params, b) for b in batches]

  jax.block_until_ready(calib_forward())
  t_fwd = _common.interleaved({"fwd": (calib_forward, ())}, rounds=1, block=3)["fwd"]
  print(f"{source}: {n_params / 1e6:.1f}M params; one calibration forward ({calib.shape}) {t_fwd:.2f} s")
  dense_ppl = llm.perplexity(model, params, evals, seq_len=args.eval_len)
  print(f"dense perplexity {dense_ppl:.2f}")
  rows = []
  wanted = set(args.methods.split(",")) if args.methods else None
  for method, s, g in SETTINGS:
    if wanted and method not in wanted:
      continue
    t0 = time.perf_counter()
    res = llm.prune(model, params, calib, method=method, sparsity=s, granularity=g, batch_size=args.batch_size)
    wall = time.perf_counter() - t0
    blocks = res.block_seconds
    pre = wall - sum(blocks)
    steady = pre + sum(blocks[1:]) + float(np.median(blocks[1:]))
    ppl = llm.perplexity(model, res.params, evals, seq_len=args.eval_len)
    sp = float(jp.sparsity(res.masks, res.params))
    row = {"method": method, "sparsity": s, "granularity": g, "perplexity": ppl, "measured_sparsity": sp,
           "wall_s": wall, "steady_s": steady, "wall_over_forward": wall / t_fwd,
           "steady_over_forward": steady / t_fwd, "block_median_s": float(np.median(blocks))}
    rows.append(row)
    print(f"{method:9s} {g:12s} {s:.0%}: perplexity {ppl:8.2f}  time {steady / t_fwd:5.2f}x forward "
          f"(wall {wall:.1f} s, {wall / t_fwd:.2f}x with compilation)")
    del res

  def ppl_of(m, g, s=0.5):
    return next((r["perplexity"] for r in rows if (r["method"], r["granularity"], r["sparsity"]) == (m, g, s)), None)

  checks = {}
  mag = ppl_of("magnitude", "unstructured")
  for m in ("wanda", "sparsegpt"):
    if mag and ppl_of(m, "unstructured"):
      checks[f"{m}_increase_over_magnitude_increase"] = (ppl_of(m, "unstructured") - dense_ppl) / (mag - dense_ppl)
  for r in rows:
    if r["method"] in ("wanda", "sparsegpt") and r["granularity"] == "unstructured":
      checks[f"{r['method']}_time_over_forward"] = r["steady_over_forward"]
  name = "llm" if not args.random_config else f"llm_{args.random_config}"
  path = _common.write(name, {"model": source, "params": int(n_params), "calibration": list(calib.shape),
                              "eval_tokens": int(evals.size), "forward_s": t_fwd, "dense_perplexity": dense_ppl,
                              "rows": rows, "checks": checks,
                              "targets": {"increase_ratio_max": 0.25, "wanda_time_max": 2.0,
                                          "sparsegpt_time_max": 20.0}})
  print("checks", {k: round(v, 3) for k, v in checks.items()})
  print("wrote", path)


if __name__ == "__main__":
  main()
