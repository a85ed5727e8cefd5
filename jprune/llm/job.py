"""The `jprune llm` job: load a GGUF Llama, prune it one-shot, write report.md, metrics.json and PNGs."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Optional

import jax
import numpy as np

from jprune import _tree
from jprune import masks as _masks
from jprune.llm.eval import generate, perplexity
from jprune.llm.gguf import load_gguf, smollm2_path
from jprune.llm.prune import METHODS, _granularity_name, prune
from jprune.llm.text import jargon_text, split_text_tokens
from jprune.models import Llama


def run_report(out: str, method: str = "wanda", sparsity: float = 0.5, granularity="unstructured", *,
               gguf: Optional[str] = None, text: Optional[str] = None, calib: int = 32, calib_len: int = 256,
               eval_windows: int = 16, eval_len: int = 512, batch_size: int = 8,
               prompt: str = "The capital of France is", new_tokens: int = 24, progress: bool = True) -> dict:
  """Loads a GGUF Llama, prunes it one-shot, and writes report.md, metrics.json and PNGs to `out`.

  Perplexity (dense and pruned) on held-out text windows, per-layer sparsity, time per block and a greedy
  sample from the prompt.
  """
  from jprune import report as _report
  if method not in METHODS:
    raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}.")
  _tree.check_sparsity(sparsity)
  g = _masks.parse_granularity(granularity)
  os.makedirs(out, exist_ok=True)
  cfg, params, tok = load_gguf(gguf)
  model = Llama(cfg)
  ids = tok.encode(text if text is not None else jargon_text())
  cal, evals = split_text_tokens(ids, calib, calib_len, eval_windows, eval_len)
  prompt_ids = tok.encode(prompt)
  dense_ppl = perplexity(model, params, evals, seq_len=eval_len, progress=progress)
  dense_sample = tok.decode(generate(model, params, prompt_ids, new_tokens, stop_id=tok.eos_id))
  t0 = time.perf_counter()
  res = prune(model, params, cal, method=method, sparsity=sparsity, granularity=g, batch_size=batch_size,
              progress=progress)
  seconds = time.perf_counter() - t0
  ppl = perplexity(model, res.params, evals, seq_len=eval_len, progress=progress)
  sample = tok.decode(generate(model, res.params, prompt_ids, new_tokens, stop_id=tok.eos_id))
  summ = _report.summary(res.params, res.masks)
  sel = [r for r in summ.rows if "layers_" in r.path and r.path.endswith("kernel")]
  kept = sum(r.kept for r in sel)
  size = sum(r.size for r in sel)
  metrics = {"method": method, "sparsity": float(sparsity), "granularity": _granularity_name(g),
             "config": dataclasses.asdict(cfg), "params": int(sum(x.size for x in jax.tree.leaves(params))),
             "calibration": list(cal.shape), "eval_tokens": int(evals.size), "dense_perplexity": dense_ppl,
             "perplexity": ppl, "pruned_fraction_of_block_kernels": 1 - kept / size, "seconds": seconds,
             "block_seconds": res.block_seconds, "prompt": prompt, "dense_sample": dense_sample,
             "sample": sample, "summary": summ.to_dict()}
  with open(os.path.join(out, "metrics.json"), "w") as f:
    json.dump(metrics, f, indent=1, default=str)
  _report.plot_lines({f"{method} {metrics['granularity']}": (list(range(cfg.n_layers)), res.block_seconds)},
                     os.path.join(out, "block_seconds.png"), xlabel="block", ylabel="seconds",
                     title="time per block")
  _report.plot_lines({"sparsity": (list(range(cfg.n_layers)), [
      1 - sum(r.kept for r in sel if r.path.startswith(f"layers_{i}/")) /
      sum(r.size for r in sel if r.path.startswith(f"layers_{i}/")) for i in range(cfg.n_layers)])},
      os.path.join(out, "block_sparsity.png"), xlabel="block", ylabel="fraction of kernel entries pruned",
      title="sparsity per block")
  lines = [f"# jprune llm: {method}, {metrics['granularity']}, {sparsity:.0%}\n",
           f"Model: {gguf or smollm2_path()} ({metrics['params'] / 1e6:.1f}M params, {cfg.n_layers} blocks); "
           f"calibration {cal.shape[0]}×{cal.shape[1]} tokens; perplexity on {evals.size:,} held-out tokens "
           f"({evals.shape[0]} windows of {eval_len}).\n",
           "| model | perplexity |\n|---|---:|",
           f"| dense | {dense_ppl:.2f} |", f"| pruned ({1 - kept / size:.1%} of block kernels) | {ppl:.2f} |\n",
           f"Pruning took {seconds:.1f} s ({np.median(res.block_seconds):.2f} s median per block; "
           "block_seconds.png).\n",
           f"Greedy sample for {prompt!r}:\n", f"- dense: {dense_sample!r}", f"- pruned: {sample!r}\n",
           "![sparsity per block](block_sparsity.png)\n", "## Per-layer sparsity\n", summ.markdown()]
  with open(os.path.join(out, "report.md"), "w") as f:
    f.write("\n".join(lines))
  return metrics
