"""Calibration: the input statistics of a model's linear layers, and the layer-wise
reconstruction that pruning (SparseGPT) and quantization (GPTQ) share.

Statistics. For a linear layer y = x W^T + b with W [N, K], ``collect`` runs the user's
``run(model)`` once with a hook on each target layer that adds, for every call, the rows of
its input X [rows, K] (all leading dimensions flattened) into ``xtx += X^T X`` (float32
[K, K], on the layer's device) and ``count += rows``; no activation is kept, so the memory
is K^2 floats per layer whatever the model's activations. The hooks are removed when
``run`` returns or raises. ``x_norm = sqrt(diag(xtx))`` is each input feature's l2 norm
over the calibration tokens (Wanda's statistic); ``abs_sum += |X|`` summed over the rows
([K], AWQ's statistic: ``abs_mean = abs_sum / count`` is E|x_j|); ``abs_max`` the largest
|x_j| of each feature ([K], SmoothQuant's statistic).

Reconstruction. Replacing W by W' changes the layer's output on the calibration inputs by
|X (W - W')^T|_F^2 = sum_rows (w - w') H (w - w')^T with H = X^T X (+ damping). With
U the upper Cholesky factor of H^{-1} (H^{-1} = U^T U), sweeping the columns j = 0..K-1 in
order, setting w_j to its target q_j (0 if pruned, the rounded value if quantized) and
adding to the later columns of the row the compensation

    e = (w_j - q_j) / U[j, j],      w[j+1:] -= e * U[j, j+1:]

is the optimal brain surgeon update restricted to the columns not yet fixed (SparseGPT,
GPTQ); the columns are processed in chunks so that all but a [rows, chunk] slice is
updated in one matrix product per chunk, and all rows are updated together. The cost
of fixing w_j is (w_j - q_j)^2 / U[j, j]^2, which pruning uses as its score. Once the
sweep has chosen a pruning mask, ``masked_refit`` solves each row's least squares over its
kept weights (conjugate gradients from the sweep's weights to float32's precision, a
direct solve for any row they leave short).

Sequential. ``convert(..., sequential=True)`` builds the layers in the order ``run`` calls
them, one stage at a time (the layers that take one input tensor), each for the inputs X~
that the layers converted before it give, while X are the float model's inputs for the
same rows: the objective |X~ W'^T - X W^T|^2 equals (W' - W*) H~ (W' - W*)^T plus a
constant, for H~ = X~^T X~ and the target W* that solves H~ W*^T = C W^T, C = X~^T X; so
the layer is converted as above with H~ and W* (``target_weight``, which pulls W* toward W
by TARGET_DAMP). Each layer thereby corrects the error the layers before it left, where a
single run fits each to the float model's inputs only. Pairing rows needs both runs'
inputs of a stage: the float run's are kept until the converted run has consumed them.
"""
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numbers
import time
import warnings

import torch
from torch import nn

# H + damp * diag(H): shrinking the off-diagonal part regularizes a Hessian estimated
# from few tokens. At 0 the reconstruction fits the calibration inputs alone; as it grows,
# H tends to its diagonal, for which pruning scores are Wanda's (squared) and no weight is
# compensated. Chosen on all-MiniLM-L6-v2 calibrated on 32 sentences, by the worst and the
# mean cosine of 40 validation sentences (bench_accuracy.VALIDATION, docs/calibration.md),
# among 0.03 (pruning), 0.1, 0.3, 0.5 and 1: DAMP for GPTQ (int4 g128), PRUNE_DAMP for
# SparseGPT (2:4 and CSR 50% agree).
DAMP = 0.3
PRUNE_DAMP = 0.5
# Sequential calibration's pull of each layer's target toward its own weight (mu below):
# chosen like DAMP, for int4 g128 GPTQ, among 0.3, 1, 2, 3, 5 and 10 (docs/calibration.md).
TARGET_DAMP = 3.0
# SmoothQuant's migration strength alpha (sparqle.quantize.smoothquant_scale): chosen like
# DAMP, for int8 W8A8, among 0.2, 0.35, 0.4, 0.5, 0.6, 0.65 and 0.8 (docs/calibration.md).
SMOOTHQUANT_ALPHA = 0.5
# masked_refit's conjugate gradients: the relative residual at which a row is solved (float32
# reaches about 1e-6), and the steps after which the rows above it are solved directly
# (all-MiniLM-L6-v2's layers converge in 20 to 60 steps from the sweep's weights).
REFIT_TOLERANCE = 1e-6
REFIT_STEPS = 256
# ADMM pruning (sparqle.prune.admm): its steps, and the penalty rho, which starts at
# ADMM_RHO (against a Hessian scaled to a unit diagonal) and grows by ADMM_GROWTH a step.
# Chosen like DAMP, for 2:4 and 4:8 (which agree), among rho 0.03, 0.1 and 0.3 with growth
# 1.3 over 30 steps, 1.2 over 50 and 1.15 over 80 (docs/calibration.md).
ADMM_STEPS = 50
ADMM_RHO = 0.1
ADMM_GROWTH = 1.2

# Each format's criteria: the first is the default without statistics, the second with them.
SPARSE_METHODS = ("magnitude", "sparsegpt", "wanda", "admm")
INT4_METHODS = ("minmax", "gptq", "mse", "hqq", "awq")
INT8_METHODS = ("absmax", "gptq", "smoothquant")
NEEDS_STATS = ("sparsegpt", "wanda", "admm", "gptq", "awq", "smoothquant")


@dataclass
class InputStats:
    """What ``collect`` records for one linear layer: ``xtx`` = X^T X (float32 [K, K]) over
    the ``count`` input rows it saw, ``abs_sum`` = the sum of |X| over them and ``abs_max``
    = the largest |X| of each input feature (float32 [K] each; None when the statistics
    were made without it: AWQ needs abs_sum, SmoothQuant abs_max)."""
    xtx: torch.Tensor
    count: int
    abs_sum: Optional[torch.Tensor] = None
    abs_max: Optional[torch.Tensor] = None

    @property
    def x_norm(self) -> torch.Tensor:
        """The l2 norm of each input feature over the calibration rows, [K]."""
        return self.xtx.diagonal().clamp(min=0).sqrt()

    @property
    def abs_mean(self) -> torch.Tensor:
        """E|x_j|, the mean magnitude of each input feature over the calibration rows, [K]."""
        if self.abs_sum is None:
            raise ValueError("these InputStats hold no abs_sum (sum of |x| per input feature): "
                             "AWQ needs it; sparqle.calibrate.collect records it")
        return self.abs_sum / max(self.count, 1)

    def scaled(self, s: torch.Tensor) -> "InputStats":
        """The statistics of the inputs X diag(1 / s) (what a layer whose weight columns were
        multiplied by ``s`` [K] sees once 1 / s is folded into what feeds it)."""
        inv = 1 / s.to(self.xtx.device, torch.float32)
        return InputStats(self.xtx * inv[:, None] * inv[None, :], self.count,
                          None if self.abs_sum is None else self.abs_sum * inv,
                          None if self.abs_max is None else self.abs_max * inv)


def check_method(method: Optional[str], stats: Optional["InputStats"], methods: Tuple[str, ...],
                 linear: nn.Linear) -> str:
    """``method`` checked against ``methods`` (None: methods[0] without ``stats``, methods[1]
    with them), and ``stats`` against ``linear`` when the method needs them."""
    if method is None:
        method = methods[0] if stats is None else methods[1]
    if method not in methods:
        raise ValueError(f"method must be one of {methods}, got {method!r}")
    if method in NEEDS_STATS:
        if stats is None:
            raise ValueError(f"method={method!r} needs the layer's calibration statistics: "
                             f"sparqle.convert(model, fmt, calibrate=run, method={method!r})")
        if not isinstance(stats, InputStats):
            raise TypeError(f"stats must be a sparqle.calibrate.InputStats, got {type(stats).__name__}")
        k = linear.in_features
        if tuple(stats.xtx.shape) != (k, k):
            raise ValueError(f"stats.xtx must have shape {(k, k)} (in_features squared), got "
                             f"{tuple(stats.xtx.shape)}")
    return method


def check_feature_statistic(name: str, t, k: int, meaning: str) -> None:
    """A per-input-feature statistic (Wanda's norms, SmoothQuant's maxima): a floating-point
    [k] tensor, finite and >= 0; ValueError naming ``name`` (``meaning`` says what it holds)."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or tuple(t.shape) != (k,):
        raise ValueError(f"{name} must be a floating-point [{k}] tensor ({meaning}), got "
                         f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        raise ValueError(f"{name} must be finite and >= 0")


def linear_targets(model: nn.Module, filter: Optional[Callable[[str, nn.Module], bool]]) -> Dict[int, Tuple[str, nn.Linear]]:
    """The layers ``convert`` replaces: modules of type exactly nn.Linear that ``filter``
    accepts (at their first name), by id."""
    found: Dict[int, Tuple[str, nn.Linear]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if type(module) is nn.Linear and id(module) not in found and (filter is None or filter(name, module)):
            found[id(module)] = (name, module)
    return found


def run_with_hooks(model: nn.Module, run: Callable[[nn.Module], object],
                   hooks: List[Tuple[nn.Module, Callable]]) -> None:
    """``run(model)`` under torch.no_grad() with each (module, hook) of ``hooks`` as a
    forward pre-hook (called with args and kwargs), removed when it returns or raises."""
    handles = [module.register_forward_pre_hook(hook, with_kwargs=True) for module, hook in hooks]
    try:
        with torch.no_grad():
            run(model)
    finally:
        for handle in handles:
            handle.remove()


def collect(model: nn.Module, run: Callable[[nn.Module], object],
            layers: Dict[int, Tuple[str, nn.Linear]]) -> Dict[int, InputStats]:
    """Run ``run(model)`` under torch.no_grad() and return the input statistics of each of
    ``layers`` (id -> (name, module)) that it called, by id (see the module doc)."""
    if not callable(run):
        raise TypeError(f"calibrate must be a callable run(model), got {type(run).__name__}")
    stats: Dict[int, InputStats] = {}

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.shape[-1] != module.in_features:
            raise ValueError(f"calibrate: {layers[id(module)][0]} got an input of "
                             f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}; "
                             f"a linear layer's input is floating point with in_features = "
                             f"{module.in_features} last")
        x = x.detach().reshape(-1, x.shape[-1]).float()
        entry = stats.get(id(module))
        if entry is None:
            entry = stats[id(module)] = InputStats(x.new_zeros(x.shape[1], x.shape[1]), 0,
                                                   x.new_zeros(x.shape[1]), x.new_zeros(x.shape[1]))
        _accumulate(entry, x)

    run_with_hooks(model, run, [(module, hook) for _, module in layers.values()])
    return stats


def _accumulate(stats: InputStats, x: torch.Tensor) -> None:
    """Add the rows of float32 ``x`` [rows, K] to ``stats`` (all of its fields present)."""
    stats.xtx.addmm_(x.T, x)
    magnitude = x.abs()
    stats.abs_sum += magnitude.sum(0)
    if x.shape[0]:
        torch.maximum(stats.abs_max, magnitude.amax(0), out=stats.abs_max)
    stats.count += x.shape[0]


class Calibration:
    """What ``convert(model, fmt, calibrate=run, **options)`` converts with: the statistics
    of one ``run(model)``, made at construction, before any layer is replaced, for every
    layer of ``linear_targets(model, filter)``. ``fold`` (the method of a one-format
    conversion) then rescales the model where sparqle.awq.FOLDS allows: "awq"
    (sparqle.awq.fold_scales, with ``fold_options``: group_size and symmetric) or
    "smoothquant" (sparqle.quantize.fold_smoothquant). With ``sequential``, nothing is
    recorded at construction: ``convert_sequentially`` builds the layers stage by stage."""

    def __init__(self, model: nn.Module, filter: Optional[Callable[[str, nn.Module], bool]],
                 run: Callable[[nn.Module], object], fold: Optional[str] = None,
                 fold_options: Optional[Dict[str, object]] = None, sequential: bool = False):
        if not isinstance(sequential, bool):
            raise TypeError(f"sequential must be a bool, got {type(sequential).__name__}")
        if sequential and fold is not None:
            raise ValueError(f"sequential=True does not apply to method={fold!r} (its scales are "
                             f"chosen on the float model's inputs)")
        if not callable(run):
            raise TypeError(f"calibrate must be a callable run(model), got {type(run).__name__}")
        self.run = run
        self.sequential = sequential
        self.stats = {} if sequential else collect(model, run, linear_targets(model, filter))
        # Modules convert_sequentially built, by id of the nn.Linear they replace; while it
        # builds one, the float weight and paired inputs of its target, by id of the target.
        self.built: Dict[int, nn.Module] = {}
        self.references: Dict[int, Tuple[torch.Tensor, "PairedStats"]] = {}
        # The fold rescales the model in place now; the rescaled layers' stats are those of
        # their rescaled inputs, by id -> s.
        self.input_scales: Dict[int, torch.Tensor] = {}
        self.fold = fold
        if fold == "awq":
            from .awq import fold_scales
            self.input_scales = fold_scales(model, self.stats, **(fold_options or {}))
        elif fold == "smoothquant":
            from .quantize import fold_smoothquant
            self.input_scales = fold_smoothquant(model, self.stats)
        elif fold is not None:
            raise ValueError(f"fold must be 'awq', 'smoothquant' or None, got {fold!r}")

    def convert(self, build: Callable[..., nn.Module], methods: Tuple[str, ...], name: str,
                linear: nn.Linear, options: Dict[str, object]) -> nn.Module:
        """``build(linear, **options, method=, stats=)`` with the layer's statistics and
        ``options["method"]`` (default ``methods[1]``, see check_method). The new module
        keeps, as ``.calibration``, the method, the squared output errors on the
        calibration inputs of the one-shot criterion (``methods[0]``) and of the method,
        the squared output, and the seconds the method took (see ``report``). A layer that
        ``run`` never called is built with the one-shot criterion, with a warning. Method
        "awq": a layer that fold_scales rescaled is built by GPTQ on its rescaled weight and
        inputs (its one-shot error is that of min-max on the weight before rescaling; the
        output error is the same in both coordinates); one it could not is built by GPTQ.
        Method "smoothquant": a layer whose s was folded (``fold``) is built by absmax on its
        rescaled weight (its input arrives divided by s), one not folded keeps s itself
        (Int8Linear's ``smoothing``); the report is in the coordinates before rescaling.
        A target of ``convert_sequentially``: the errors are those of the paired inputs,
        |X~ W'^T - X W^T|^2 (``paired_error``), the one-shot one of the float weight on the
        float inputs."""
        options = dict(options)
        method = options.pop("method", None)
        stats = self.stats.get(id(linear))
        if stats is None:
            warnings.warn(f"convert: {name} was not called while calibrate ran: it is converted "
                          f"with method={methods[0]!r}", UserWarning, stacklevel=2)
            return build(linear, **options, method=methods[0])
        chosen = check_method(method, stats, methods, linear)
        scale = self.input_scales.get(id(linear))
        if chosen == "awq":
            if self.fold != "awq":
                raise ValueError("method='awq' rescales the whole model for one int4 conversion: "
                                 "convert(model, 'int4', calibrate=run, method='awq'), not in a mapping")
            chosen = "awq" if scale is not None else "gptq"
        built_by = {"awq": "gptq", "smoothquant": "smoothquant" if scale is None else "absmax"}.get(chosen, chosen)
        start = time.perf_counter()
        converted = build(linear, **options, method=built_by, stats=stats)
        seconds = time.perf_counter() - start
        reference = self.references.get(id(linear))
        if reference is not None:
            weight, paired = reference
            error, signal = paired_error(weight, _dense(converted), paired)
            one_shot = build(_with_weight(linear, weight), **options, method=methods[0])
            one_shot_error, _ = output_error(weight, _dense(one_shot), paired.float_xtx)
        else:
            error, signal = output_error(linear.weight, _dense(converted), stats.xtx)
            # A rescaled layer's one-shot error, in the coordinates before rescaling:
            # W diag(1 / s) on inputs whose H is diag(s) H' diag(s).
            original, xtx = ((linear, stats.xtx) if scale is None else
                             (_with_weight(linear, linear.weight.detach() / scale.to(linear.weight.dtype)),
                              stats.scaled(1 / scale).xtx))
            one_shot = build(original, **options, method=methods[0])
            one_shot_error, _ = output_error(original.weight, _dense(one_shot), xtx)
        converted.calibration = {"method": chosen, "one_shot_error": one_shot_error, "error": error,
                                 "signal": signal, "seconds": seconds}
        return converted

    def convert_sequentially(self, model: nn.Module, targets: Dict[int, Tuple[List[str], nn.Linear]],
                             make: Callable[[nn.Linear, nn.Linear], nn.Module]) -> None:
        """Build every layer of ``targets`` (id -> (its names, the nn.Linear)) in the order
        ``run`` calls them, each for the inputs that the layers built before it give (see
        the module doc, "Sequential"), with ``make(linear, target)``: ``target`` is a copy
        of ``linear`` whose weight is the layer's target weight W*; keep the built modules
        in ``self.built`` by id and leave ``model`` with its float layers. ``run`` is called
        once to find the order, then twice per stage (the layers that take one input
        tensor, such as a block's q, k and v projections): on the float model and on the
        model with the stages before it built; the float run's inputs of the stage are kept
        (on their device, in their dtype) until the second run pairs them with its own."""
        floats = {key: linear for key, (_, linear) in targets.items()}
        try:
            for stage in _stages(model, self.run, targets):
                first = targets[stage[0]][1]
                float_inputs = _record_inputs(model, self.run, first)
                _install(model, targets, {**floats, **self.built})
                paired = _pair_inputs(model, self.run, first, targets[stage[0]][0][0], float_inputs)
                del float_inputs
                for key in stage:
                    linear = floats[key]
                    target = _with_weight(linear, target_weight(linear.weight, paired))
                    self.stats[id(target)] = paired.stats
                    self.references[id(target)] = (linear.weight, paired)
                    try:
                        self.built[key] = make(linear, target)
                    finally:
                        del self.stats[id(target)], self.references[id(target)]
                _install(model, targets, floats)
        finally:
            _install(model, targets, floats)


@dataclass
class PairedStats:
    """A stage's inputs in sequential calibration, rows paired call by call: X from the float
    model, X~ from the model with the layers before it converted. ``stats``: X~^T X~ (what
    the layer's conversion sees) and its abs_sum and count; ``cross`` = X~^T X and
    ``float_xtx`` = X^T X, float32 [K, K]."""
    stats: InputStats
    cross: torch.Tensor
    float_xtx: torch.Tensor


def target_weight(w: torch.Tensor, paired: PairedStats, damp: Optional[float] = None) -> torch.Tensor:
    """W* [N, K] (float32): the weight that makes the layer on its converted inputs X~ give
    what the float layer gives on its float inputs X, pulled toward W:
    argmin |X~ W*^T - X W^T|^2 + mu sum_j H~_jj |W*_j - W_j|^2 (mu = ``damp``, default
    TARGET_DAMP), i.e. (H~ + mu diag(H~)) W*^T = (C + mu diag(H~)) W^T with H~ = X~^T X~
    and C = X~^T X. A dead input (H~_jj = 0) keeps its column of W."""
    mu = TARGET_DAMP if damp is None else damp
    _, factor = damped_hessian(paired.stats.xtx, w, mu)
    w32 = w.detach().to(torch.float32)
    rhs = paired.cross.to(w32.device) @ w32.T + mu * paired.stats.xtx.diagonal().to(w32.device)[:, None] * w32.T
    solution = torch.cholesky_solve(rhs, factor).T
    dead = paired.stats.xtx.diagonal().to(w32.device) <= 0
    return torch.where(dead[None, :], w32, solution)


def paired_error(reference: torch.Tensor, approximation: torch.Tensor, paired: PairedStats) -> Tuple[float, float]:
    """(|X~ W'^T - X W^T|_F^2, |X W^T|_F^2) for W = ``reference``, W' = ``approximation``:
    trace(W' H~ W'^T) - 2 trace(W' C W^T) + trace(W H W^T) (float64 sums)."""
    w = reference.detach().to(torch.float32)
    a = approximation.detach().to(device=w.device, dtype=torch.float32)

    def inner(left, h, right):
        return float(((left @ h.to(w.device)) * right).sum(dtype=torch.float64))

    signal = inner(w, paired.float_xtx, w)
    error = inner(a, paired.stats.xtx, a) - 2 * inner(a, paired.cross, w) + signal
    return max(error, 0.0), signal


def _with_weight(linear: nn.Linear, weight: torch.Tensor) -> nn.Linear:
    """A new nn.Linear like ``linear`` (its bias shared) with ``weight`` in its dtype."""
    target = nn.Linear(linear.in_features, linear.out_features, bias=False,
                       device=linear.weight.device, dtype=linear.weight.dtype)
    target.weight.data = weight.to(linear.weight.dtype)
    target.bias = linear.bias
    return target


def _install(model: nn.Module, targets: Dict[int, Tuple[List[str], nn.Linear]],
             modules: Dict[int, nn.Module]) -> None:
    """Put ``modules[key]`` at every name of ``targets[key]``."""
    for key, (names, _) in targets.items():
        if key in modules:
            for name in names:
                model.set_submodule(name, modules[key])


def _input_of(args, kwargs) -> Optional[torch.Tensor]:
    x = args[0] if args else kwargs.get("input")
    return x if isinstance(x, torch.Tensor) else None


def _stages(model: nn.Module, run: Callable[[nn.Module], object],
            targets: Dict[int, Tuple[List[str], nn.Linear]]) -> List[List[int]]:
    """The targets ``run(model)`` calls, by id, in the order of their first calls, grouped
    in stages: consecutive first calls with the same input tensor (q, k and v of one
    attention) form one stage."""
    stages: List[List[int]] = []
    last: List[Optional[torch.Tensor]] = [None]

    def hook(module, args, kwargs):
        if any(id(module) in stage for stage in stages):
            return
        x = _input_of(args, kwargs)
        if stages and x is not None and x is last[0]:
            stages[-1].append(id(module))
        else:
            stages.append([id(module)])
        last[0] = x

    run_with_hooks(model, run, [(linear, hook) for _, linear in targets.values()])
    return stages


def _record_inputs(model: nn.Module, run: Callable[[nn.Module], object], linear: nn.Linear) -> List[torch.Tensor]:
    """The inputs [rows, K] (copies) that ``run(model)`` gives ``linear``, call by call."""
    inputs: List[torch.Tensor] = []

    def hook(module, args, kwargs):
        x = _input_of(args, kwargs)
        inputs.append(x.detach().reshape(-1, x.shape[-1]).clone())

    run_with_hooks(model, run, [(linear, hook)])
    return inputs


def _pair_inputs(model: nn.Module, run: Callable[[nn.Module], object], linear: nn.Linear, name: str,
                 float_inputs: List[torch.Tensor]) -> PairedStats:
    """The PairedStats of ``linear``'s inputs in ``run(model)`` with ``float_inputs``, call
    i with call i; ValueError when the calls differ in number or shape (``run`` must give
    the model the same inputs each time: no shuffling, no dropout)."""
    k = linear.in_features
    device = linear.weight.device
    paired = PairedStats(InputStats(torch.zeros(k, k, device=device), 0, torch.zeros(k, device=device),
                                    torch.zeros(k, device=device)),
                         torch.zeros(k, k, device=device), torch.zeros(k, k, device=device))
    calls = [0]

    def differ(what):
        return ValueError(f"calibrate: with sequential=True, run(model) is called several times and "
                          f"must give each layer the same inputs every time (the same batches in the "
                          f"same order, no randomness): {name} {what}")

    def hook(module, args, kwargs):
        x = _input_of(args, kwargs)
        if calls[0] >= len(float_inputs):
            raise differ(f"was called more than the {len(float_inputs)} times of the first run")
        reference = float_inputs[calls[0]].float()
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if x.shape != reference.shape:
            raise differ(f"got {tuple(x.shape)} rows x inputs in call {calls[0]}, "
                         f"{tuple(reference.shape)} in the first run")
        _accumulate(paired.stats, x)
        paired.cross.addmm_(x.T, reference)
        paired.float_xtx.addmm_(reference.T, reference)
        calls[0] += 1

    run_with_hooks(model, run, [(linear, hook)])
    if calls[0] != len(float_inputs):
        raise differ(f"was called {calls[0]} times, {len(float_inputs)} in the first run")
    return paired


def _dense(module: nn.Module) -> torch.Tensor:
    """A converted linear layer's weight as a dense [N, K] tensor (in the coordinates of its
    input: a SmoothQuant layer's stored weight is W diag(s), its input x diag(1 / s))."""
    weight = module.weight
    dense = weight.to_dense() if hasattr(weight, "to_dense") else weight.dequantize()
    smoothing = getattr(module, "smoothing", None)
    return dense if smoothing is None else dense / smoothing.to(dense.dtype)


def damped_hessian(xtx: torch.Tensor, w: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """H_d = H + damp * diag(H) for H = ``xtx`` (float32, on w's device [N, K]), positive
    definite: the row and column of a dead input (diag H = 0: never seen nonzero) are
    replaced by the identity's, and where rounding leaves H_d indefinite a small multiple
    of the identity is added. Returns (H_d, L), L its lower Cholesky factor."""
    if isinstance(damp, bool) or not isinstance(damp, numbers.Real) or not damp >= 0:
        raise ValueError(f"damp must be a number >= 0, got {damp!r}")
    k = w.shape[1]
    if not isinstance(xtx, torch.Tensor) or not xtx.is_floating_point() or tuple(xtx.shape) != (k, k):
        raise ValueError(f"xtx must be a floating-point [{k}, {k}] tensor (X^T X of the layer's "
                         f"inputs), got {getattr(xtx, 'dtype', type(xtx).__name__)} "
                         f"{tuple(getattr(xtx, 'shape', ()))}")
    if not bool(torch.isfinite(xtx).all()):
        raise ValueError("xtx holds NaN or Inf: the calibration inputs were not finite")
    h = xtx.to(device=w.device, dtype=torch.float32).clone()
    dead = h.diagonal() <= 0
    h[dead, :] = 0
    h[:, dead] = 0
    h.diagonal()[dead] = 1
    h.diagonal().mul_(1 + damp)
    mean = float(h.diagonal().mean()) if k else 1.0
    for attempt in range(8):  # rounding can leave H + damp diag(H) indefinite: add to it
        jittered = h if attempt == 0 else h + 1e-7 * 10 ** attempt * mean * torch.eye(k, device=h.device)
        factor, info = torch.linalg.cholesky_ex(jittered)
        if int(info) == 0:
            return jittered, factor
    raise ValueError("xtx is not positive semi-definite: it is not X^T X of real inputs")


def inverse_hessian_factor(xtx: torch.Tensor, w: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """U, the upper Cholesky factor of H_d^{-1} (``damped_hessian``: H_d = H + damp * diag(H),
    H = ``xtx``)."""
    return damped_inverse_factor(xtx, w, damp)[1]


def damped_inverse_factor(xtx: torch.Tensor, w: torch.Tensor, damp: float = DAMP) -> Tuple[torch.Tensor, torch.Tensor]:
    """(H_d, U): ``damped_hessian``'s H_d and ``inverse_hessian_factor``'s U from one
    factorization, for a caller that needs both (SparseGPT sweeps with U, then refits
    with H_d: ``refit_damped``)."""
    h, factor = damped_hessian(xtx, w, damp)
    return h, torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True)


def masked_refit(w: torch.Tensor, xtx: torch.Tensor, mask: torch.Tensor, damp: float = DAMP,
                 start: Optional[torch.Tensor] = None, budget: int = 1 << 24) -> torch.Tensor:
    """The weight W' [N, K] (float32), zero outside ``mask`` (bool [N, K]), that minimizes
    the damped output error sum over rows of (w - w') H_d (w - w')^T, for H_d =
    ``damped_hessian(xtx, w, damp)``: row by row, with S its kept columns and P its pruned
    ones, w'_S = w_S + H_d[S, S]^{-1} H_d[S, P] w_P (the error d = w - w' has d_P = w_P;
    setting the gradient over d_S to zero gives H_SS d_S = -H_SP w_P). The sweep of
    ``obs_sweep`` reaches this only column by column, compensating on the columns after
    each; here every kept weight, before or after, absorbs every pruned one's error.

    Solved for all rows at once by conjugate gradients on H_SS w'_S = (w H_d)_S,
    preconditioned by diag(H_d), from ``start`` (default w on the mask; ``sparsegpt``
    gives its sweep's weights, already close): each step is one [N, K] x [K, K] product,
    against K^3 / 3 per row for a factorization. A row stops mattering once its residual
    |((w - w') H_d)_S| is at most REFIT_TOLERANCE times |(w H_d)_S| (float32's reach); after
    REFIT_STEPS steps, the rows still above it are solved directly (a Cholesky of each row's
    H_d[S, S], rows of equal kept count together, ``budget`` floats of H_SS at a time)."""
    h, _ = damped_hessian(xtx, w, damp)
    return refit_damped(w, h, mask, start, budget)


def refit_damped(w: torch.Tensor, h: torch.Tensor, mask: torch.Tensor, start: Optional[torch.Tensor] = None,
                 budget: int = 1 << 24) -> torch.Tensor:
    """``masked_refit`` for a caller that holds H_d = ``h`` already (float32 [K, K] on w's
    device, from ``damped_hessian``), which masked_refit would build again (a K x K
    Cholesky: a tenth of sparsegpt's time on a 384 x 1536 layer)."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != w.shape:
        raise ValueError(f"mask must be a bool {list(w.shape)} tensor (w's shape), got "
                         f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")
    w = w.detach().to(torch.float32)
    mask = mask.to(w.device)
    keep = mask.to(torch.float32)
    if start is not None and (not isinstance(start, torch.Tensor) or start.shape != w.shape):
        raise ValueError(f"start must be a {list(w.shape)} tensor (w's shape), got "
                         f"{tuple(getattr(start, 'shape', ())) or type(start).__name__}")
    out = (w if start is None else start.detach().to(w.device, torch.float32)) * keep
    goal = REFIT_TOLERANCE * ((w @ h) * keep).norm(dim=1)
    residual = ((w - out) @ h) * keep
    inverse_diagonal = 1 / h.diagonal()
    tiny = torch.finfo(torch.float32).tiny
    z = residual * inverse_diagonal
    direction, rz = z, (residual * z).sum(1)
    for step in range(REFIT_STEPS):
        if step % 8 == 0 and bool((residual.norm(dim=1) <= goal).all()):  # one host sync per 8
            break
        product = (direction @ h) * keep
        alpha = rz / (direction * product).sum(1).clamp(min=tiny)
        out.addcmul_(alpha[:, None], direction)
        residual.addcmul_(alpha[:, None], product, value=-1)
        z = residual * inverse_diagonal
        rz, previous = (residual * z).sum(1), rz
        direction = z + (rz / previous.clamp(min=tiny))[:, None] * direction
    left = torch.nonzero(residual.norm(dim=1) > goal).flatten()
    if left.numel():
        out[left] = _cholesky_refit(w[left], h, mask[left], budget)
    return out


def _cholesky_refit(w: torch.Tensor, h: torch.Tensor, mask: torch.Tensor, budget: int) -> torch.Tensor:
    """masked_refit's solution by a Cholesky of each row's H_d[S, S] (``h`` = H_d), rows of
    equal kept count together, ``budget`` floats of H_SS at a time."""
    out = torch.zeros_like(w)
    counts = mask.sum(1)
    for count in torch.unique(counts).tolist():
        rows = torch.nonzero(counts == count).flatten()
        if count == 0:
            continue
        step = max(1, budget // (count * count))
        for r0 in range(0, rows.numel(), step):
            chosen = rows[r0:r0 + step]
            keep = mask[chosen]
            kept = torch.nonzero(keep)[:, 1].view(chosen.numel(), count)            # S per row
            h_ss = h[kept[:, :, None], kept[:, None, :]]                             # H[S, S]
            pruned_w = w[chosen].masked_fill(keep, 0)                                # w_P, 0 on S
            rhs = (pruned_w @ h).gather(1, kept)[:, :, None]                         # H[S, P] w_P
            factor, info = torch.linalg.cholesky_ex(h_ss)
            if bool((info != 0).any()):  # a principal block of a positive definite H_d is one
                raise ValueError("masked_refit: a kept block of the damped H is not positive definite")
            solution = torch.cholesky_solve(rhs, factor)[:, :, 0]
            out[chosen] = w[chosen].masked_fill(~keep, 0).scatter_add_(1, kept, solution)
    return out


def obs_sweep(w: torch.Tensor, u: torch.Tensor, target: Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor],
              chunk: int = 128) -> torch.Tensor:
    """Fix the columns of ``w`` [N, K] one by one in order with error compensation (see the
    module doc) and return the fixed float32 weight. ``target(w1, d1, i, j0)`` gives the
    fixed value [N] of column j0 + i, where w1 = the chunk's columns j0.. as updated so far
    and d1 their U[j, j]; it is called for i = 0, 1, ... of each chunk, so it may choose a
    pattern at the start of a chunk or a group. ``chunk`` must be a multiple of every group
    width that ``target`` decides on."""
    w = w.detach().to(torch.float32).clone()
    k = w.shape[1]
    for j0 in range(0, k, chunk):
        j1 = min(j0 + chunk, k)
        w1, u1 = w[:, j0:j1].clone(), u[j0:j1, j0:j1]
        d1 = u1.diagonal()
        errors = torch.empty_like(w1)
        for i in range(j1 - j0):
            q = target(w1, d1, i, j0)
            torch.div(w1[:, i] - q, d1[i], out=errors[:, i])
            w1[:, i + 1:].addr_(errors[:, i], u1[i, i + 1:], alpha=-1)
            w1[:, i] = q
        w[:, j0:j1] = w1
        w[:, j1:] -= errors @ u[j0:j1, j1:]
    return w


def output_error(reference: torch.Tensor, approximation: torch.Tensor, xtx: torch.Tensor) -> Tuple[float, float]:
    """(|X (W - W')^T|_F^2, |X W^T|_F^2) for W = ``reference``, W' = ``approximation``, from
    ``xtx`` = X^T X alone: trace(D H D^T) for D = W - W' and for W. D is formed in float64,
    the products in float32 (H is float32 already) and their sums in float64."""
    h = xtx.to(device=reference.device, dtype=torch.float32)
    ref = reference.detach().to(torch.float64)
    diff = ref - approximation.detach().to(device=reference.device, dtype=torch.float64)

    def trace(d: torch.Tensor) -> float:
        d = d.to(torch.float32)
        return float(((d @ h) * d).sum(dtype=torch.float64))

    return trace(diff), trace(ref)


def report(model: nn.Module) -> str:
    """The Markdown table of the layers of ``model`` converted with calibration: per layer,
    the relative output error |X (W - W')^T|_F / |X W^T|_F on the calibration inputs with
    the one-shot criterion (magnitude, min-max, absmax) and with the chosen method, and the
    seconds the method took; then the total over the layers (the root of the summed
    squared errors over the summed squared outputs, and the summed seconds)."""
    rows: List[str] = []
    totals = [0.0, 0.0, 0.0, 0.0]
    for name, module in model.named_modules():
        info = getattr(module, "calibration", None)
        if not isinstance(info, dict):
            continue
        values = (info["one_shot_error"], info["error"], info["signal"], info["seconds"])
        totals = [total + value for total, value in zip(totals, values)]
        rows.append(f"| {name} | {info['method']} | {_relative(values[0], values[2])} | "
                    f"{_relative(values[1], values[2])} | {values[3]:.3f} |")
    if not rows:
        raise ValueError("model has no layer converted with calibrate=: nothing to report")
    return "\n".join(["| layer | method | one-shot error | error | seconds |", "|---|---|---|---|---|",
                      *rows, f"| total | | {_relative(totals[0], totals[2])} | "
                              f"{_relative(totals[1], totals[2])} | {totals[3]:.3f} |"])


def _relative(error: float, signal: float) -> str:
    return f"{(error / signal) ** 0.5:.4f}" if signal > 0 else "n/a"
