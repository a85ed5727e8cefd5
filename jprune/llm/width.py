"""Structured pruning of Llama models: MLP neurons, attention heads (GQA-aware) and whole blocks, one-shot from
calibration text, then compaction into a smaller `LlamaConfig` (per-layer widths) that runs faster anywhere.

Units (declared here, not traced):
  * MLP neuron j of block i: column j of `gate_proj` and `up_proj` and row j of `down_proj`.
  * Query head h of block i: its `d_head` columns of `q_proj` and rows of `o_proj`. With grouped-query attention
    every KV head serves g = heads / kv_heads query heads. Heads are removed **in equal numbers from every KV
    group of a block** (`head_groups="query"`, the default): block i keeps g_i query heads per KV head, so it
    stays a regular GQA block (llama.cpp requires heads % kv_heads == 0 per block) and its KV cache is
    unchanged; removing a query head saves its q/o weights and its attention FLOPs. `head_groups="kv"` removes
    whole KV groups instead (a KV head with all its query heads), which also shrinks the KV cache but comes in
    coarse steps (a third of SmolLM2's attention at a time). A block keeps at least one unit of each kind:
    a target that would remove every unit of a block's MLP or attention is an error.
  * Block i (depth pruning, `blocks=n`): removed whole, ranked by Block Influence (Men et al. 2024, ShortGPT):
    1 − mean cos(x_in, x_out) of the block's residual stream on the calibration set.

Why declared rather than traced with `jprune.structured.groups`: the tracer finds the MLP's neuron groups, but
a head is coupled through RoPE's rotate-half (a concatenate inside the head axis), GQA's broadcast of one KV
head to g query heads and the q·k contraction, which the tracer reports "not prunable" by design; and the
residual stream couples every block. Llama's units are fixed by the architecture, so they are named here.

Criteria (higher = keep), from one pass over the calibration tokens (`unit_scores`):
  * "l2"         magnitude baseline: L2 norm of the unit's weights (gate/up columns and down row; q columns
                 and o rows of a head).
  * "activation" Minitron (Muralidharan et al. 2024): mean |a| of the neuron's activation (the input of
                 `down_proj`); for a head, the mean L2 norm of its output (the input of `o_proj`) per token.
  * "flap"       FLAP's fluctuation (An et al. 2024): Var_t(a_j) · ‖W_out[j]‖² summed over the unit's channels.
  * "taylor"     first-order Taylor on the LM loss (LLM-Pruner, Ma et al. 2023, vector-wise): |Σ_b ∂L_b/∂z| for a
                 gate z on the unit's output, i.e. |Σ w·∂L/∂w| over its `down_proj` row / `o_proj` rows.
  * "fisher"     the same gate gradient squared per calibration batch, Σ_b (∂L_b/∂z)² (Molchanov et al. 2019).

Allocation (`choose_units`): a block's units are sorted by score and removed in chunks of `round_to`
(MLP; so every width stays a multiple of `round_to`) or one query head per KV group (heads). `allocation=
"layer"` removes the same number from every block; "global" ranks the chunks of all blocks by their mean
score, each kind of unit on its own scale (scores divided by that kind's median over the model), and removes
the lowest until the target is met.

Recovery without training (`reconstruct="layer"` or `"dense"`): block by block with the pruned model's own
activations, the kept rows of `o_proj` and `down_proj` are refitted by least squares, W_K ← (H_KK + λI)⁻¹ Σ a_Kᵀ t
with H = Σ a aᵀ (the structured analogue of SparseGPT's update; λ = 1% of the mean diagonal), to reproduce the
unpruned layer's output t on the same inputs ("layer"), or the dense model's residual stream at that point
("dense": also undoes the drift of the blocks before). Then `compact` slices the params into the smaller config.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jprune.llm.eval import _config
from jprune.llm.prune import _stages
from jprune.models import Llama, LlamaConfig
from jprune.types import PyTree

CRITERIA = ("l2", "activation", "flap", "taylor", "fisher")
KINDS = ("mlp", "heads")


class WidthPruneResult(NamedTuple):
  config: LlamaConfig     # the compacted model's config (per-layer widths where they differ)
  params: PyTree          # the compacted params (smaller arrays)
  masked_params: PyTree   # the same model at the original shapes, removed units zeroed
  masks: PyTree           # broadcastable bool masks in the core's format for `masked_params`
  units: dict             # {"layers_i": {"mlp": bool (F,), "heads": bool (H,)}} kept units; "blocks": bool (L,)
  scores: dict            # the scores that chose them
  info: dict              # criterion, targets, params before/after, seconds


# ----------------------------------------------------------------------------------------------- statistics
def _batches(calib, batch_size):
  calib = np.asarray(calib)
  return [jnp.asarray(calib[s: s + batch_size]) for s in range(0, len(calib), batch_size)]


@jax.jit
def _mlp_stats(c):
  c = c.reshape(-1, c.shape[-1]).astype(jnp.float32)
  return jnp.sum(jnp.abs(c), 0), jnp.sum(c, 0), jnp.sum(c * c, 0)


def _head_stats(mix, n_heads):
  m = mix.reshape(-1, mix.shape[-1]).astype(jnp.float32)
  norms = jnp.sqrt(jnp.sum(jnp.square(m.reshape(m.shape[0], n_heads, -1)), -1))
  return jnp.sum(norms, 0), jnp.sum(m, 0), jnp.sum(m * m, 0)


_head_stats = jax.jit(_head_stats, static_argnums=1)


@jax.jit
def _cosine_sum(a, b):
  a = a.reshape(-1, a.shape[-1]).astype(jnp.float32)
  b = b.reshape(-1, b.shape[-1]).astype(jnp.float32)
  cos = jnp.sum(a * b, -1) / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-30)
  return jnp.sum(cos)


def activation_stats(model, params: PyTree, calibration_tokens, *, batch_size: int = 8,
                     progress: bool = False) -> dict:
  """Per block, from one forward pass over the calibration tokens (block by block, one block's activations
  in memory): `mlp_abs`, `mlp_sum`, `mlp_sq` (Σ|a|, Σa, Σa² of each MLP neuron's activation, the input of
  `down_proj`); `head_norm` (Σ over tokens of each query head's output L2 norm), `attn_sum`, `attn_sq` (per
  channel of the input of `o_proj`); `cos` (Σ cos(x_in, x_out) of the block); and `count` (tokens)."""
  cfg = _config(model)
  xs = [jnp.take(params["embed"]["embedding"], b, axis=0) for b in _batches(calibration_tokens, batch_size)]
  count = sum(int(np.prod(x.shape[:2])) for x in xs)
  out = {}
  from jprune._progress import progress_bar
  for i in progress_bar(range(cfg.n_layers), desc="statistics", disable=not progress):
    fn, bp, lc = _stages(cfg.layer(i)), params[f"layers_{i}"], cfg.layer(i)
    st = dict(mlp_abs=0.0, mlp_sum=0.0, mlp_sq=0.0, head_norm=0.0, attn_sum=0.0, attn_sq=0.0, cos=0.0)
    nxt = []
    for x in xs:
      mix = fn["mix"](bp["attn"], fn["norm"](bp["attn_norm"], x))
      hn, asum, asq = _head_stats(mix, lc.n_heads)
      h = fn["o"](bp["attn"], x, mix)
      c = fn["hidden"](bp["mlp"], fn["norm"](bp["mlp_norm"], h))
      mabs, msum, msq = _mlp_stats(c)
      y = fn["down"](bp["mlp"], h, c)
      for k, v in zip(("head_norm", "attn_sum", "attn_sq", "mlp_abs", "mlp_sum", "mlp_sq", "cos"),
                      (hn, asum, asq, mabs, msum, msq, _cosine_sum(x, y))):
        st[k] = st[k] + v
      nxt.append(y)
    xs = nxt
    out[f"layers_{i}"] = {k: np.asarray(v, np.float64) for k, v in st.items()} | {"count": count}
  return out


def gate_gradients(model, params: PyTree, calibration_tokens, *, batch_size: int = 8, progress: bool = False):
  """Per block and calibration batch b, ∂L_b/∂z for a gate z on each MLP neuron and query head's output:
  Σ w·∂L_b/∂w over its `down_proj` row / `o_proj` rows. Returns {layer: {"mlp"|"heads": (Σ_b, Σ_b ²)}}
  (what the "taylor" and "fisher" criteria are made of; pass it to `unit_scores(gates=...)` to reuse)."""
  cfg = _config(model)
  calib = np.asarray(calibration_tokens)
  model = Llama(cfg, remat=True)
  from jprune.llm.eval import _nll

  def loss(p, toks):
    return _nll(model.apply({"params": p}, toks), toks) / (toks.shape[0] * (toks.shape[1] - 1))

  def gates(p, g):
    out = {}
    for i in range(cfg.n_layers):
      lp, lg = p[f"layers_{i}"], g[f"layers_{i}"]
      zm = jnp.sum(lp["mlp"]["down_proj"]["kernel"] * lg["mlp"]["down_proj"]["kernel"], 1)
      zo = jnp.sum(lp["attn"]["o_proj"]["kernel"] * lg["attn"]["o_proj"]["kernel"], 1)
      out[f"layers_{i}"] = {"mlp": zm, "heads": zo.reshape(cfg.heads_of(i), -1).sum(1)}
    return out

  @jax.jit
  def step(acc, p, toks):
    z = gates(p, jax.grad(loss)(p, toks))
    return jax.tree.map(lambda a, v: (a[0] + v, a[1] + v * v), acc, z, is_leaf=lambda x: isinstance(x, tuple))

  zeros = {f"layers_{i}": {"mlp": jnp.zeros(cfg.hidden_of(i)), "heads": jnp.zeros(cfg.heads_of(i))}
           for i in range(cfg.n_layers)}
  acc = jax.tree.map(lambda z: (z, z), zeros)
  from jprune._progress import progress_bar
  for b in progress_bar(_batches(calib, batch_size), desc="gradients", disable=not progress):
    acc = step(acc, params, b)
  return jax.tree.map(lambda a: np.asarray(a, np.float64), acc)


def unit_scores(model, params: PyTree, calibration_tokens=None, criterion: str = "activation", *,
                batch_size: int = 8, stats: Optional[dict] = None, gates: Optional[dict] = None,
                progress: bool = False) -> dict:
  """Importance of every MLP neuron and query head: {"layers_i": {"mlp": (F_i,), "heads": (H_i,)}}, higher =
  keep (see the module docstring for the criteria). `stats` reuses an `activation_stats` result, `gates` a
  `gate_gradients` one."""
  cfg = _config(model)
  if criterion not in CRITERIA:
    raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}; got {criterion!r}.")
  dh = cfg.d_head
  out = {}
  if criterion in ("taylor", "fisher"):
    if gates is None and calibration_tokens is None:
      raise ValueError(f"criterion {criterion!r} needs calibration_tokens.")
    z = gates if gates is not None else gate_gradients(cfg, params, calibration_tokens, batch_size=batch_size,
                                                       progress=progress)
    for name, v in z.items():
      out[name] = {k: (np.abs(s) if criterion == "taylor" else sq) for k, (s, sq) in v.items()}
    return out
  if criterion in ("activation", "flap") and stats is None:
    if calibration_tokens is None:
      raise ValueError(f"criterion {criterion!r} needs calibration_tokens.")
    stats = activation_stats(cfg, params, calibration_tokens, batch_size=batch_size, progress=progress)
  for i in range(cfg.n_layers):
    name, lp = f"layers_{i}", params[f"layers_{i}"]
    h = cfg.heads_of(i)
    wq = np.asarray(lp["attn"]["q_proj"]["kernel"], np.float64)
    wo = np.asarray(lp["attn"]["o_proj"]["kernel"], np.float64)
    wg = np.asarray(lp["mlp"]["gate_proj"]["kernel"], np.float64)
    wu = np.asarray(lp["mlp"]["up_proj"]["kernel"], np.float64)
    wd = np.asarray(lp["mlp"]["down_proj"]["kernel"], np.float64)
    if criterion == "l2":
      mlp = np.sqrt((wg ** 2).sum(0) + (wu ** 2).sum(0) + (wd ** 2).sum(1))
      heads = np.sqrt((wq ** 2).sum(0).reshape(h, dh).sum(1) + (wo ** 2).sum(1).reshape(h, dh).sum(1))
    else:
      st = stats[name]  # type: ignore[index]  # given or computed for these criteria
      n = st["count"]
      if criterion == "activation":
        mlp, heads = st["mlp_abs"] / n, st["head_norm"] / n
      else:  # flap: variance of the channel times the squared norm of the weights it feeds
        var_m = np.maximum(st["mlp_sq"] / n - (st["mlp_sum"] / n) ** 2, 0.0)
        var_a = np.maximum(st["attn_sq"] / n - (st["attn_sum"] / n) ** 2, 0.0)
        mlp = var_m * (wd ** 2).sum(1)
        heads = (var_a * (wo ** 2).sum(1)).reshape(h, dh).sum(1)
    out[name] = {"mlp": mlp, "heads": heads}
  return out


def block_influence(stats: dict) -> np.ndarray:
  """ShortGPT's Block Influence per block, 1 − mean cos(x_in, x_out): low = the block changes little."""
  return np.array([1.0 - stats[f"layers_{i}"]["cos"] / stats[f"layers_{i}"]["count"] for i in range(len(stats))])


# ----------------------------------------------------------------------------------------------- allocation
def _chunks(cfg: LlamaConfig, scores: dict, kind: str, round_to: int, head_groups: str, layers):
  """Removable chunks of one kind: (layer, units, summed score, params) in the order a block gives them up.

  MLP: the lowest-scored neurons in steps of `round_to` (the first step takes F mod round_to, so widths stay
  multiples of it). Heads, "query": one query head from every KV group (each group's lowest left); "kv":
  a whole KV group (lowest mean score first). The last chunk of a block is never offered (a block keeps at
  least one chunk)."""
  d, dh = cfg.dim, cfg.d_head
  out = []
  for i in layers:
    s = np.asarray(scores[f"layers_{i}"][kind], np.float64)
    if kind == "mlp":
      order = np.argsort(s, kind="stable")
      f = len(order)
      sizes = ([f % round_to] if f % round_to else []) + [round_to] * (f // round_to)
      start = 0
      for size in sizes[:-1]:
        idx = order[start: start + size]
        out.append((i, idx, float(s[idx].sum()), len(idx) * 3 * d))
        start += size
    else:
      h, kv = cfg.heads_of(i), cfg.kv_heads_of(i)
      g = h // kv
      by_group = s.reshape(kv, g)
      if head_groups == "query":
        order = np.argsort(by_group, axis=1, kind="stable")        # (kv, g): each group's heads, lowest first
        for level in range(g - 1):
          idx = np.arange(kv) * g + order[:, level]
          out.append((i, idx, float(s[idx].sum()), kv * 2 * d * dh))
      else:
        order = np.argsort(by_group.mean(1), kind="stable")
        for grp in order[:-1]:
          idx = grp * g + np.arange(g)
          out.append((i, idx, float(s[idx].sum()), (2 * g + 2) * d * dh))
  return out


def choose_units(model, scores: dict, *, sparsity: Optional[float] = None, mlp: Optional[float] = None,
                 heads: Optional[float] = None, kinds: Sequence[str] = ("mlp", "heads"),
                 allocation: str = "global", round_to: int = 8, head_groups: str = "query",
                 removed_blocks: Sequence[int] = (), loss_scores: bool = False) -> dict:
  """Chooses the kept units from `unit_scores`: {"layers_i": {"mlp": bool (F,), "heads": bool (H,)}}.

  Give either `sparsity` (the fraction of the decoder blocks' params to remove, over the `kinds` named;
  blocks in `removed_blocks` count towards it) or per-kind fractions of units `mlp=` / `heads=`.
  `allocation="layer"` removes the same share from every block; "global" ranks every block's chunks (see the
  module docstring). `loss_scores=True` (Taylor/Fisher) ranks chunks by score per parameter removed, since
  those scores are estimated loss changes; otherwise scores are divided by their kind's mean over the model
  and chunks ranked by their mean.
  """
  cfg = _config(model)
  if allocation not in ("global", "layer"):
    raise ValueError(f"allocation must be 'global' or 'layer', got {allocation!r}.")
  if head_groups not in ("query", "kv"):
    raise ValueError(f"head_groups must be 'query' or 'kv', got {head_groups!r}.")
  if not isinstance(round_to, int) or round_to < 1:
    raise ValueError(f"round_to must be a positive int, got {round_to!r}.")
  for k in kinds:
    if k not in KINDS:
      raise ValueError(f"kinds must be among {KINDS}, got {k!r}.")
  if sparsity is None and mlp is None and heads is None:
    raise ValueError("give sparsity= (fraction of block params) or mlp= / heads= (fractions of units).")
  if sparsity is not None and (mlp is not None or heads is not None):
    raise ValueError("give either sparsity= or mlp= / heads=, not both.")
  for name, v in (("sparsity", sparsity), ("mlp", mlp), ("heads", heads)):
    if v is not None and not (isinstance(v, (int, float)) and 0 <= v < 1):
      raise ValueError(f"{name} must be a fraction in [0, 1), got {v!r}.")
  removed_blocks = sorted(set(int(b) for b in removed_blocks))
  layers = [i for i in range(cfg.n_layers) if i not in removed_blocks]
  keep = {f"layers_{i}": {"mlp": np.ones(cfg.hidden_of(i), bool), "heads": np.ones(cfg.heads_of(i), bool)}
          for i in range(cfg.n_layers)}
  for i in removed_blocks:
    keep[f"layers_{i}"] = {"mlp": np.zeros(cfg.hidden_of(i), bool), "heads": np.zeros(cfg.heads_of(i), bool)}
  if not layers:
    raise ValueError("removed_blocks removes every block.")

  def remove(chunk):
    keep[f"layers_{chunk[0]}"][chunk[4]][chunk[1]] = False

  per_kind = {"mlp": mlp, "heads": heads}
  if sparsity is not None:  # "layer": every named kind loses the same share of its params, together `sparsity`
    block_total = sum(cfg.block_params(i) for i in range(cfg.n_layers))
    kind_params = {"mlp": sum(3 * cfg.dim * cfg.hidden_of(i) for i in layers),
                   "heads": sum(2 * cfg.dim * cfg.d_head * cfg.heads_of(i) for i in layers)}
    left = sparsity * block_total - sum(cfg.block_params(i) for i in removed_blocks)
    share = max(0.0, left) / sum(kind_params[k] for k in kinds)
    if share >= 1:
      raise ValueError(f"sparsity={sparsity} removes more than the {'+'.join(kinds)} params of the kept blocks.")
    per_kind = {k: (share if k in kinds else None) for k in KINDS}
  chunks = {k: [c + (k,) for c in _chunks(cfg, scores, k, round_to, head_groups, layers)] for k in KINDS}
  total_units = {"mlp": sum(cfg.hidden_of(i) for i in layers), "heads": sum(cfg.heads_of(i) for i in layers)}
  if allocation == "layer" or sparsity is None:
    for k in KINDS:
      frac = per_kind[k]
      if not frac:
        continue
      if allocation == "layer":
        for i in layers:
          mine = [c for c in chunks[k] if c[0] == i]
          want = frac * (cfg.hidden_of(i) if k == "mlp" else cfg.heads_of(i))
          _take_until(mine, want, lambda c: len(c[1]), remove, k, i)
      else:
        _take_until(_ranked(chunks[k], loss_scores), frac * total_units[k], lambda c: len(c[1]), remove, k, None)
  else:
    block_total = sum(cfg.block_params(i) for i in range(cfg.n_layers))
    budget = sparsity * block_total - sum(cfg.block_params(i) for i in removed_blocks)
    pool = [c for k in kinds for c in chunks[k]]
    if budget > 0:
      _take_until(_ranked(pool, loss_scores, normalize=not loss_scores), budget, lambda c: c[3], remove,
                  "+".join(kinds), None)
  return keep


def _ranked(pool, loss_scores, normalize=True):
  """Chunks in removal order: by loss per parameter, or by mean score on each kind's own scale."""
  if loss_scores:
    return sorted(pool, key=lambda c: c[2] / c[3])
  mean = {}
  for k in KINDS:
    vals = [c[2] / len(c[1]) for c in pool if c[4] == k]
    mean[k] = (np.mean(vals) if vals else 1.0) or 1.0
  return sorted(pool, key=lambda c: (c[2] / len(c[1])) / (mean[c[4]] if normalize else 1.0))


def _take_until(pool, want, size, remove, kind, layer):
  """Removes chunks of `pool` in order while the amount removed stays closest to `want` (never all)."""
  done = 0
  for c in pool:
    if done >= want:
      break
    s = size(c)
    if abs(done + s - want) > abs(done - want) and done > 0:
      break
    remove(c)
    done += s
  if want > 0 and not pool:
    where = f"block {layer}" if layer is not None else "the model"
    raise ValueError(f"the target removes every {kind} unit of {where}; lower it or use a smaller round_to.")


# ----------------------------------------------------------------------------------------------- masks
def param_masks(model, params: PyTree, units: dict) -> PyTree:
  """Broadcastable bool masks (the core's format) that zero the removed units' rows/columns."""
  cfg = _config(model)
  dh = cfg.d_head
  masks = jax.tree.map(lambda _: np.asarray(True), params)
  masks = {k: (dict(v) if isinstance(v, dict) else v) for k, v in masks.items()}
  for i in range(cfg.n_layers):
    u = units[f"layers_{i}"]
    hm = np.repeat(u["heads"], dh)
    kvm = np.repeat(_kv_kept(cfg, i, u["heads"]), dh)
    masks[f"layers_{i}"] = {
        "attn_norm": {"scale": np.asarray(True)}, "mlp_norm": {"scale": np.asarray(True)},
        "attn": {"q_proj": {"kernel": hm[None, :]}, "k_proj": {"kernel": kvm[None, :]},
                 "v_proj": {"kernel": kvm[None, :]}, "o_proj": {"kernel": hm[:, None]}},
        "mlp": {"gate_proj": {"kernel": u["mlp"][None, :]}, "up_proj": {"kernel": u["mlp"][None, :]},
                "down_proj": {"kernel": u["mlp"][:, None]}}}
  return jax.tree.map(jnp.asarray, masks)


def _kv_kept(cfg, i, heads_kept):
  g = cfg.heads_of(i) // cfg.kv_heads_of(i)
  return np.asarray(heads_kept).reshape(-1, g).any(1)


def _check_units(cfg, units):
  for i in range(cfg.n_layers):
    u = units[f"layers_{i}"]
    h, f = np.asarray(u["heads"], bool), np.asarray(u["mlp"], bool)
    if h.shape != (cfg.heads_of(i),) or f.shape != (cfg.hidden_of(i),):
      raise ValueError(f"units of layers_{i}: heads {h.shape}, mlp {f.shape}; the model has "
                       f"({cfg.heads_of(i)},), ({cfg.hidden_of(i)},).")
    if not h.any() and not f.any():
      continue  # the whole block is removed
    if not h.any() or not f.any():
      raise ValueError(f"layers_{i} keeps no {'attention head' if not h.any() else 'MLP neuron'}; remove the "
                       "whole block (removed_blocks) or keep at least one.")
    per_group = h.reshape(cfg.kv_heads_of(i), -1).sum(1)
    kept = per_group[per_group > 0]
    if len(set(kept.tolist())) != 1:
      raise ValueError(f"layers_{i} keeps {per_group.tolist()} query heads per KV group; a GQA block needs the "
                       "same number in every kept group.")


# ----------------------------------------------------------------------------------------------- reconstruction
@jax.jit
def _gram(a):
  a = a.reshape(-1, a.shape[-1]).astype(jnp.float32)
  return a.T @ a


@jax.jit
def _cross(a, t):
  a = a.reshape(-1, a.shape[-1]).astype(jnp.float32)
  return a.T @ t.reshape(-1, t.shape[-1]).astype(jnp.float32)


@jax.jit
def _solve_kept(h, rhs, keep, percdamp):
  """Least squares on the kept rows only: W_K ← (H_KK + λI)⁻¹ rhs_K (rhs = Σ aᵀ target); removed rows zero."""
  k = keep.astype(jnp.float32)
  hk = h * k[:, None] * k[None, :]
  lam = percdamp * jnp.sum(jnp.diag(h) * k) / jnp.maximum(jnp.sum(k), 1.0)
  # removed rows get an identity row so the system stays regular; their solution is multiplied by 0 below
  a = hk + jnp.diag(lam * k + (1.0 - k) * (1.0 + lam))
  return jax.scipy.linalg.solve(a, rhs * k[:, None], assume_a="pos") * k[:, None]


def _refit(w, h, keep, percdamp):
  """Refit of a kernel's kept input rows to the unpruned kernel's output on the same inputs: W_K ← (H_KK + λI)⁻¹
  H_K: W."""
  return _solve_kept(h, h @ w.astype(jnp.float32), keep, percdamp).astype(w.dtype)


RECONSTRUCT = ("layer", "dense")


def apply_units(model, params: PyTree, units: dict, calibration_tokens=None, *, reconstruct=False,
                batch_size: int = 8, percdamp: float = 0.01, progress: bool = False) -> PyTree:
  """The params with the removed units zeroed (same shapes), optionally refitted on calibration tokens.

  `reconstruct`, block by block through the already-pruned blocks (their outputs feed the next block):
    * "layer" (or True): the kept rows of `o_proj` and `down_proj` are refitted by least squares to what the
      unpruned layer outputs on the same (pruned-model) inputs: the structured analogue of SparseGPT's update.
    * "dense": refitted so the block's residual stream matches the *dense model's* at that point, i.e. the
      target also carries the drift of the blocks before (x_dense − x_pruned + the dense layer's output on the
      dense model's inputs); a second, dense stream runs alongside.
  """
  cfg = _config(model)
  _check_units(cfg, units)
  if reconstruct is True:
    reconstruct = "layer"
  if reconstruct and reconstruct not in RECONSTRUCT:
    raise ValueError(f"reconstruct must be False, True, 'layer' or 'dense'; got {reconstruct!r}.")
  params = flax.core.unfreeze(params)
  masks = param_masks(cfg, params, units)
  out = jax.tree.map(lambda w, m: jnp.where(m, w, jnp.zeros_like(w)), params, masks)
  if not reconstruct:
    return out
  if calibration_tokens is None:
    raise ValueError("reconstruct needs calibration_tokens.")
  dh = cfg.d_head
  xs = [jnp.take(params["embed"]["embedding"], b, axis=0) for b in _batches(calibration_tokens, batch_size)]
  xd = list(xs) if reconstruct == "dense" else None
  from jprune._progress import progress_bar
  for i in progress_bar(range(cfg.n_layers), desc="reconstruct", disable=not progress):
    name = f"layers_{i}"
    u = units[name]
    fn, dense, bp = _stages(cfg.layer(i)), params[name], out[name]
    if xd is not None:   # the dense stream: block outputs and the pieces the targets need
      ad = [fn["mix"](dense["attn"], fn["norm"](dense["attn_norm"], x)) for x in xd]
      hd = [fn["o"](dense["attn"], x, m) for x, m in zip(xd, ad)]
      cd = [fn["hidden"](dense["mlp"], fn["norm"](dense["mlp_norm"], h)) for h in hd]
      yd = [fn["down"](dense["mlp"], h, c) for h, c in zip(hd, cd)]
      del ad, cd
    if not np.any(u["mlp"]):
      if xd is not None:
        xd = yd
      continue  # a removed block is the identity
    mix = [fn["mix"](dense["attn"], fn["norm"](dense["attn_norm"], x)) for x in xs]  # kept heads do not see the rest
    hmat = sum(_gram(m) for m in mix)
    keep_o = jnp.asarray(np.repeat(u["heads"], dh))
    w_o = dense["attn"]["o_proj"]["kernel"]
    if xd is None:
      bp["attn"]["o_proj"]["kernel"] = _refit(w_o, hmat, keep_o, percdamp)
    else:   # target: h_dense − x_pruned, reached through the kept rows of o_proj
      rhs = sum(_cross(m, h - x) for m, h, x in zip(mix, hd, xs))
      bp["attn"]["o_proj"]["kernel"] = _solve_kept(hmat, rhs, keep_o, percdamp).astype(w_o.dtype)
    keep_m = jnp.asarray(keep_o, jnp.float32)[None, None, :]
    hs = [fn["o"](bp["attn"], x, m * keep_m) for x, m in zip(xs, mix)]
    del mix
    c = [fn["hidden"](dense["mlp"], fn["norm"](dense["mlp_norm"], h)) for h in hs]
    hmat = sum(_gram(v) for v in c)
    keep_f = jnp.asarray(u["mlp"])
    w_d = dense["mlp"]["down_proj"]["kernel"]
    if xd is None:
      bp["mlp"]["down_proj"]["kernel"] = _refit(w_d, hmat, keep_f, percdamp)
    else:
      rhs = sum(_cross(v, y - h) for v, y, h in zip(c, yd, hs))
      bp["mlp"]["down_proj"]["kernel"] = _solve_kept(hmat, rhs, keep_f, percdamp).astype(w_d.dtype)
      xd = yd
    xs[:] = [fn["down"](bp["mlp"], h, v * keep_f.astype(v.dtype)[None, None, :]) for h, v in zip(hs, c)]
  return out


# ----------------------------------------------------------------------------------------------- compaction
def compact(model, params: PyTree, units: dict) -> tuple[LlamaConfig, PyTree]:
  """Slices the removed units out: (smaller config with per-layer widths, its params). Blocks whose units are
  all removed are dropped and the rest renumbered. `Llama(config).apply` on the result equals the masked model.
  """
  cfg = _config(model)
  _check_units(cfg, units)
  dh = cfg.d_head
  new = {k: v for k, v in params.items() if not k.startswith("layers_")}
  hidden, heads, kvs = [], [], []
  j = 0
  for i in range(cfg.n_layers):
    u = units[f"layers_{i}"]
    if not np.any(u["mlp"]):
      continue
    lp = params[f"layers_{i}"]
    hk = np.asarray(u["heads"], bool)
    kvk = _kv_kept(cfg, i, hk)
    qi = np.flatnonzero(np.repeat(hk, dh))
    ki = np.flatnonzero(np.repeat(kvk, dh))
    fi = np.flatnonzero(np.asarray(u["mlp"], bool))
    a, m = lp["attn"], lp["mlp"]
    new[f"layers_{j}"] = {
        "attn_norm": lp["attn_norm"], "mlp_norm": lp["mlp_norm"],
        "attn": {"q_proj": {"kernel": a["q_proj"]["kernel"][:, qi]}, "k_proj": {"kernel": a["k_proj"]["kernel"][:, ki]},
                 "v_proj": {"kernel": a["v_proj"]["kernel"][:, ki]}, "o_proj": {"kernel": a["o_proj"]["kernel"][qi, :]}},
        "mlp": {"gate_proj": {"kernel": m["gate_proj"]["kernel"][:, fi]},
                "up_proj": {"kernel": m["up_proj"]["kernel"][:, fi]},
                "down_proj": {"kernel": m["down_proj"]["kernel"][fi, :]}}}
    hidden.append(len(fi))
    heads.append(int(hk.sum()))
    kvs.append(int(kvk.sum()))
    j += 1
  return cfg.with_widths(hidden, heads, kvs, n_layers=j), new


def n_params(tree: PyTree) -> int:
  return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))


# ----------------------------------------------------------------------------------------------- one call
def prune_width(model, params: PyTree, calibration_tokens, *, sparsity: Optional[float] = None,
                mlp: Optional[float] = None, heads: Optional[float] = None, criterion: str = "activation",
                kinds: Sequence[str] = ("mlp", "heads"), allocation: str = "layer", round_to: int = 8,
                head_groups: str = "query", blocks: int = 0, reconstruct: bool = False, batch_size: int = 8,
                scores: Optional[dict] = None, stats: Optional[dict] = None,
                progress: bool = True) -> WidthPruneResult:
  """Scores, chooses, (optionally) reconstructs and compacts in one call.

  Args:
    model: a `jprune.models.Llama` or its `LlamaConfig`; params: its params.
    calibration_tokens: int token windows (n, T).
    sparsity: fraction of the decoder blocks' params to remove (over `kinds`, plus `blocks`); or give
      `mlp=` / `heads=` fractions of units per kind.
    criterion: "activation" (Minitron), "flap", "taylor" (LLM-Pruner), "fisher", or "l2" (magnitude baseline).
    allocation: "layer" (every block the same share, default) or "global" (see `choose_units`).
    round_to: MLP widths stay multiples of it (8 by default: SIMD-friendly; 32 also keeps q8_0's 32-value
      blocks whole along down_proj's rows, else `save_gguf` stores that tensor as f16).
    head_groups: "query" (equal numbers of query heads per KV group) or "kv" (whole KV groups).
    blocks: remove this many whole blocks first, the lowest Block Influence (counted in `sparsity`).
    reconstruct: False, "layer" (True) or "dense": least-squares refit of the kept `o_proj`/`down_proj` rows
      on the calibration set (see `apply_units`).
    scores, stats: reuse `unit_scores` / `activation_stats` results of these params and calibration tokens.

  Returns:
    `WidthPruneResult(config, params, masked_params, masks, units, scores, info)`; `Llama(config)` on `params`
    computes what `Llama(model's config)` computes on `masked_params`.
  """
  import time
  cfg = _config(model)
  t0 = time.perf_counter()
  calib = np.asarray(calibration_tokens)
  if calib.ndim != 2 or not np.issubdtype(calib.dtype, np.integer):
    raise ValueError(f"calibration_tokens must be int tokens (n, seq_len), got {calib.dtype} {calib.shape}.")
  if calib.min() < 0 or calib.max() >= cfg.vocab_size:
    raise ValueError(f"calibration_tokens must lie in [0, {cfg.vocab_size}).")
  if not isinstance(blocks, int) or not 0 <= blocks < cfg.n_layers:
    raise ValueError(f"blocks must be an int in [0, {cfg.n_layers}), got {blocks!r}.")
  if criterion not in CRITERIA:
    raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}; got {criterion!r}.")
  if stats is None and ((criterion in ("activation", "flap") and scores is None) or blocks):
    stats = activation_stats(cfg, params, calib, batch_size=batch_size, progress=progress)
  removed = []
  if blocks:
    influence = block_influence(stats)  # type: ignore[arg-type]  # computed above when blocks > 0
    removed = sorted(np.argsort(influence, kind="stable")[:blocks].tolist())
  if scores is None:
    scores = unit_scores(cfg, params, calib, criterion, batch_size=batch_size, stats=stats, progress=progress)
  units = choose_units(cfg, scores, sparsity=sparsity, mlp=mlp, heads=heads, kinds=kinds, allocation=allocation,
                       round_to=round_to, head_groups=head_groups, removed_blocks=removed,
                       loss_scores=criterion in ("taylor", "fisher"))
  masked = apply_units(cfg, params, units, calib, reconstruct=reconstruct, batch_size=batch_size,
                       progress=progress)
  small_cfg, small = compact(cfg, masked, units)
  dense_blocks = sum(cfg.block_params(i) for i in range(cfg.n_layers))
  small_blocks = sum(small_cfg.block_params(i) for i in range(small_cfg.n_layers))
  info = {"criterion": criterion, "sparsity": sparsity, "mlp": mlp, "heads": heads, "kinds": list(kinds),
          "allocation": allocation, "round_to": round_to, "head_groups": head_groups, "removed_blocks": removed,
          "reconstruct": reconstruct, "calibration": list(calib.shape), "params": n_params(params),
          "params_after": n_params(small), "block_params": dense_blocks, "block_params_after": small_blocks,
          "removed_fraction_of_blocks": 1 - small_blocks / dense_blocks,
          "macs_per_token": cfg.macs_per_token(), "macs_per_token_after": small_cfg.macs_per_token(),
          "seconds": time.perf_counter() - t0}
  return WidthPruneResult(small_cfg, small, masked, param_masks(cfg, params, units), units, scores, info)


def widths_table(config: LlamaConfig) -> str:
  """Markdown table of every block's widths."""
  rows = ["| block | query heads | KV heads | MLP width | params |", "|---:|---:|---:|---:|---:|"]
  for i in range(config.n_layers):
    rows.append(f"| {i} | {config.heads_of(i)} | {config.kv_heads_of(i)} | {config.hidden_of(i)} | "
                f"{config.block_params(i):,} |")
  return "\n".join(rows)
