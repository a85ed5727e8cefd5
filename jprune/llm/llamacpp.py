"""Check exported GGUF files in llama.cpp itself: perplexity, greedy tokens and speed from the runtime people deploy.

llama.cpp runs through npm's `node-llama-cpp` (3.x), which ships prebuilt CPU binaries of llama.cpp for
linux-x64, macOS and Windows; `install()` (or `bash scripts/setup.sh --llm`) puts it in a folder of its own,
and `run` starts `node` on a small script that loads the GGUF, evaluates the token ids it is given exactly as
given (no BOS, no re-tokenization), and answers in JSON. Where it looks (first found): `$JPRUNE_LLAMACPP_DIR`,
`.llamacpp/` in the jprune checkout, `~/.cache/jprune/llamacpp`.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Optional, Sequence

VERSION = "3.22.1"
SCRIPT = Path(__file__).with_name("llamacpp.mjs")


class LlamaCppError(RuntimeError):
  """node/node-llama-cpp is missing, or llama.cpp could not load or run a model."""


def _candidates() -> list[Path]:
  out = []
  if os.environ.get("JPRUNE_LLAMACPP_DIR"):
    out.append(Path(os.environ["JPRUNE_LLAMACPP_DIR"]))
  out.append(Path(__file__).resolve().parents[2] / ".llamacpp")
  out.append(Path.home() / ".cache" / "jprune" / "llamacpp")
  return out


def find() -> Optional[Path]:
  """The folder whose node_modules holds node-llama-cpp, or None."""
  for d in _candidates():
    if (d / "node_modules" / "node-llama-cpp" / "dist" / "index.js").exists():
      return d
  return None


def available() -> bool:
  return shutil.which("node") is not None and find() is not None


def install(folder: Optional[str] = None, *, quiet: bool = True) -> Path:
  """Installs node-llama-cpp (prebuilt CPU llama.cpp; on linux-x64 only that binary, ~85 MB) with npm."""
  npm = shutil.which("npm")
  if npm is None or shutil.which("node") is None:
    raise LlamaCppError("node and npm are needed to run llama.cpp (node-llama-cpp): install Node.js >= 20.")
  where = Path(folder) if folder else Path.home() / ".cache" / "jprune" / "llamacpp"
  where.mkdir(parents=True, exist_ok=True)
  pkgs = [f"node-llama-cpp@{VERSION}"]
  flags = ["--no-audit", "--no-fund"]
  if platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64"):
    pkgs.append(f"@node-llama-cpp/linux-x64@{VERSION}")   # the CPU build only, not the CUDA/Vulkan ones
    flags.append("--omit=optional")
  cmd = [npm, "install", "--prefix", str(where), *flags, *pkgs]
  res = subprocess.run(cmd, capture_output=quiet, text=True)
  if res.returncode != 0:
    raise LlamaCppError(f"`{' '.join(cmd)}` failed: {(res.stderr or '')[-500:]}")
  return where


def run(model_path: str, *, windows=None, prompts: Optional[Sequence[Sequence[int]]] = None, new_tokens: int = 8,
        bench: Optional[dict] = None, threads: Optional[int] = None, context: int = 1024, batch: int = 512,
        timeout: float = 1800) -> dict:
  """Loads `model_path` in llama.cpp and returns what was asked for (see llamacpp.mjs's header).

  Args:
    windows: int token windows (n, T): per window the summed next-token NLL ("nll") and count ("count").
    prompts: token id lists: `new_tokens` greedy (argmax) tokens each ("greedy").
    bench: {"prompt": ids, "gen": n, "repeats": r}: prompt-processing and generation tokens/s ("bench").
    threads: CPU threads (default: all cores).
  """
  node = shutil.which("node")
  if node is None:
    raise LlamaCppError("`node` is not on PATH; llama.cpp runs through node-llama-cpp: install Node.js >= 20.")
  folder = find()
  if folder is None:
    raise LlamaCppError("node-llama-cpp is not installed: run `bash scripts/setup.sh --llm` or "
                        "`python -c 'from jprune.llm import llamacpp; llamacpp.install()'`.")
  if not os.path.isfile(model_path):
    raise FileNotFoundError(f"{model_path}: no such GGUF file.")
  req = {"model": os.path.abspath(model_path), "threads": int(threads or os.cpu_count() or 1),
         "context": int(context), "batch": int(batch)}
  if windows is not None:
    import numpy as np
    w = np.asarray(windows)
    if w.ndim != 2 or w.shape[1] > context:
      raise ValueError(f"windows must be (n, T) token ids with T <= context={context}; got shape {w.shape}.")
    req["windows"] = w.astype(int).tolist()
  if prompts is not None:
    req["prompts"] = [[int(t) for t in p] for p in prompts]
    req["new_tokens"] = int(new_tokens)
  if bench is not None:
    req["bench"] = {"prompt": [int(t) for t in bench["prompt"]], "gen": int(bench.get("gen", 32)),
                    "repeats": int(bench.get("repeats", 3))}
  env = dict(os.environ, JPRUNE_LLAMACPP_DIR=str(folder))
  try:
    res = subprocess.run([node, str(SCRIPT)], input=json.dumps(req), capture_output=True, text=True, env=env,
                         timeout=timeout)
  except subprocess.TimeoutExpired:
    raise LlamaCppError(f"llama.cpp on {model_path} did not finish in {timeout:.0f} s.") from None
  lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
  if not lines:
    raise LlamaCppError(f"llama.cpp on {model_path} failed (exit {res.returncode}): {res.stderr.strip()[-600:]}")
  out = json.loads(lines[-1])
  if "error" in out:
    raise LlamaCppError(out["error"])
  return out


def perplexity(model_path: str, windows, **kw) -> float:
  """exp(mean next-token NLL) of the windows (n, T) in llama.cpp: the same windows `llm.perplexity` takes."""
  out = run(model_path, windows=windows, **kw)
  return float(math.exp(sum(out["nll"]) / sum(out["count"])))


if __name__ == "__main__":   # `python3 jprune/llm/llamacpp.py install FOLDER`: stdlib only, so setup can run it early
  import sys
  if sys.argv[1:2] != ["install"] or len(sys.argv) != 3:
    sys.exit("usage: llamacpp.py install FOLDER")
  install(sys.argv[2])
