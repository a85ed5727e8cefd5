"""jprune: neural-network pruning as pure functions over JAX/Flax parameter pytrees.

The core (`import jprune`) needs only jax, flax and optax. Submodules with heavier needs load on first use:
`jp.checkpoint` (orbax), `jp.llm` (gguf, tokenizers), `jp.structured`, `jp.analysis`, `jp.recipe`, `jp.resize`,
`jp.models`, and the application `jp.app` (the `jprune` command).
"""

from jprune import activations as activations
from jprune import granularity as granularity
from jprune import select as select
from jprune.activations import activation as activation
from jprune.activations import wanda as wanda
from jprune.criteria import Criterion as Criterion
from jprune.criteria import fisher as fisher
from jprune.criteria import gradient as gradient
from jprune.criteria import magnitude as magnitude
from jprune.criteria import movement as movement
from jprune.criteria import random as random
from jprune.criteria import scores as scores
from jprune.criteria import taylor as taylor
from jprune.distribution import by_path as by_path
from jprune.distribution import erk as erk
from jprune.distribution import uniform as uniform
from jprune.granularity import Granularity as Granularity
from jprune.masks import apply as apply
from jprune.masks import blocks as blocks
from jprune.masks import channels as channels
from jprune.masks import full_masks as full_masks
from jprune.masks import intersect as intersect
from jprune.masks import mask_and as mask_and
from jprune.masks import mask_or as mask_or
from jprune.masks import neurons as neurons
from jprune.masks import nm as nm
from jprune.masks import sparsity as sparsity
from jprune.masks import threshold as threshold
from jprune.masks import topk as topk
from jprune.masks import union as union
from jprune.masks import unstructured as unstructured
from jprune.report import Summary as Summary
from jprune.report import summary as summary
from jprune.schedules import Schedule as Schedule
from jprune.schedules import constant as constant
from jprune.schedules import iterative as iterative
from jprune.schedules import one_shot as one_shot
from jprune.schedules import polynomial as polynomial
from jprune.schedules import thresholds as thresholds
from jprune.ste import STE as STE
from jprune.ste import ste as ste
from jprune.transform import KeepPrunedState as KeepPrunedState
from jprune.transform import PruneState as PruneState
from jprune.transform import init_masks as init_masks
from jprune.transform import keep_pruned as keep_pruned
from jprune.transform import masks_of as masks_of
from jprune.transform import pruned as pruned

__version__ = "0.1.0"

__all__ = [
    "Criterion", "Granularity", "KeepPrunedState", "PruneState", "STE", "Schedule", "Summary", "activation",
    "activations", "analysis", "app", "apply", "blocks", "by_path", "channels", "checkpoint", "constant", "erk",
    "export_sparse", "fisher", "full_masks", "gradient", "granularity", "init_masks", "intersect", "iterative",
    "keep_pruned", "llm", "load_sparse", "magnitude", "mask_and", "mask_or", "masks_of", "models", "movement",
    "neurons", "nm", "one_shot", "polynomial", "pruned", "random", "recipe", "resize", "scores", "select",
    "sparsity", "ste", "structured", "summary", "taylor", "threshold", "thresholds", "topk", "uniform", "union",
    "unstructured", "wanda",
]

# imported on first use (`jp.structured.groups(...)`, `jp.checkpoint.Manager(...)`): their dependencies are extras
_SUBMODULES = ("analysis", "app", "checkpoint", "llm", "models", "recipe", "resize", "structured")
_FROM_CHECKPOINT = ("export_sparse", "load_sparse")


def __getattr__(name):
  import importlib
  if name in _SUBMODULES:
    return importlib.import_module(f"jprune.{name}")
  if name in _FROM_CHECKPOINT:
    return getattr(importlib.import_module("jprune.checkpoint"), name)
  raise AttributeError(f"module 'jprune' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(__all__))
