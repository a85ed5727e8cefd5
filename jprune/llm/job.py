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
               prompt: str = "The capital of France is", new_tokens: int = 24, export: Optional[str] = None,
               export_dtype: str = "f32", llamacpp_check: bool = False, progress: bool = True) -> dict:
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
  if export or llamacpp_check:
    from jprune.llm.gguf import save_gguf
    metrics["export"] = save_gguf(export or os.path.join(out, "pruned.gguf"), cfg, res.params, tok,
                                  dtype=export_dtype)
    if llamacpp_check:
      from jprune.llm import llamacpp
      metrics["llamacpp_perplexity"] = llamacpp.perplexity(metrics["export"]["path"], evals,
                                                           context=max(1024, eval_len))
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
           f"| dense | {dense_ppl:.2f} |", f"| pruned ({1 - kept / size:.1%} of block kernels) | {ppl:.2f} |",
           (f"| pruned, exported ({metrics['export']['path']}, {export_dtype}) run by llama.cpp | "
            f"{metrics['llamacpp_perplexity']:.2f} |" if "llamacpp_perplexity" in metrics else ""), "",
           f"Pruning took {seconds:.1f} s ({np.median(res.block_seconds):.2f} s median per block; "
           "block_seconds.png).\n",
           f"Greedy sample for {prompt!r}:\n", f"- dense: {dense_sample!r}", f"- pruned: {sample!r}\n",
           "![sparsity per block](block_sparsity.png)\n", "## Per-layer sparsity\n", summ.markdown()]
  with open(os.path.join(out, "report.md"), "w") as f:
    f.write("\n".join(lines))
  return metrics


# ----------------------------------------------------------------------------------------------- structured
def _llamacpp_speed(paths: dict, prompt_ids, *, rounds: int = 3, gen: int = 32, progress: bool = False) -> dict:
  """llama.cpp tokens/s for prompt processing (one batch of len(prompt_ids)) and generation, for every model,
  measured in alternation (round-robin `rounds` times, medians) so a drifting machine hits all alike."""
  from jprune.llm import llamacpp
  got: dict = {name: {"pp": [], "tg": []} for name in paths}
  for _ in range(rounds):
    for name, path in paths.items():
      b = llamacpp.run(path, bench={"prompt": prompt_ids, "gen": gen, "repeats": 2})["bench"]
      got[name]["pp"] += b["pp_tokens_per_s"]
      got[name]["tg"] += b["tg_tokens_per_s"]
  return {name: {"pp_tokens_per_s": float(np.median(v["pp"])), "tg_tokens_per_s": float(np.median(v["tg"])),
                 "pp_samples": v["pp"], "tg_samples": v["tg"]} for name, v in got.items()}


def run_structured(out: str, *, criteria=("activation",), sparsities=(0.2,), kinds=("mlp",),
                   allocation: str = "layer", round_to: int = 8, head_groups: str = "query", blocks: int = 0,
                   reconstruct: bool = False, gguf: Optional[str] = None, text: Optional[str] = None,
                   calib: int = 32, calib_len: int = 256, eval_windows: int = 16, eval_len: int = 512,
                   batch_size: int = 8, distill_steps: int = 0, distill_minutes: Optional[float] = None,
                   distill_lr: float = 2e-4, distill_batch: int = 8, distill_len: int = 256, alpha: float = 0.0,
                   export: Optional[str] = None, export_dtype: str = "f32", llamacpp_check: bool = False,
                   seed: int = 0, progress: bool = True) -> dict:
  """Structured (width) pruning of a GGUF Llama, recovery by distillation, GGUF export and llama.cpp check.

  For every criterion × sparsity: prune one-shot (`width.prune_width`), perplexity before recovery, distil
  from the dense model (resumable under `out/distill/<cell>`), perplexity after, export the compacted model as
  GGUF and (with `llamacpp_check`) its perplexity and speed in llama.cpp, dense vs pruned in the same run.
  Writes report.md, metrics.json, perplexity_vs_params.png and widths.png to `out`.
  """
  from jprune.llm import distill as _distill
  from jprune.llm import width
  from jprune.llm.gguf import save_gguf
  from jprune.llm.text import train_windows
  os.makedirs(out, exist_ok=True)
  cfg, params, tok = load_gguf(gguf)
  ids = tok.encode(text if text is not None else jargon_text())
  cal, evals = split_text_tokens(ids, calib, calib_len, eval_windows, eval_len)
  train = train_windows(ids, distill_len) if (distill_steps or distill_minutes) else None
  dense_ppl = perplexity(cfg, params, evals, seq_len=eval_len, progress=progress)
  metrics: dict = {"model": gguf or smollm2_path(), "config": dataclasses.asdict(cfg), "params": width.n_params(params),
             "block_params": sum(cfg.block_params(i) for i in range(cfg.n_layers)),
             "macs_per_token": cfg.macs_per_token(), "dense_perplexity": dense_ppl,
             "calibration": list(cal.shape), "eval": list(evals.shape), "cells": []}
  paths = {}
  if llamacpp_check or export:
    paths["dense"] = os.path.join(out, "dense.gguf")
    save_gguf(paths["dense"], cfg, params, tok, dtype=export_dtype)
  for crit in criteria:
    for s in sparsities:
      name = f"{crit}-{s:g}"
      t0 = time.perf_counter()
      res = width.prune_width(cfg, params, cal, sparsity=s, criterion=crit, kinds=kinds, allocation=allocation,
                              round_to=round_to, head_groups=head_groups, blocks=blocks, reconstruct=reconstruct,
                              batch_size=batch_size, progress=progress)
      cell = dict(res.info, name=name, prune_seconds=time.perf_counter() - t0,
                  widths={"hidden": [res.config.hidden_of(i) for i in range(res.config.n_layers)],
                          "heads": [res.config.heads_of(i) for i in range(res.config.n_layers)],
                          "kv_heads": [res.config.kv_heads_of(i) for i in range(res.config.n_layers)]})
      cell["perplexity_before_recovery"] = perplexity(res.config, res.params, evals, seq_len=eval_len,
                                                      progress=progress)
      small = res.params
      if train is not None:
        steps = distill_steps or 10 ** 9
        d = _distill.distill(res.config, res.params, cfg, params, train, steps=steps, batch_size=distill_batch,
                             lr=distill_lr, alpha=alpha, seed=seed,
                             checkpoint_dir=os.path.abspath(os.path.join(out, "distill", name)),
                             max_seconds=None if distill_minutes is None else 60 * distill_minutes,
                             progress=progress)
        small = d.params
        cell.update(distill_steps=d.steps, distill_seconds=d.seconds, distill_history=d.history,
                    distill_tokens=d.steps * distill_batch * distill_len, distill_resumed_from=d.resumed_from)
        cell["perplexity"] = perplexity(res.config, small, evals, seq_len=eval_len, progress=progress)
      else:
        cell["perplexity"] = cell["perplexity_before_recovery"]
      if export or llamacpp_check:
        path = export if (export and len(criteria) * len(sparsities) == 1) else os.path.join(out, f"{name}.gguf")
        cell["export"] = save_gguf(path, res.config, small, tok, dtype=export_dtype)
        paths[name] = path
        if llamacpp_check:
          from jprune.llm import llamacpp
          cell["llamacpp_perplexity"] = llamacpp.perplexity(path, evals, context=max(1024, eval_len))
      metrics["cells"].append(cell)
      with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1, default=str)
  if llamacpp_check:
    from jprune.llm import llamacpp
    metrics["dense_llamacpp_perplexity"] = llamacpp.perplexity(paths["dense"], evals, context=max(1024, eval_len))
    metrics["speed"] = _llamacpp_speed(paths, [int(t) for t in np.asarray(ids[:256])])
  with open(os.path.join(out, "metrics.json"), "w") as f:
    json.dump(metrics, f, indent=1, default=str)
  _structured_report(out, metrics, cfg)
  return metrics


def _structured_report(out, m, cfg):
  from jprune import report as _report
  from jprune.llm import width
  cells = m["cells"]
  curves = {}
  for c in cells:
    key = c["criterion"]
    for label, k in (("before recovery", "perplexity_before_recovery"), ("after recovery", "perplexity")):
      if label == "after recovery" and "distill_steps" not in c:
        continue
      xs, ys = curves.setdefault(f"{key} {label}", ([], []))
      xs.append(100 * c["removed_fraction_of_blocks"])
      ys.append(c[k])
  _report.plot_lines(curves, os.path.join(out, "perplexity_vs_params.png"),
                     xlabel="% of decoder-block params removed", ylabel="perplexity (held-out)",
                     title="perplexity vs params removed", baseline=m["dense_perplexity"])
  if cells:
    _report.plot_lines({c["name"]: (list(range(len(c["widths"]["hidden"]))), c["widths"]["hidden"]) for c in cells},
                       os.path.join(out, "widths.png"), xlabel="block", ylabel="MLP width", title="widths per block")
  speed = m.get("speed", {})
  dense_speed = speed.get("dense", {})
  lines = ["# jprune llm --structured\n",
           f"Model: {m['model']} ({m['params'] / 1e6:.1f}M params, decoder blocks {m['block_params'] / 1e6:.1f}M); "
           f"calibration {m['calibration'][0]}×{m['calibration'][1]} tokens; perplexity on "
           f"{m['eval'][0]}×{m['eval'][1]} held-out tokens (never used for calibration or training).\n",
           "| model | params | block params removed | MACs/token | perplexity before recovery | perplexity "
           "| llama.cpp perplexity | llama.cpp prompt t/s | llama.cpp generation t/s |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  fmt = lambda v, f="{:.2f}": "" if v is None else f.format(v)
  lines.append(f"| dense | {m['params']:,} | 0% | {m['macs_per_token']:,} | | {m['dense_perplexity']:.2f} | "
               f"{fmt(m.get('dense_llamacpp_perplexity'))} | {fmt(dense_speed.get('pp_tokens_per_s'), '{:.1f}')} | "
               f"{fmt(dense_speed.get('tg_tokens_per_s'), '{:.1f}')} |")
  for c in cells:
    sp = speed.get(c["name"], {})
    lines.append(f"| {c['name']} | {c['params_after']:,} | {100 * c['removed_fraction_of_blocks']:.1f}% | "
                 f"{c['macs_per_token_after']:,} | {c['perplexity_before_recovery']:.2f} | {c['perplexity']:.2f} | "
                 f"{fmt(c.get('llamacpp_perplexity'))} | {fmt(sp.get('pp_tokens_per_s'), '{:.1f}')} | "
                 f"{fmt(sp.get('tg_tokens_per_s'), '{:.1f}')} |")
  lines.append("")
  for c in cells:
    if "distill_steps" in c:
      lines.append(f"- {c['name']}: distilled {c['distill_steps']} steps ({c['distill_tokens']:,} tokens, "
                   f"{c['distill_seconds'] / 60:.1f} min)")
  lines += ["", "![perplexity vs params removed](perplexity_vs_params.png)", "", "## Widths per block", ""]
  for c in cells:
    small = cfg.with_widths(c["widths"]["hidden"], c["widths"]["heads"], c["widths"]["kv_heads"],
                            n_layers=len(c["widths"]["hidden"]))
    lines += [f"### {c['name']}", "", width.widths_table(small), ""]
  with open(os.path.join(out, "report.md"), "w") as f:
    f.write("\n".join(lines))
