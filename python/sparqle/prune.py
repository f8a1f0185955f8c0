"""Pruning masks: which weights a sparse format keeps.

Four criteria, each for the three patterns (unstructured, b x b blocks, N:M):

- ``magnitude(w, ...)``: the largest |w| (no data).
- ``wanda(w, x_norm, ...)``: the largest |w_ij| * |x_j|, |x_j| being input feature j's l2
  norm over calibration inputs, compared within each output row (Wanda).
- ``sparsegpt(w, xtx, ...)``: with H = X^T X of the calibration inputs, the columns are
  swept in order (sparqle.calibrate) and each pruned weight's error is compensated on the
  weights of its row not yet swept; the unstructured mask is chosen per chunk of 128
  columns from the OBS cost w_ij^2 / U_jj^2 of the weights as updated so far (SparseGPT),
  the N:M one per group of m from the joint OBS cost of each choice of the m - n weights
  to prune, and the blocks before the sweep from each block's joint OBS cost (below);
  then the kept weights are refitted for that mask (``calibrate.masked_refit``: the
  least-squares solution of each row, to float32's precision). Returns the refitted
  weight with the mask.
- ``admm(w, xtx, ...)``: the same damped output error minimized over the pattern by the
  alternating direction method of multipliers (below), then refitted like sparsegpt's.

N:M groups are scored jointly. When the sweep reaches a group G of m columns, the inverse
Hessian of the columns not yet fixed, restricted to G, is U_GG^T U_GG (U the upper
Cholesky factor of H_d^{-1}: the rows of U above G are out of the sweep). Pruning the
set P of a row's weights w_G and compensating on every column still free costs exactly
w_P^T [(U_GG^T U_GG)_PP]^{-1} w_P, so each row takes the P of least cost among all
C(m, m - n) choices (at most 70, for 4:8). SparseGPT scores each weight alone
(w_j^2 / U_jj^2), which ignores how the pruned weights' errors interact; the joint cost
is the true one for the group, and the sweep's column-by-column updates then make
exactly that compensation.

Blocks are scored jointly too, each with every other column free: pruning the b x b block
B of a block-row costs the sum over its rows of w_B^T [(H_d^{-1})_BB]^{-1} w_B, the exact
OBS cost of removing B alone, and each block-row keeps its blocks of largest cost (the
counts as Wanda's: the same in every block-row). Summing SparseGPT's per-weight costs
over the block instead ignores the correlations among its b columns, and choosing per
chunk of 128 columns, as SparseGPT does for unstructured sparsity, forces the same
share of pruned blocks into every chunk (2 of 4 at 50% and b = 32).

ADMM (after Boza, "Fast and Effective Weight Update for Pruned Large Language Models",
2024) splits min over W' in the pattern of (W - W') H_d (W - W')^T into W' = Z, Z in the
pattern, and alternates. It works in the coordinates V = W D, D = diag(H_d)^{1/2}, where
the Hessian H~ = D^{-1} H_d D^{-1} has a unit diagonal: there the projection below keeps
the largest |w_ij| sqrt(H_jj) (Wanda's score, up to the damping), so the mask does not
depend on how each input feature happens to be scaled (keeping the largest |w| instead,
the Euclidean projection of W, gave 1.1 to 2.9 times sparsegpt's output error on
tests/test_calibrate.py's inputs, whose scales span two orders of magnitude). From Z = V,
U = 0:

    V' = (V H~ + rho (Z - U)) (H~ + rho I)^{-1}        (all rows at once)
    Z  = the projection of V' + U onto the pattern     (keep the largest |.|: per group of
                                                        m, per row, per block-row by the
                                                        blocks' Frobenius norms)
    U  = U + V' - Z,   rho = growth * rho

The mask is chosen again at every step, from weights that have already absorbed the error
of the ones about to go, and the growing rho pulls V' onto Z. One eigendecomposition
H~ = Q diag(lambda) Q^T serves every rho: (H~ + rho I)^{-1} = Q diag(1 / (lambda + rho)) Q^T.
The last step's mask is refitted exactly (``calibrate.masked_refit``, from Z D^{-1}).
Where SparseGPT fixes each weight's fate once, in column order, ADMM revisits it.
"""
import itertools
import numbers
from typing import Optional, Tuple

import torch

from .calibrate import (ADMM_GROWTH, ADMM_RHO, ADMM_STEPS, PRUNE_DAMP, check_feature_statistic, damped_hessian,
                        damped_inverse_factor, obs_sweep, refit_damped)
from .formats._checks import cdiv
from .formats.bell import block_sums
from .formats.nm import keep_top_n, check_pattern


def magnitude(w: torch.Tensor, sparsity: Optional[float] = None, *, block: Optional[int] = None,
              n: Optional[int] = None, m: Optional[int] = None) -> torch.Tensor:
    """The bool mask (w's shape) that keeps the largest weights of ``w``.

    Unstructured (``block=None``): the ``numel - round(sparsity * numel)`` entries of
    largest |w|. Blocks (``block=b``, 2-D w): the b x b blocks (edge blocks partial) of
    largest Frobenius norm, ``sparsity`` being the fraction of blocks zeroed.
    ``sparsity`` lies in [0, 1); counts are exact, so equal shapes and sparsities give
    equal nonzero counts. N:M (``n=2, m=4``, no sparsity, 2-D w): in each group of m
    consecutive entries of a row, the n of largest |w| (ties: the lower index)."""
    pattern = _check(w, sparsity, block, n, m, two_d=False)
    if pattern == "nm":
        return keep_top_n(w, n, m)
    if pattern == "unstructured":
        return _keep_largest(w.detach().abs(), sparsity)
    keep = _keep_largest(block_sums(w.detach().float().pow(2), block).sqrt(), sparsity)
    return _expand_blocks(keep, block, w.shape)


def wanda(w: torch.Tensor, x_norm: torch.Tensor, sparsity: Optional[float] = None, *,
          block: Optional[int] = None, n: Optional[int] = None, m: Optional[int] = None) -> torch.Tensor:
    """The bool mask that keeps the weights of 2-D ``w`` [N, K] of largest score
    |w_ij| * x_norm[j] (Wanda), ``x_norm`` [K] being the l2 norm of each input feature over
    calibration inputs (``sparqle.calibrate.InputStats.x_norm``).

    Unstructured: in each row, the K - round(sparsity * K) largest scores. Blocks
    (``block=b``): in each block-row, the ceil(K / b) - round(sparsity * ceil(K / b)) blocks of
    largest summed score. N:M: the n largest scores of each group of m (ties: the lower
    index)."""
    pattern = _check(w, sparsity, block, n, m, two_d=True)
    check_feature_statistic("x_norm", x_norm, w.shape[1], "one norm per input feature")
    return _keep_per_row(w.detach().abs().float() * x_norm.to(w.device, torch.float32), pattern, sparsity,
                         block, n, m)


def sparsegpt(w: torch.Tensor, xtx: torch.Tensor, sparsity: Optional[float] = None, *,
              block: Optional[int] = None, n: Optional[int] = None, m: Optional[int] = None,
              damp: float = PRUNE_DAMP) -> Tuple[torch.Tensor, torch.Tensor]:
    """(w', mask): 2-D ``w`` [N, K] pruned with error compensation (SparseGPT) for the
    inputs whose X^T X is ``xtx`` [K, K], w' (w's dtype, zero outside ``mask``) and the bool
    mask it keeps; see the module doc and sparqle.calibrate for the maths. The sweep
    chooses the mask (blocks: before it); w' is the minimizer of the damped output error
    for it (``calibrate.masked_refit``), not the sweep's weights.

    The kept counts are those of ``wanda``: per row K - round(sparsity * K) (the pruned
    count spread over the chunks of 128 columns by cumulative rounding), per block-row of
    b x b blocks likewise in blocks (scored by their joint OBS cost, over the whole
    block-row), and n of each m for N:M."""
    pattern = _check(w, sparsity, block, n, m, two_d=True)
    rows, k = w.shape
    h, u = damped_inverse_factor(xtx, w, damp)
    mask = torch.ones(rows, k, dtype=torch.bool, device=w.device)
    if pattern == "blocks":
        mask = _best_blocks(w, u, sparsity, block)

    def target(w1, d1, i, j0):
        width = w1.shape[1]
        if pattern == "nm" and i % m == 0:
            g = min(m, width - i)  # the last group of a row may be partial
            if g > n:
                first = j0 + i
                mask[:, first:first + g] = _best_group_mask(w1[:, i:i + g], u[first:first + g, first:first + g], n)
        elif pattern == "unstructured" and i == 0:
            cost = (w1 / d1).pow(2)
            pruned = round(float(sparsity) * (j0 + width)) - round(float(sparsity) * j0)
            lowest = torch.topk(cost, pruned, dim=1, largest=False).indices
            mask[:, j0:j0 + width] = torch.ones_like(cost, dtype=torch.bool).scatter_(1, lowest, False)
        return w1[:, i] * mask[:, j0 + i]

    # A chunk holds whole groups of m (m divides 128); blocks are chosen before the sweep.
    swept = obs_sweep(w, u, target)
    return refit_damped(w, h, mask, start=swept).to(w.dtype), mask


def admm(w: torch.Tensor, xtx: torch.Tensor, sparsity: Optional[float] = None, *,
         block: Optional[int] = None, n: Optional[int] = None, m: Optional[int] = None,
         damp: float = PRUNE_DAMP, steps: int = ADMM_STEPS) -> Tuple[torch.Tensor, torch.Tensor]:
    """(w', mask): 2-D ``w`` [N, K] pruned by ADMM for the inputs whose X^T X is ``xtx``
    [K, K] (see the module doc), w' (w's dtype, zero outside ``mask``) the minimizer of the
    damped output error for the bool mask of the last of ``steps`` steps
    (``calibrate.masked_refit``). The kept counts are those of ``wanda`` and ``sparsegpt``:
    per row K - round(sparsity * K), per block-row of b x b blocks likewise in blocks, n of
    each m for N:M."""
    pattern = _check(w, sparsity, block, n, m, two_d=True)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    h, _ = damped_hessian(xtx, w, damp)
    d = h.diagonal().sqrt()
    h_unit = h / d[:, None] / d[None, :]                   # H~ = D^-1 H_d D^-1
    eigenvalues, q = torch.linalg.eigh(h_unit.double())
    eigenvalues, q = eigenvalues.float(), q.float()
    v = w.detach().float() * d                             # V = W D
    target = v @ h_unit
    z, u = v, torch.zeros_like(v)
    rho = ADMM_RHO                                         # against H~'s unit diagonal
    for _ in range(steps):
        v = ((target + rho * (z - u)) @ q / (eigenvalues + rho)) @ q.T
        mask = _keep_per_row((v + u).pow(2), pattern, sparsity, block, n, m)  # the Euclidean projection
        z = (v + u) * mask
        u += v - z
        rho *= ADMM_GROWTH
    return refit_damped(w, h, mask, start=z / d).to(w.dtype), mask


def _keep_per_row(score: torch.Tensor, pattern: str, sparsity, block, n, m) -> torch.Tensor:
    """The mask of the largest of a score >= 0 [N, K] (Wanda's, or ADMM's squared weights,
    whose block sums are Frobenius norms squared): the n largest of each group of m (ties:
    the lower index), the K - round(sparsity * K) largest of each row, or in each block-row
    of b x b blocks the ceil(K / b) - round(sparsity * ceil(K / b)) of largest summed score."""
    if pattern == "nm":
        return keep_top_n(score, n, m)
    if pattern == "unstructured":
        return _keep_largest_per_row(score, sparsity)
    return _expand_blocks(_keep_largest_per_row(block_sums(score, block), sparsity), block, score.shape)


def _best_group_mask(w_g: torch.Tensor, u_gg: torch.Tensor, n: int) -> torch.Tensor:
    """The bool mask [N, g] that keeps ``n`` of each row of the group's weights ``w_g``
    [N, g] and prunes the set P of least joint OBS cost w_P^T [(U^T U)_PP]^{-1} w_P, U =
    ``u_gg`` [g, g] (see the module doc). Ties go to the choice that keeps the lower
    indices."""
    g = w_g.shape[1]
    # Reversed lexicographic order: the first choice prunes the highest indices, and
    # argmin returns the first of equal costs.
    choices = torch.tensor(list(itertools.combinations(range(g), g - n))[::-1], device=w_g.device)
    hinv = u_gg.T @ u_gg
    inverse = torch.linalg.inv(hinv[choices[:, :, None], choices[:, None, :]])   # [C, p, p]
    pruned = w_g[:, choices]                                                       # [N, C, p]
    cost = torch.einsum("rcp,cpq,rcq->rc", pruned, inverse, pruned)
    best = choices[cost.argmin(1)]                                                 # [N, p]
    return torch.ones_like(w_g, dtype=torch.bool).scatter_(1, best, False)


def _best_blocks(w: torch.Tensor, u: torch.Tensor, sparsity: float, b: int) -> torch.Tensor:
    """The entry mask [N, K] that keeps, in each block-row of ``w``, the b x b blocks of
    largest joint OBS cost (see the module doc), pruning round(sparsity * ceil(K / b)) of
    them; ``u`` is the upper Cholesky factor of H_d^{-1}."""
    rows, k = w.shape
    w = w.detach().float()
    cost = torch.empty(rows, cdiv(k, b), device=w.device)
    for j in range(cdiv(k, b)):
        columns = slice(j * b, min(k, (j + 1) * b))
        factor = u[:, columns]                                   # H_d^{-1}[B, B] = U[:, B]^T U[:, B]
        block = w[:, columns]
        cost[:, j] = (block @ torch.linalg.inv(factor.T @ factor) * block).sum(1)
    per_block_row = torch.nn.functional.pad(cost, (0, 0, 0, cdiv(rows, b) * b - rows))
    per_block_row = per_block_row.view(cdiv(rows, b), b, -1).sum(1)
    return _expand_blocks(_keep_largest_per_row(per_block_row, sparsity), b, w.shape)


def _check(w, sparsity, block, n, m, two_d: bool) -> str:
    """Validate the arguments shared by the criteria; the pattern they name: "nm",
    "unstructured" or "blocks"."""
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise TypeError(f"w must be a floating-point tensor, got "
                        f"{w.dtype if isinstance(w, torch.Tensor) else type(w).__name__}")
    if two_d and w.dim() != 2:
        raise ValueError(f"w must be 2-D [out, in], got shape {tuple(w.shape)}")
    if n is not None or m is not None:
        if sparsity is not None or block is not None:
            raise ValueError("n and m set the sparsity of an N:M mask: pass neither sparsity nor block")
        check_pattern(n, m)
        if w.dim() != 2:
            raise ValueError(f"w must be 2-D for N:M pruning, got shape {tuple(w.shape)}")
        return "nm"
    if sparsity is None:
        raise ValueError("sparsity is required (or n and m for an N:M mask)")
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise TypeError(f"sparsity must be a number in [0, 1), got {type(sparsity).__name__} {sparsity!r}")
    if not 0 <= float(sparsity) < 1:
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("w holds NaN or Inf: its magnitudes cannot be ranked")
    if block is None:
        return "unstructured"
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int, got {block!r}")
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D for block pruning, got shape {tuple(w.shape)}")
    return "blocks"


def kept(numel: int, sparsity: float) -> int:
    """How many of ``numel`` entries (or blocks) :func:`magnitude` keeps at ``sparsity``."""
    return numel - round(float(sparsity) * numel)


def _keep_largest(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    keep = kept(scores.numel(), sparsity)
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[torch.topk(scores.flatten(), keep, sorted=False).indices] = True
    return mask.view(scores.shape)


def _keep_largest_per_row(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """In each row of 2-D ``scores``, the cols - round(sparsity * cols) largest."""
    top = torch.topk(scores, kept(scores.shape[1], sparsity), dim=1, sorted=False).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, top, True)


def _expand_blocks(keep: torch.Tensor, b: int, shape) -> torch.Tensor:
    """The entry mask of shape ``shape`` of the block mask ``keep``."""
    return keep.repeat_interleave(b, 0).repeat_interleave(b, 1)[:shape[0], :shape[1]]
