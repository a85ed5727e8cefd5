"""Recipes: what to prune, by which criterion, how finely, how much and when, in one TOML file.

A recipe is a list of `[[prune]]` entries. Each selects leaves by a regex on their '/'-joined paths and gives
them a criterion, a granularity, a target and a schedule (steps of the optimizer); `[defaults]` fills in what an
entry leaves out. `load(path)` reads one; `Recipe.pruned(tx)` is the optax transformation that carries it out —
one `jp.pruned` per entry, nested, each pruning only its own leaves — so a training loop takes a recipe exactly as
it takes `jp.pruned(...)`, and `jp.masks_of(state)` gives every entry's masks together. `jprune run --recipe FILE`
runs one. See `examples/recipe.toml` (every key, commented).

  >>> import jax.numpy as jnp, optax, jprune as jp
  >>> r = jp.recipe.loads('''
  ... [[prune]]
  ... where = "^a/kernel$"
  ... target = 0.5
  ... schedule = { kind = "constant" }
  ... [[prune]]
  ... where = "^b/kernel$"
  ... granularity = "2:4"
  ... schedule = { kind = "one_shot", at = 0 }
  ... ''')
  >>> params = {"a": {"kernel": jnp.arange(1.0, 5.0)}, "b": {"kernel": jnp.arange(1.0, 9.0).reshape(4, 2)}}
  >>> tx = r.pruned(optax.sgd(0.0))
  >>> _, state = tx.update(params, tx.init(params), params)
  >>> [m.astype(int).tolist() for m in jax.tree.leaves(jp.masks_of(state))]
  [[0, 0, 1, 1], [[0, 0], [0, 0], [1, 1], [1, 1]]]
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

import jax
import optax

from jprune import _tree
from jprune.granularity import NM
from jprune import criteria as _criteria
from jprune import distribution as _distribution
from jprune import masks as _masks
from jprune import schedules as _schedules
from jprune import select as _select
from jprune import transform as _transform

try:
  import tomllib as _toml
except ModuleNotFoundError:   # Python 3.10
  import tomli as _toml  # type: ignore[no-redef]

CRITERIA = _criteria.NAMES
_WITH_EMA = _criteria.WITH_EMA
_ENTRY_KEYS = {"where", "target", "criterion", "ema", "granularity", "scope", "distribution", "schedule"}
_SCHEDULE_KEYS = {"polynomial": {"kind", "begin", "end", "every", "initial", "power"},
                  "constant": {"kind", "every"}, "one_shot": {"kind", "at"},
                  "iterative": {"kind", "levels", "every", "begin"}}


class RecipeError(ValueError):
  """A recipe that cannot be carried out as written (the message names the entry and the key)."""


@dataclasses.dataclass(frozen=True)
class Entry:
  """One `[[prune]]` entry, defaults filled in."""
  where: str
  target: float
  criterion: str = "magnitude"
  ema: Optional[float] = None
  granularity: str = "unstructured"
  scope: str = "layer"
  distribution: str = "uniform"
  schedule: Any = None        # a dict: {"kind": ..., ...}

  def schedule_fn(self) -> _schedules.Schedule:
    s = dict(self.schedule)
    kind = s.pop("kind")
    if kind == "polynomial":
      return _schedules.polynomial(final=self.target, **s)
    if kind == "constant":
      return _schedules.constant(self.target, **s)
    if kind == "one_shot":
      return _schedules.one_shot(sparsity=self.target, **s)
    return _schedules.iterative(**s)

  def criterion_fn(self) -> _criteria.Criterion:
    return _criteria.by_name(self.criterion, ema=self.ema)

  def reaches_target_at(self) -> int:
    """The step from which this entry's masks are at their target."""
    s = self.schedule
    return {"polynomial": lambda: s["end"], "constant": lambda: 0, "one_shot": lambda: s.get("at", 0),
            "iterative": lambda: s.get("begin", 0) + (len(s["levels"]) - 1) * s["every"]}[s["kind"]]()


@dataclasses.dataclass(frozen=True)
class Recipe:
  entries: tuple

  def pruned(self, tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """`tx` wrapped by one `jp.pruned` per entry (the first entry outermost). Its `init` checks that every entry
    selects at least one leaf and that no leaf is selected by two entries."""
    for e in reversed(self.entries):
      dist = _distribution.erk() if e.distribution == "erk" else None
      tx = _transform.pruned(tx, criterion=e.criterion_fn(), schedule=e.schedule_fn(), where=e.where,
                             scope=e.scope, granularity=e.granularity, distribution=dist)
    nested = tx

    def init_fn(params):
      self.check(params)
      return nested.init(params)

    return optax.GradientTransformationExtraArgs(init_fn, nested.update)

  def check(self, params) -> None:
    """Raises RecipeError if an entry selects no leaf of `params`, a leaf is selected twice, or a granularity
    does not fit a selected leaf."""
    owner: dict = {}
    for i, e in enumerate(self.entries):
      try:
        flags = jax.tree.leaves(_select.resolve(e.where, params))
      except ValueError as err:
        raise RecipeError(f"[[prune]] #{i + 1} (where = {e.where!r}): {err}") from None
      for (path, leaf), f in zip(_tree.leaves_with_paths(params), flags):
        if not f:
          continue
        if path in owner:
          raise RecipeError(f"{path} is selected by [[prune]] #{owner[path] + 1} and #{i + 1}; each leaf may "
                            f"belong to one entry (narrow the `where` regexes).")
        owner[path] = i
        try:
          _masks.check_granularity(_masks.parse_granularity(e.granularity), path, leaf.shape)
        except ValueError as err:
          raise RecipeError(f"[[prune]] #{i + 1}: {err}") from None

  def reaches_target_at(self) -> int:
    """The step from which every entry is at its target."""
    return max(e.reaches_target_at() for e in self.entries)

  def to_dict(self) -> dict:
    """The recipe with defaults filled in (JSON-able; part of a run's identity)."""
    return {"prune": [dataclasses.asdict(e) for e in self.entries]}

  def markdown(self) -> str:
    rows = "".join(f"| `{e.where}` | {e.criterion} | {e.granularity} | {e.scope} | {e.target:g} | "
                   f"{json.dumps(e.schedule)} |\n" for e in self.entries)
    return ("| where | criterion | granularity | scope | target | schedule |\n|---|---|---|---|---:|---|\n" + rows)


def _err(where: str, msg: str) -> RecipeError:
  return RecipeError(f"{where}: {msg}")


def _entry(raw: dict, defaults: dict, label: str) -> Entry:
  if not isinstance(raw, dict):
    raise _err(label, "expected a table of keys.")
  unknown = set(raw) - _ENTRY_KEYS
  if unknown:
    raise _err(label, f"unknown key(s) {sorted(unknown)}; an entry takes {sorted(_ENTRY_KEYS)}.")
  e = {**defaults, **raw}
  if "where" not in raw:
    raise _err(label, "needs `where`, a regex on '/'-joined parameter paths (e.g. \"^Dense_0/kernel$\").")
  if not isinstance(e["where"], str):
    raise _err(label, f"where must be a regex string, got {e['where']!r}.")
  crit = e.get("criterion", "magnitude")
  if crit not in CRITERIA:
    raise _err(label, f"criterion {crit!r} is not one of {', '.join(CRITERIA)}.")
  if e.get("ema") is not None and crit not in _WITH_EMA:
    raise _err(label, f"ema applies to {', '.join(_WITH_EMA)}, not {crit}.")
  gran = str(e.get("granularity", "unstructured"))
  try:
    g = _masks.parse_granularity(gran)
  except ValueError as err:
    raise _err(label, str(err)) from None
  if e.get("scope", "layer") not in ("layer", "global"):
    raise _err(label, f"scope must be \"layer\" or \"global\", got {e.get('scope')!r}.")
  if e.get("distribution", "uniform") not in ("uniform", "erk"):
    raise _err(label, f"distribution must be \"uniform\" or \"erk\", got {e.get('distribution')!r}.")
  if e.get("distribution") == "erk" and e.get("scope", "layer") != "layer":
    raise _err(label, "distribution \"erk\" sets per-layer targets; it needs scope = \"layer\".")
  sched = e.get("schedule")
  if not isinstance(sched, dict) or "kind" not in sched:
    raise _err(label, "needs a schedule, e.g. schedule = { kind = \"polynomial\", begin = 0, end = 1000, every = "
                      "100 } (kinds: polynomial, constant, one_shot, iterative).")
  kind = sched["kind"]
  if kind not in _SCHEDULE_KEYS:
    raise _err(label, f"schedule kind {kind!r} is not one of {', '.join(_SCHEDULE_KEYS)}.")
  bad = set(sched) - _SCHEDULE_KEYS[kind]
  if bad:
    raise _err(label, f"schedule {kind} takes {sorted(_SCHEDULE_KEYS[kind] - {'kind'})}, not {sorted(bad)}.")
  target = e.get("target")
  if isinstance(g, NM):
    implied = (g.m - g.n) / g.m
    if target is not None and abs(float(target) - implied) > 1e-9:
      raise _err(label, f"granularity {gran} prunes {implied:g} of every group of {g.m}; target {target} "
                        f"contradicts it (leave target out).")
    target = implied
  if kind == "iterative":
    levels = sched.get("levels")
    if not isinstance(levels, list) or not levels:
      raise _err(label, "schedule iterative needs levels = [s1, s2, ...] (the last is the target).")
    if target is not None and abs(float(target) - float(levels[-1])) > 1e-9:
      raise _err(label, f"target {target} differs from the last iterative level {levels[-1]}.")
    target = levels[-1]
  if target is None:
    raise _err(label, "needs `target`, the fraction of the selected weights to prune, in [0, 1).")
  if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 <= target < 1:
    raise _err(label, f"target must be a number in [0, 1), got {target!r}.")
  entry = Entry(where=e["where"], target=float(target), criterion=crit, ema=e.get("ema"), granularity=gran,
                scope=e.get("scope", "layer"), distribution=e.get("distribution", "uniform"), schedule=dict(sched))
  try:   # the schedule's own checks (begin < end, every >= 1, levels in [0, 1))
    entry.schedule_fn()
  except (TypeError, ValueError) as err:
    raise _err(label, f"schedule: {err}") from None
  return entry


def loads(text: str, name: str = "recipe") -> Recipe:
  """Parses a recipe from TOML text; one RecipeError line naming the entry and key for anything wrong."""
  try:
    doc = _toml.loads(text)
  except _toml.TOMLDecodeError as e:
    raise RecipeError(f"{name}: not valid TOML ({e}).") from None
  unknown = set(doc) - {"version", "defaults", "prune"}
  if unknown:
    raise RecipeError(f"{name}: unknown top-level key(s) {sorted(unknown)}; a recipe has [defaults] and "
                      f"[[prune]] entries (and optionally version = 1).")
  if doc.get("version", 1) != 1:
    raise RecipeError(f"{name}: version {doc['version']!r} is not supported (this jprune reads version 1).")
  defaults = doc.get("defaults", {})
  if not isinstance(defaults, dict) or set(defaults) - (_ENTRY_KEYS - {"where"}):
    raise RecipeError(f"{name}: [defaults] takes {sorted(_ENTRY_KEYS - {'where'})}.")
  prune = doc.get("prune")
  if not isinstance(prune, list) or not prune:
    raise RecipeError(f"{name}: no [[prune]] entries; add at least one with `where` and `target`.")
  return Recipe(tuple(_entry(raw, defaults, f"{name} [[prune]] #{i + 1}") for i, raw in enumerate(prune)))


def load(path: str) -> Recipe:
  """Reads a recipe file (TOML). `load(path).pruned(optax.adamw(1e-3))` is the transformation to train with."""
  try:
    with open(path, "rb") as f:
      text = f.read().decode("utf-8")
  except OSError as e:
    raise RecipeError(f"recipe {path}: cannot be read ({e.strerror or e}).") from None
  except UnicodeDecodeError:
    raise RecipeError(f"recipe {path}: not UTF-8 text.") from None
  return loads(text, name=str(path))
