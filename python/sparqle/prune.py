"""Pruning masks: which weights a sparse format keeps."""
import numbers
from typing import Optional

import torch

from .formats.bell import block_norms
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
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise TypeError(f"w must be a floating-point tensor, got "
                        f"{w.dtype if isinstance(w, torch.Tensor) else type(w).__name__}")
    if n is not None or m is not None:
        if sparsity is not None or block is not None:
            raise ValueError("n and m set the sparsity of an N:M mask: pass neither sparsity nor block")
        n, m = check_pattern(n, m)
        if w.dim() != 2:
            raise ValueError(f"w must be 2-D for N:M pruning, got shape {tuple(w.shape)}")
        return keep_top_n(w, n, m)
    if sparsity is None:
        raise ValueError("sparsity is required (or n and m for an N:M mask)")
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise TypeError(f"sparsity must be a number in [0, 1), got {type(sparsity).__name__} {sparsity!r}")
    if not 0 <= float(sparsity) < 1:
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("w holds NaN or Inf: its magnitudes cannot be ranked")
    if block is None:
        return _keep_largest(w.detach().abs(), sparsity)
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int, got {block!r}")
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D for block pruning, got shape {tuple(w.shape)}")
    keep = _keep_largest(block_norms(w, block), sparsity)
    return keep.repeat_interleave(block, 0).repeat_interleave(block, 1)[:w.shape[0], :w.shape[1]]


def kept(numel: int, sparsity: float) -> int:
    """How many of ``numel`` entries (or blocks) :func:`magnitude` keeps at ``sparsity``."""
    return numel - round(float(sparsity) * numel)


def _keep_largest(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    keep = kept(scores.numel(), sparsity)
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[torch.topk(scores.flatten(), keep, sorted=False).indices] = True
    return mask.view(scores.shape)
