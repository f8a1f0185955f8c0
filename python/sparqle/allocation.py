"""Per-layer sparsity for unstructured (CSR) and Blocked-ELL pruning, from measured sensitivity.

``convert(model, "bell", sparsity=0.5)`` prunes every layer by half. Layers differ in how
much the model's output depends on them: on all-MiniLM-L6-v2 one layer pruned alone to
50% moves the sentence embeddings 35 times more than another (docs/calibration.md).
``layer_sparsities`` spends the same budget where it hurts least:

1. For each target layer l, each candidate sparsity c and each calibration fold i, the
   layer alone is pruned to c by the criterion (sparqle.prune, through
   ``SparseLinear.from_linear``) with the statistics of the *other* folds, and the model is
   run on fold i: the loss L_l(c) is the relative squared change of the outputs,
   sum_i |y_i' - y_i|^2 / sum_i |y_i|^2 (every floating-point tensor or array that the fold's
   run returns). Measuring a fold that the pruning did not fit is what makes the loss a
   held-out one: a criterion that refits the kept weights (sparsegpt, admm) reproduces the
   inputs it was fitted on almost exactly where K exceeds their row count, so an in-sample
   loss calls such a layer harmless and the allocation prunes it hardest
   (docs/calibration.md measures both).
2. The sparsities minimize sum_l L_l(c_l) subject to pruning at least the weights that
   ``sparsity`` in every layer prunes: sum_l P_l share_l(c_l) >= sum_l P_l share_l(sparsity),
   P_l the layer's weight count and share_l(c) the fraction of its weights that c prunes
   (round(c K) / K of each row for CSR, round(c B) / B of each block-row's B blocks for
   Blocked-ELL; with magnitude, which counts over the whole layer, of all its weights or
   blocks). The Lagrangian min_c L_l(c) - t P_l share_l(c), each layer on its own, is
   solved for the smallest t that meets the budget (bisection; the pruned count grows with
   t); then, while the budget allows, the layer whose step down to its next lower
   candidate saves the most loss takes it.

The losses are taken one layer at a time and summed, which treats the layers' effects as
additive: a first-order model, fair when each layer's change is small.
"""
import math
import numbers
import warnings
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from . import calibrate
from .calibrate import SPARSE_METHODS, InputStats
from .formats.bell import check_block_size
from .nn import SparseLinear

# The default candidates: the layer keeps the asked density (1 - sparsity) times one of
# these, 1/3 to 5/3 in steps of 1/6 (a density above 1 dropped). At sparsity 0.5 that is
# 1/6 to 5/6 in steps of 1/12, whole 32-wide blocks of a 384-wide layer: the 9 candidates
# measured in docs/calibration.md; at 0.9, 0.833 to 0.967.
DENSITY_FACTORS = tuple(k / 6 for k in range(2, 11))
# The relative squared change between two calls of a fold beyond which it is not deterministic.
REPEAT_TOLERANCE = 1e-10


def layer_sparsities(model: nn.Module, folds: Sequence[Callable[[nn.Module], object]], sparsity: float, *,
                     format: str = "csr", block_size: Optional[int] = None, method: Optional[str] = None,
                     filter: Optional[Callable[[str, nn.Module], bool]] = None,
                     candidates: Optional[Sequence[float]] = None) -> Dict[str, float]:
    """{name: sparsity} for the layers ``convert(model, format, filter=filter)`` would
    replace: together they prune at least the weights that ``sparsity`` in every layer
    prunes, each layer as much as its measured sensitivity allows (the module doc).

    ``folds``: two or more callables, each ``run(model)`` on its own share of the
    calibration data and returning the model's outputs (a tensor, a NumPy array, or a list,
    tuple or dict of them), e.g. ``[lambda m: m.encode(sentences[0::2]), lambda m:
    m.encode(sentences[1::2])]``; they must give the same outputs on every call. Each
    fold's outputs are kept, in float64 on the CPU, while the layers are measured: return
    what the model is judged by (embeddings, a few positions' logits), not every hidden state.
    ``format``: ``"csr"`` or ``"bell"`` (``block_size``, default 32); ``method``: the
    criterion of sparqle.prune (default ``"sparsegpt"``); ``candidates``: the sparsities a
    layer may take, each in [0, 1) (default: those that keep 1/3, 1/2, ..., 5/3 times the
    asked density 1 - ``sparsity``, at most all weights; at 0.5, 1/6 to 5/6 in steps of
    1/12). The result feeds ``convert`` as a mapping::

        plan = sparqle.allocation.layer_sparsities(model, folds, 0.5, format="bell")
        sparqle.convert(model, {name: ("bell", {"sparsity": s}) for name, s in plan.items()},
                        calibrate=lambda m: [fold(m) for fold in folds], method="sparsegpt")

    A layer that some fold does not call keeps ``sparsity`` (warned). Costs one run of a
    fold per layer, candidate and fold, and as many prunings. The model is left as it was."""
    _check_arguments(folds, sparsity, format, block_size, method)
    method = "sparsegpt" if method is None else method
    block_size = (32 if block_size is None else block_size) if format == "bell" else None
    candidates = _candidates(sparsity, candidates)
    targets = calibrate.linear_targets(model, filter)
    if not targets:
        raise ValueError("layer_sparsities: the model has no nn.Linear that filter accepts")
    stats = [calibrate.collect(model, fold, targets) for fold in folds]
    references = [_outputs(fold, model, f"folds[{i}]") for i, fold in enumerate(folds)]
    if _change(_outputs(folds[0], model, "folds[0]"), references[0], "folds[0]") > REPEAT_TOLERANCE:
        raise ValueError("folds[0] gave different outputs on two calls with the same model: the folds "
                         "must be deterministic (the model in eval mode, no dropout, the same batches)")
    measured = [key for key in targets if all(key in s for s in stats)]
    unmeasured = [targets[key][0] for key in targets if key not in measured]
    if unmeasured:
        warnings.warn(f"layer_sparsities: {', '.join(unmeasured)} not called by every fold; "
                      f"kept at sparsity {sparsity}", stacklevel=2)
    losses: Dict[int, List[float]] = {}
    for key in measured:
        name, linear = targets[key]
        held_in = [None if method == "magnitude" else _held_in(stats, key, i) for i in range(len(folds))]
        losses[key] = [_loss(model, linear, folds, references, held_in, c, format, block_size, method)
                       for c in candidates]
    plan = _allocate(losses, {key: targets[key][1] for key in measured}, candidates, sparsity, format, block_size,
                     method)
    return {name: plan.get(key, float(sparsity)) for key, (name, _) in targets.items()}


def _check_arguments(folds, sparsity, format, block_size, method) -> None:
    if isinstance(folds, (str, bytes)) or not isinstance(folds, Sequence) or len(folds) < 2:
        raise ValueError(f"folds must be a list of two or more callables run(model), got {folds!r}")
    for i, fold in enumerate(folds):
        if not callable(fold):
            raise TypeError(f"folds[{i}] must be a callable run(model), got {type(fold).__name__}")
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) or not 0 < sparsity < 1:
        raise ValueError(f"sparsity must be a number in (0, 1), got {sparsity!r}")
    if format not in ("csr", "bell"):
        raise ValueError(f"format must be 'csr' or 'bell' (an N:M pattern and the quantized formats "
                         f"have one density), got {format!r}")
    if block_size is not None:
        if format != "bell":
            raise ValueError("block_size applies to format='bell' only")
        check_block_size(block_size)
    if method is not None and method not in SPARSE_METHODS:
        raise ValueError(f"method must be one of {SPARSE_METHODS}, got {method!r}")


def _candidates(sparsity: float, candidates: Optional[Sequence[float]]) -> List[float]:
    """The sorted candidate sparsities (the default grid, or ``candidates`` checked)."""
    if candidates is None:
        grid = (1 - (1 - sparsity) * factor for factor in DENSITY_FACTORS)
        return sorted({round(c, 12) for c in grid if c >= 0} | {float(sparsity)})
    values = list(candidates)
    if not values or any(isinstance(c, bool) or not isinstance(c, numbers.Real) or not 0 <= c < 1 for c in values):
        raise ValueError(f"candidates must be a non-empty list of numbers in [0, 1), got {candidates!r}")
    return sorted({float(c) for c in values})


def _outputs(fold: Callable[[nn.Module], object], model: nn.Module, name: str) -> List[torch.Tensor]:
    """The floating-point tensors (float64, on the CPU) of what ``fold(model)`` returns."""
    with torch.no_grad():
        result = fold(model)
    found: List[torch.Tensor] = []

    def walk(value):
        if isinstance(value, torch.Tensor):
            if value.is_floating_point():
                found.append(value.detach().to("cpu", torch.float64))
        elif isinstance(value, np.ndarray):
            if np.issubdtype(value.dtype, np.floating):
                found.append(torch.from_numpy(np.asarray(value, dtype=np.float64)))
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    walk(result)
    if not found:
        raise TypeError(f"{name} must return the model's outputs (a floating-point tensor or array, or "
                        f"a list, tuple or dict of them), got {type(result).__name__}")
    return found


def _change_and_energy(got: List[torch.Tensor], want: List[torch.Tensor], name: str):
    """(sum |got - want|^2, sum |want|^2) over the outputs; ValueError naming ``name`` if
    they do not pair up."""
    if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want)):
        raise ValueError(f"{name} returned outputs of other shapes than on its first call: "
                         f"{[tuple(g.shape) for g in got]} against {[tuple(w.shape) for w in want]}")
    return (sum(float((g - w).pow(2).sum()) for g, w in zip(got, want)),
            sum(float(w.pow(2).sum()) for w in want))


def _change(got: List[torch.Tensor], want: List[torch.Tensor], name: str) -> float:
    """The relative squared change |got - want|^2 / |want|^2 (0 when want is all zero)."""
    change, energy = _change_and_energy(got, want, name)
    return change / energy if energy > 0 else change


def _held_in(stats: List[Dict[int, InputStats]], key: int, fold: int) -> InputStats:
    """The statistics of layer ``key`` over every fold but ``fold``."""
    parts = [s[key] for i, s in enumerate(stats) if i != fold]
    return InputStats(sum(p.xtx for p in parts), sum(p.count for p in parts),
                      sum(p.abs_sum for p in parts), torch.stack([p.abs_max for p in parts]).amax(0))


def _loss(model, linear, folds, references, held_in, candidate, format, block_size, method) -> float:
    """L_l(c) of the module doc: ``linear`` alone pruned to ``candidate`` for each fold i
    with ``held_in[i]``, the other folds' statistics (None for magnitude), the fold's
    outputs against its reference. The pruned
    weight is a Parameter of its own in place of the layer's (put back after), so a weight
    tied to another module (an lm_head's, to the embedding) stays as it is there."""
    original = linear.weight
    change = energy = 0.0
    try:
        for i, fold in enumerate(folds):
            pruned = SparseLinear.from_linear(linear, candidate, format=format, block_size=block_size,
                                              method=method, stats=held_in[i])
            linear.weight = nn.Parameter(calibrate._dense(pruned).to(original.dtype), requires_grad=False)
            fold_change, fold_energy = _change_and_energy(_outputs(fold, model, f"folds[{i}]"), references[i],
                                                          f"folds[{i}]")
            change += fold_change
            energy += fold_energy
    finally:
        linear.weight = original
    if not math.isfinite(change):
        raise ValueError(f"layer_sparsities: the model's outputs are not finite with {linear} pruned "
                         f"to {candidate}")
    return change / energy if energy > 0 else 0.0


def _share(linear: nn.Linear, sparsity: float, format: str, block_size: Optional[int], method: str) -> float:
    """The fraction of ``linear``'s weights (of its blocks, for Blocked-ELL) that ``sparsity``
    prunes: the counts of sparqle.prune, per row (per block-row) for the criteria that use
    data, over the whole layer for magnitude."""
    columns = linear.in_features if format == "csr" else -(-linear.in_features // block_size)
    if method == "magnitude":
        columns *= linear.out_features if format == "csr" else -(-linear.out_features // block_size)
    return round(sparsity * columns) / columns


def _allocate(losses: Dict[int, List[float]], linears: Dict[int, nn.Linear], candidates: List[float],
              sparsity: float, format: str, block_size: Optional[int], method: str) -> Dict[int, float]:
    """The candidate of each layer (module doc, step 2)."""
    pruned = {key: [linear.weight.numel() * _share(linear, c, format, block_size, method) for c in candidates]
              for key, linear in linears.items()}
    budget = sum(linear.weight.numel() * _share(linear, sparsity, format, block_size, method)
                 for linear in linears.values())

    def choose(t: float) -> Dict[int, int]:
        return {key: min(range(len(candidates)), key=lambda j: (losses[key][j] - t * pruned[key][j], -j))
                for key in losses}

    def total(choice: Dict[int, int]) -> float:
        return sum(pruned[key][j] for key, j in choice.items())

    slack = 1e-9 * budget
    if sum(max(p) for p in pruned.values()) < budget - slack:
        raise ValueError(f"candidates {candidates} cannot prune as many weights as sparsity {sparsity} "
                         f"in every layer: include {sparsity} or a larger one")
    high = 1.0
    while total(choose(high)) < budget - slack:
        high *= 2
    low = 0.0
    for _ in range(100):
        middle = (low + high) / 2
        if total(choose(middle)) >= budget - slack:
            high = middle
        else:
            low = middle
    choice = choose(high)
    while True:  # spend what the bisection's last step overshot
        best = None
        for key, j in choice.items():
            if j > 0 and total(choice) - pruned[key][j] + pruned[key][j - 1] >= budget - slack:
                saving = losses[key][j] - losses[key][j - 1]
                if best is None or saving > best[0]:
                    best = (saving, key)
        if best is None or best[0] <= 0:
            break
        choice[best[1]] -= 1
    return {key: candidates[j] for key, j in choice.items()}
