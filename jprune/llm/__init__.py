"""LLM pruning on Llama-architecture models (`jprune.models.Llama`), from and back to llama.cpp's GGUF.

Modules, one idea each:
  gguf        read a GGUF into params (`load_gguf`) and write params back (`save_gguf`) for llama.cpp
  llamacpp    run an exported GGUF in llama.cpp itself (node-llama-cpp): perplexity, greedy tokens, speed
  width       structured pruning (MLP neurons, GQA heads, blocks), reconstruction, compaction
  distill     recovery by knowledge distillation from the dense model, resumable
  tokenizer   the file's byte-level BPE (`tokenizers` does the work)
  text        offline text (the Jargon File, ...) and token windows for calibration / evaluation
  eval        perplexity and greedy generation
  prune       one-shot unstructured / N:M pruning block by block (magnitude, gradient, taylor, wanda, sparsegpt)
  sparsegpt   the SparseGPT reconstruction of one kernel
  stream      prune a GGUF block by block from a memory map, writing the pruned GGUF as it goes (bounded memory)
  job         the `jprune llm` command's report
"""

from jprune.llm.eval import _FORWARD_CACHE, _forward_fn, _nll, forward_fn, generate, perplexity  # noqa: F401 (old names)
from jprune.llm.gguf import GGUFError, load_gguf, read_gguf, save_gguf, smollm2_path
from jprune.llm.job import run_report
from jprune.llm.prune import _choose  # noqa: F401 (old name)
from jprune.llm.prune import BLOCK_KERNELS, METHODS, LLMPruneResult, _STAGE_CACHE, prune
from jprune.llm.sparsegpt import sparsegpt
from jprune.llm.stream import prune_gguf, random_gguf
from jprune.llm.text import JARGON, jargon_text, split_text_tokens, token_windows
from jprune.llm.tokenizer import Tokenizer


def clear_caches() -> None:
  """Drops the jitted forward passes and block stages kept per config (see `jax.clear_caches`)."""
  _FORWARD_CACHE.clear()
  _STAGE_CACHE.clear()


__all__ = ["BLOCK_KERNELS", "GGUFError", "JARGON", "LLMPruneResult", "METHODS", "Tokenizer", "clear_caches", "forward_fn", "generate",
           "jargon_text", "load_gguf", "perplexity", "prune", "prune_gguf", "random_gguf", "read_gguf", "run_report",
           "save_gguf", "smollm2_path", "sparsegpt", "split_text_tokens", "token_windows"]
