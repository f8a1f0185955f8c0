"""Pruning masks: which weights a sparse format keeps."""
import torch


def magnitude(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The bool mask that keeps the ``numel - round(sparsity * numel)`` entries of ``w``
    with the largest |w| (unstructured); ``sparsity`` in [0, 1) is the fraction zeroed.
    The count is exact, so equal shapes and sparsities give equal nonzero counts."""
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise TypeError(f"w must be a floating-point tensor, got "
                        f"{w.dtype if isinstance(w, torch.Tensor) else type(w).__name__}")
    if not 0 <= float(sparsity) < 1:
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("w holds NaN or Inf: its magnitudes cannot be ranked")
    keep = w.numel() - round(float(sparsity) * w.numel())
    mask = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
    mask[torch.topk(w.detach().abs().flatten(), keep, sorted=False).indices] = True
    return mask.view(w.shape)
