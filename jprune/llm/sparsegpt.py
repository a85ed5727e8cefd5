"""SparseGPT (Frantar & Alistarh 2023): prune one kernel and update the rest from H = Σ x xᵀ."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jprune import _kth, _tree


def sparsegpt(kernel: jax.Array, hessian: jax.Array, sparsity: float = 0.5, n: int = 0, m: int = 0,
              blocksize: int = 128, percdamp: float = 0.01) -> tuple[jax.Array, jax.Array]:
  """SparseGPT (Frantar & Alistarh 2023) on one Flax kernel (in, out) with H = Σ x xᵀ over its inputs.

  Columns of W = kernelᵀ (input features) are processed in blocks; inside a block, the mask is chosen by
  w² / [H⁻¹]²_cc (exactly round(s·rows·block) per block, or n of every m inputs for N:M), and each pruned
  column's error is spread over the not-yet-processed columns with the Cholesky factor of H⁻¹ (the OBS
  update). The last block is shorter when `blocksize` does not divide the inputs (as in the authors' code).
  Returns (new kernel, keep-mask), both (in, out).
  """
  if jnp.ndim(kernel) != 2:
    raise ValueError(f"sparsegpt: the kernel must be 2-D (in, out); got shape {tuple(jnp.shape(kernel))}.")
  cols = kernel.shape[0]
  if not n:
    _tree.check_sparsity(sparsity, "sparsegpt: sparsity")
  elif not 0 < n <= m:
    raise ValueError(f"sparsegpt: N:M keeps n of every m inputs and needs 0 < n <= m; got {n}:{m}.")
  if not _tree.is_traced(percdamp) and not float(percdamp) >= 0:   # it can make H indefinite: NaN weights
    raise ValueError(f"sparsegpt: percdamp must be >= 0, got {percdamp}.")
  if blocksize < 1 or (n and (blocksize % m or cols % m)):
    raise ValueError(f"sparsegpt: blocksize {blocksize} and the kernel's {cols} inputs must be positive"
                     + (f" multiples of m = {m} for {n}:{m}" if n else "") + ".")
  if hessian.shape != (cols, cols):
    raise ValueError(f"sparsegpt: the Hessian must be (in, in) = ({cols}, {cols}) for a kernel of shape "
                     f"{tuple(kernel.shape)}; got {tuple(hessian.shape)}.")
  return _sparsegpt(kernel, hessian, sparsity, n, m, blocksize, percdamp)


@jax.jit(static_argnames=("n", "m", "blocksize", "sparsity"))
def _sparsegpt(kernel, hessian, sparsity, n, m, blocksize, percdamp):
  w = kernel.T.astype(jnp.float32)
  rows, cols = w.shape
  h = hessian.astype(jnp.float32)
  dead = jnp.diag(h) == 0
  h = h + jnp.diag(dead.astype(jnp.float32))
  w = jnp.where(dead[None, :], 0.0, w)
  h = h + percdamp * jnp.mean(jnp.diag(h)) * jnp.eye(cols, dtype=jnp.float32)
  # u upper with H⁻¹ = uᵀ u (the Cholesky factor of H⁻¹, transposed) without forming H⁻¹: the Cholesky factor of
  # H with rows and columns reversed, reversed back, is upper R with H = R Rᵀ, so u = R⁻¹ (one factorization and
  # one triangular solve instead of two factorizations and a full solve: half the time at 8192 inputs)
  r = jnp.linalg.cholesky(h[::-1, ::-1])[::-1, ::-1]
  u = jax.scipy.linalg.solve_triangular(r, jnp.eye(cols, dtype=jnp.float32), lower=False)
  col = jnp.arange(cols)

  def block_step(i1, bs, carry):   # columns [i1, i1 + bs), bs static
    w, prune = carry
    k_block = int(round(sparsity * rows * bs))
    w1 = jax.lax.dynamic_slice(w, (0, i1), (rows, bs))
    u1 = jax.lax.dynamic_slice(u, (i1, i1), (bs, bs))
    d = jnp.diag(u1)
    if n:
      p1 = jnp.zeros((rows, bs), bool)
    else:   # the k_block lowest, ties in flat order (as a stable argsort would), by counting passes: sorting
      keep, = _kth.prune_lowest([(w1 * w1 / (d * d)[None, :], None)], k_block, _kth.unit_key)   # cost 5x more
      p1 = ~keep

    def col_step(i, c):
      w1, p1, err1 = c
      if n:  # choose the group's mask when reaching its first column, from the updated weights
        def choose(p1):
          grp = jax.lax.dynamic_slice(w1, (0, i), (rows, m)) ** 2 / jax.lax.dynamic_slice(d, (i,), (m,))[None] ** 2
          order = jnp.argsort(grp, axis=1, stable=True)[:, : m - n]
          sel = jnp.zeros((rows, m), bool).at[jnp.arange(rows)[:, None], order].set(True)
          return jax.lax.dynamic_update_slice(p1, sel, (0, i))
        p1 = jax.lax.cond(i % m == 0, choose, lambda p: p, p1)
      wcol = w1[:, i]
      q = jnp.where(p1[:, i], 0.0, wcol)
      err = (wcol - q) / u1[i, i]
      w1 = w1 - err[:, None] * u1[i][None, :]   # u1[i, :i] = 0: only columns >= i change
      return w1, p1, err1.at[:, i].set(err)

    w1, p1, err1 = jax.lax.fori_loop(0, bs, col_step, (w1, p1, jnp.zeros((rows, bs), jnp.float32)))
    w1 = jnp.where(p1, 0.0, w1)
    rest = w - err1 @ jax.lax.dynamic_slice(u, (i1, 0), (bs, cols))
    w = jnp.where(col[None, :] >= i1 + bs, rest, w)
    w = jax.lax.dynamic_update_slice(w, w1, (0, i1))
    prune = jax.lax.dynamic_update_slice(prune, p1, (0, i1))
    return w, prune

  bs = min(blocksize, cols)
  carry = jax.lax.fori_loop(0, cols // bs, lambda b, c: block_step(b * bs, bs, c), (w, jnp.zeros((rows, cols), bool)))
  if cols % bs:   # the shorter last block
    carry = block_step(cols - cols % bs, cols % bs, carry)
  w, prune = carry
  return w.T.astype(kernel.dtype), ~prune.T
