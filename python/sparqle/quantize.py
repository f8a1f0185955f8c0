"""Weight quantization calibrated on data: GPTQ rounding for int4 and int8, and SmoothQuant's
input-channel scale for int8 W8A8.

The grid is fixed first, from the original weight: int4's group-wise scales and zero
points as Int4Weight.from_float chooses them (``clip`` "mse" or "minmax"), int8's
per-row scale max|w| / 127. Then the columns of W [N, K] are swept as in
sparqle.calibrate, in the order of decreasing H_jj (GPTQ's "act order": the inputs with
the most energy are rounded first, while the most weights are left to take their error),
H = X^T X of the calibration inputs: each column is rounded to its grid and its rounding
error compensated on the columns not yet rounded. The grid being fixed, any order fits
the layout's consecutive groups; choosing each group's grid when the sweep reaches it
instead, from the weights as updated so far, was worse (updates push weights out of
range, the grid widens; measured in tests/test_calibrate.py's problem: 0.091 relative
held-out error against 0.059 at group 128).

SmoothQuant (Xiao et al. 2023; ``smoothquant_scale``): W8A8 rounds each token of x on one
grid, so a few input channels with large values (a transformer's outlier features) leave
the others few levels. y = x W^T = (x diag(1 / s)) (W diag(s))^T for any s > 0; with
s_j = max|x_j|^alpha / max_i |w_ij|^(1 - alpha) the quantization difficulty moves from
the activations' outlier channels to the weight columns, which per-row weight scales
absorb better. alpha = SMOOTHQUANT_ALPHA.
"""
from typing import Callable, Dict

import torch

from .calibrate import (DAMP, SMOOTHQUANT_ALPHA, InputStats, check_feature_statistic, inverse_hessian_factor,
                        obs_sweep)
from .formats._checks import check_float_weight
from .formats.int4 import METHODS, Int4Weight, _quantize, check_group_size
from .formats.int8 import Int8Weight


def gptq_int4(w: torch.Tensor, xtx: torch.Tensor, group_size: int = 128, *, symmetric: bool = False,
              clip: str = "mse", damp: float = DAMP) -> Int4Weight:
    """``w`` [N, K] in int4 by GPTQ for the inputs whose X^T X is ``xtx`` [K, K] (see the
    module doc; the layout and ``symmetric`` as Int4Weight.from_float, the grids as
    from_float's ``method=clip`` chooses them)."""
    check_float_weight(w)
    check_group_size(group_size)
    if clip not in METHODS:
        raise ValueError(f"clip must be one of {METHODS}, got {clip!r}")
    grid = Int4Weight.from_float(w, group_size, symmetric=symmetric, method=clip)
    width = grid.group_width
    scales, zeros = grid.scales.float(), grid.zeros.float()

    def fake_quantize(column: torch.Tensor, j: int) -> torch.Tensor:
        scale, zero = scales[:, j // width], zeros[:, j // width]
        return (_quantize(column, scale, zero) - zero) * scale

    fixed = _gptq(w, xtx, fake_quantize, damp)
    groups = torch.arange(w.shape[1], device=w.device) // width
    q = _quantize(fixed, scales[:, groups], zeros[:, groups])
    return Int4Weight.from_codes(q, grid.scales, grid.zeros, group_size, symmetric)


def gptq_int8(w: torch.Tensor, xtx: torch.Tensor, *, damp: float = DAMP) -> Int8Weight:
    """``w`` [N, K] in int8 (one scale per row, Int8Weight.from_float's) by GPTQ for the
    inputs whose X^T X is ``xtx`` [K, K] (see the module doc)."""
    check_float_weight(w)
    scales = Int8Weight.from_float(w).scales
    s = scales.to(torch.float32)

    def fake_quantize(column: torch.Tensor, j: int) -> torch.Tensor:
        return torch.clamp(torch.round(column / s), -127, 127) * s

    q = torch.clamp(torch.round(_gptq(w, xtx, fake_quantize, damp) / s[:, None]), -127, 127)
    return Int8Weight(q.to(torch.int8), scales, w.dtype)


def smoothquant_scale(w: torch.Tensor, abs_max: torch.Tensor, alpha: float = SMOOTHQUANT_ALPHA) -> torch.Tensor:
    """s [K] float32 for ``w`` [N, K] and ``abs_max`` [K], each input channel's largest |x_j|
    over calibration inputs (InputStats.abs_max): s_j = abs_max_j^alpha / max_i |w_ij|^(1 -
    alpha) (see the module doc), 1 on a channel whose input or weight column is all zero,
    divided by sqrt(max(s) min(s)) so that s straddles 1 (the quantized layer is the same
    for any common factor; a half-precision x / s keeps its range)."""
    check_float_weight(w)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    k = w.shape[1]
    check_feature_statistic("abs_max", abs_max, k, "the largest |x| of each input feature")
    a = abs_max.to(w.device, torch.float32)
    column = w.detach().abs().amax(0).float()
    live = (a > 0) & (column > 0)
    s = torch.where(live, a.pow(alpha) / column.pow(1 - alpha), torch.ones_like(a))
    if bool(live.any()):
        s = torch.where(live, s / (s[live].max() * s[live].min()).sqrt(), s)
    return s


def fold_smoothquant(model: torch.nn.Module, stats: Dict[int, InputStats]) -> Dict[int, torch.Tensor]:
    """SmoothQuant's s folded into ``model`` in place where sparqle.awq.FOLDS allows (a
    norm, or a linear whose outputs are the layer's inputs one to one): for the layers
    that share an input (q, k and v after one norm) s comes from their weights stacked,
    s_j = max|x_j|^alpha / max over their rows of |w_ij|^(1 - alpha). Returns id -> s of
    every rescaled layer (sparqle.awq.apply_folds); the others keep their own s (Int8Linear's
    ``smoothing``)."""
    from .awq import apply_folds
    return apply_folds(model, stats, lambda weights, shared: smoothquant_scale(
        torch.cat([w.detach() for w in weights]), shared.abs_max))


def _gptq(w: torch.Tensor, xtx: torch.Tensor, fake_quantize: Callable[[torch.Tensor, int], torch.Tensor],
          damp: float) -> torch.Tensor:
    """The GPTQ sweep of ``w`` [N, K] in the order of decreasing diag(H), column j rounded
    by ``fake_quantize(column [N], j)`` (its dequantized value); float32 [N, K]."""
    order = torch.argsort(xtx.diagonal().to(w.device), descending=True, stable=True)
    u = inverse_hessian_factor(xtx.to(w.device)[order][:, order], w, damp)
    columns = order.tolist()  # one host copy, not one per column
    fixed = obs_sweep(w[:, order], u, lambda w1, d1, i, j0: fake_quantize(w1[:, i], columns[j0 + i]))
    return torch.empty_like(fixed).index_copy_(1, order, fixed)
