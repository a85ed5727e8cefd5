"""Memory-bounded LLM pruning: peak RSS and time per block of `llm.stream.prune_gguf` from 135M to 7B parameters.

Each case runs in its own process (peak RSS = that process's `ru_maxrss`, which counts the mapped file's pages it
touched as well as its own memory) and prunes a GGUF block by block from a memory map, writing the pruned GGUF:
  - SmolLM2-135M-Instruct (the real file, Q4_1), calibration from the Jargon File; for contrast the in-memory
    `llm.prune` on the same tokens (peak RSS, and the masks must be equal);
  - `LlamaConfig.llama_1b()` and `LlamaConfig.llama2_7b()` shapes with RANDOM weights (f16 GGUFs written tensor by
    tensor by `llm.stream.random_gguf`; ~2.5 GB and ~13.5 GB): their perplexity is meaningless, only memory and time
    are measured; calibration is random token ids.
Calibration 8 × 128 tokens everywhere. Wanda 50% on all three; SparseGPT 50% on 135M and 1B whole, and on 7B on its
first `--sparsegpt-7b-blocks` blocks (seconds per block; the rest of the file is copied).

"Seconds per block" is the median over blocks after the first (the first includes compilation). Linearity: seconds
per block divided by the block's params, relative to SmolLM2's.

Run: python benchmarks/scale.py [--cases smollm2,llama_1b,llama2_7b] [--sparsegpt-7b-blocks 2] [--folder runs/scale]
The random GGUFs are kept in the folder and reused when their config, seed and the writer's source are the same.
"""

import argparse
import hashlib
import inspect
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CALIB = (8, 128)


def _calibration(case: str, vocab: int):
  import numpy as np
  if case == "smollm2":
    from jprune import llm
    from jprune.llm.gguf import _reader, _tokenizer, _fields
    path = llm.smollm2_path()
    meta, _ = _fields(_reader(path))
    ids = np.asarray(_tokenizer(path, meta).encode(llm.jargon_text()), np.int32)
    half = len(ids) // 2
    step = (half - CALIB[1]) // CALIB[0]
    return np.stack([ids[i * step: i * step + CALIB[1]] for i in range(CALIB[0])])
  return np.random.default_rng(0).integers(0, vocab, CALIB)


def _source(case: str, folder: str) -> str:
  from jprune.llm import smollm2_path, stream
  from jprune.models import LlamaConfig
  if case == "smollm2":
    return smollm2_path()
  cfg = getattr(LlamaConfig, case)()
  digest = hashlib.sha256((repr(cfg) + inspect.getsource(stream.random_gguf) + inspect.getsource(stream._Writer)
                           ).encode()).hexdigest()[:12]
  path = os.path.join(folder, f"random_{case}_{digest}.gguf")
  if not os.path.exists(path):
    print(f"writing {path} (random weights, f16) ...", flush=True)
    out = stream.random_gguf(path, cfg, dtype="f16", seed=0)
    print(f"  {out['bytes'] / 1e9:.2f} GB in {out['seconds']:.0f} s", flush=True)
  return path


def child(args) -> None:
  """One measurement in this process; prints one JSON line."""
  from jprune.llm import stream
  from jprune.llm.gguf import _fields, _reader, config_from_gguf
  path = args.source
  reader = _reader(path)
  meta, _ = _fields(reader)
  cfg = config_from_gguf(meta, {t.name: tuple(int(s) for s in reversed(t.shape.tolist())) for t in reader.tensors},
                         path)
  del reader
  calib = _calibration(args.case, cfg.vocab_size)
  out = {"case": args.case, "method": args.method, "mode": args.mode, "block_params": cfg.block_params(0),
         "params": int(cfg.block_params(0) * cfg.n_layers + cfg.vocab_size * cfg.dim * (1 + (not cfg.tie_embeddings))),
         "n_layers": cfg.n_layers, "file_bytes": os.path.getsize(path)}
  t0 = time.perf_counter()
  if args.mode == "stream":
    target = os.path.join(args.folder, f"pruned_{args.case}_{args.method}.gguf")
    r = stream.prune_gguf(path, target, calib, method=args.method, sparsity=0.5, max_blocks=args.max_blocks)
    out.update(block_seconds=r["block_seconds"], blocks_pruned=r["blocks_pruned"], bytes_written=r["bytes"],
               pruned_fraction=r["pruned_params"] / max(r["selected_params"], 1), seconds=time.perf_counter() - t0,
               peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    if args.check_masks:   # after the peak was taken: it loads the whole model
      out["masks_equal_in_memory"] = _masks_equal(path, target, calib, args.method)
    os.unlink(target)
  else:   # the whole model in memory: llm.load_gguf + llm.prune
    from jprune import llm
    c, params, _ = llm.load_gguf(path)
    r = llm.prune(c, params, calib, method=args.method, sparsity=0.5)
    out.update(block_seconds=r.block_seconds, blocks_pruned=cfg.n_layers, seconds=time.perf_counter() - t0,
               peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
  print("RESULT " + json.dumps(out), flush=True)


def _masks_equal(source, target, calib, method) -> bool:
  """Streamed zeros == in-memory `llm.prune` masks."""
  import jax
  import numpy as np
  from jprune import llm
  c, params, _ = llm.load_gguf(source)
  ref = llm.prune(c, params, calib, method=method, sparsity=0.5, progress=False)
  _, streamed, _ = llm.load_gguf(target)
  same = jax.tree.map(lambda m, a: bool(np.array_equal(np.asarray(m), np.asarray(a) != 0)) if np.ndim(m) else True,
                      ref.masks, streamed)
  return all(jax.tree.leaves(same))


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--cases", default="smollm2,llama_1b,llama2_7b")
  ap.add_argument("--sparsegpt-7b-blocks", type=int, default=2)
  ap.add_argument("--folder", default=os.path.join(ROOT, "runs", "scale"))
  ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from the committed JSON")
  ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--case", help=argparse.SUPPRESS)
  ap.add_argument("--source", help=argparse.SUPPRESS)
  ap.add_argument("--method", help=argparse.SUPPRESS)
  ap.add_argument("--mode", default="stream", help=argparse.SUPPRESS)
  ap.add_argument("--max-blocks", type=int, default=None, help=argparse.SUPPRESS)
  ap.add_argument("--check-masks", action="store_true", help=argparse.SUPPRESS)
  args = ap.parse_args()
  os.makedirs(args.folder, exist_ok=True)
  if args.child:
    return child(args)
  if args.plot_only:
    import _common
    path = os.path.join(_common.RESULTS, "scale.json")
    with open(path) as f:
      return _plot(json.load(f)["results"], path.replace(".json", ".png"))

  cases = [c for c in args.cases.split(",") if c]
  for c in cases:
    if c not in ("smollm2", "llama_1b", "llama2_7b"):
      sys.exit(f"--cases: unknown case {c!r}; expected smollm2, llama_1b, llama2_7b.")
  runs = []
  for case in cases:
    runs.append((case, "wanda", "stream", None, case == "smollm2"))
    runs.append((case, "sparsegpt", "stream", args.sparsegpt_7b_blocks if case == "llama2_7b" else None,
                 case == "smollm2"))
    if case == "smollm2":
      runs += [(case, "wanda", "memory", None, False), (case, "sparsegpt", "memory", None, False)]
  results = []
  t_all = time.perf_counter()
  for j, (case, method, mode, max_blocks, check) in enumerate(runs):
    source = _source(case, args.folder)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--case", case, "--source", source, "--method",
           method, "--mode", mode, "--folder", args.folder]
    if max_blocks is not None:
      cmd += ["--max-blocks", str(max_blocks)]
    if check:
      cmd += ["--check-masks"]
    elapsed = time.perf_counter() - t_all
    print(f"[{j + 1}/{len(runs)}] {case} {method} {mode} (elapsed {elapsed / 60:.1f} min)", flush=True)
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not lines:
      sys.exit(f"{case} {method} {mode} failed (exit {p.returncode}); see its output above.")
    r = json.loads(lines[-1][len("RESULT "):])
    steady = r["block_seconds"][1:] or r["block_seconds"]
    r["seconds_per_block"] = float(sorted(steady)[len(steady) // 2])
    results.append(r)
    print(f"  peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB, {r['seconds_per_block']:.2f} s/block, "
          f"total {r['seconds']:.0f} s" + (f", masks equal in memory: {r['masks_equal_in_memory']}"
                                            if "masks_equal_in_memory" in r else ""), flush=True)
  base = {m: next((r for r in results if r["case"] == "smollm2" and r["method"] == m and r["mode"] == "stream"), None)
          for m in ("wanda", "sparsegpt")}
  for r in results:
    b = base.get(r["method"])
    if b is not None and r["mode"] == "stream":
      r["seconds_per_param_vs_135m"] = (r["seconds_per_block"] / r["block_params"]) / (
          b["seconds_per_block"] / b["block_params"])
  import _common
  path = _common.write("scale", {"calibration": list(CALIB), "sparsity": 0.5, "results": results,
                                 "note": "llama_1b and llama2_7b weights are random (f16 GGUFs from "
                                         "llm.stream.random_gguf): memory and time only, perplexity meaningless."})
  _plot(results, path.replace(".json", ".png"))
  print(f"wrote {path}")


def _plot(results, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
  streamed = [r for r in results if r["mode"] == "stream"]
  for method, marker in (("wanda", "o"), ("sparsegpt", "s")):
    rs = [r for r in streamed if r["method"] == method]
    a.plot([r["params"] / 1e9 for r in rs], [r["peak_rss_bytes"] / 2**30 for r in rs], marker=marker, label=method)
    b.plot([r["block_params"] / 1e6 for r in rs], [r["seconds_per_block"] for r in rs], marker=marker, label=method)
  sizes = sorted({r["params"] for r in streamed})
  a.plot([n / 1e9 for n in sizes], [4 * n / 2**30 for n in sizes], "k:", label="model in float32 (in-memory lower bound)")
  for r in results:
    if r["mode"] == "memory":
      a.plot([r["params"] / 1e9], [r["peak_rss_bytes"] / 2**30], "kx", label=f"{r['method']} in memory (llm.prune)")
  a.axhline(6, color="r", lw=0.8, ls="--", label="6 GB target")
  a.set(xscale="log", xlabel="model params", ylabel="peak RSS (GiB)", title="streamed prune_gguf: peak memory")
  a.set_xticks([n / 1e9 for n in sizes], [f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" for n in sizes])
  a.minorticks_off()
  b.set(xscale="log", yscale="log", xlabel="params per block (millions)", ylabel="seconds per block",
        title="time per block (2-core CPU)")
  a.legend(fontsize=8)
  b.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


if __name__ == "__main__":
  main()
