"""The registry of sparqle's weight ops: one :class:`WeightOp` entry per op, and everything
that lists ops reads it: ``sparqle.linear`` and ``sparqle.spmm`` (functional.py),
``sparqle.convert`` and checkpoints (the format names, the nn module each builds, the
calibration criteria), ``sparqle bench`` (the benchmark of each op), the kernel compile test
(the dtypes of each Triton kernel) and the contract test (tests/test_contract.py, from each
entry's examples). Adding an op is adding an entry: docs/adding-an-op.md.

Every weight op has one contract, ``torch.ops.sparqle.<name>(x, *tensors(W), bias,
*static(W)) -> y = x @ W^T + bias``: x [M, K] (any strides), W [N, K] in the op's format,
bias [N] or None (fused into the kernel on every backend), y [M, N] in x's dtype. ``spmm``
of a sparse format is derived from it: a @ b = (b^T @ a^T)^T = linear(b^T, a)^T.
"""
import importlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch

from .calibrate import INT4_METHODS, INT8_METHODS, SPARSE_METHODS
from .formats import CSR, BlockedELL, FP8Weight, Int4Weight, Int8Weight, SemiStructured
from .formats._checks import INT32_MAX
from .formats.nm import PATTERNS
from .prune import kept

# A conversion of an nn.Linear: (format name for sparqle.convert, its options).
Conversion = Tuple[str, Dict[str, Any]]


@dataclass(frozen=True)
class WeightOp:
    """One weight op, declared once.

    name: the op, ``torch.ops.sparqle.<name>``.
    kernels: the modules of its family in every layer: ``bindings/<kernels>.py`` (which
        registers the op), ``kernels/<backend>/<kernels>.py``, ``tests/test_<kernels>.py``.
    format: the weight format class (sparqle.formats).
    static: the plain arguments of the op after bias, from a weight of that format (the
        tensors between x and bias are the format's ``tensor_names``, in order, or
        ``tensors_of(w)`` where the op takes them otherwise).
    sparse: the weight is sparse: ``sparqle.spmm`` takes it, and its stored values train.
    converts: the names ``sparqle.convert`` takes for it, each with the options the name
        gives the module's ``from_linear``.
    module: the class in ``sparqle.nn`` that holds a converted layer.
    methods: the calibration criteria its converter takes (sparqle.calibrate), or None.
    refusal: why it cannot serve an nn.Linear with the given options (None when it can),
        decided before anything is converted; None: it serves every shape (N:M pads the
        input features to a multiple of m, Blocked-ELL both sizes to multiples of the block,
        int4's last group may be partial, and every kernel masks its edge tiles).
    dense: W as a dense float tensor [N, K] (the oracle's weight).
    bench: the benchmark (``sparqle bench --op <bench>``, ``bench/bench_<bench>.py``).
    examples: conversions the contract test runs, by label: (format name, options).
    """
    name: str
    kernels: str
    format: type
    static: Callable[[Any], Tuple[Any, ...]]
    sparse: bool
    converts: Mapping[str, Dict[str, Any]]
    module: str
    methods: Optional[Tuple[str, ...]]
    dense: Callable[[Any], torch.Tensor]
    bench: str
    examples: Mapping[str, Conversion]
    refusal: Optional[Callable[[torch.nn.Linear, Mapping[str, Any]], Optional[str]]] = None
    tensors_of: Optional[Callable[[Any], Tuple[torch.Tensor, ...]]] = None

    def tensors(self, w) -> Tuple[torch.Tensor, ...]:
        """The op's tensor arguments (between x and bias) from weight ``w``: its format's
        ``tensor_names`` in order, or ``tensors_of(w)``."""
        if self.tensors_of is not None:
            return self.tensors_of(w)
        return tuple([getattr(w, name) for name in w.tensor_names])

    @property
    def op(self):
        """``torch.ops.sparqle.<name>``."""
        return getattr(torch.ops.sparqle, self.name)

    @property
    def dtypes(self) -> Mapping[str, frozenset]:
        """Backend -> the dtypes of x its kernel takes (the binding's ``DTYPES``)."""
        return importlib.import_module(f"sparqle.bindings.{self.kernels}").DTYPES

    @property
    def module_class(self) -> type:
        """The sparqle.nn class of a converted layer (imported when first asked: sparqle.nn
        itself calls ``sparqle.linear``, which reads this registry)."""
        return getattr(importlib.import_module("sparqle.nn"), self.module)

    def linear(self, x2d: torch.Tensor, w, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """y [M, N] = x2d [M, K] @ W^T + bias through the op, the arguments checked."""
        return self.call(x2d, self.tensors(w), bias, self.static(w))

    def call(self, x2d: torch.Tensor, tensors: Tuple[torch.Tensor, ...], bias: Optional[torch.Tensor],
             static: Tuple[Any, ...]) -> torch.Tensor:
        """The op on its arguments. Where the dispatcher would add nothing
        (:func:`dispatcher_adds_nothing`: an eager call that records no gradient, under no
        mode, on plain tensors) the op's forward is called directly, saving the dispatcher's
        cost per call; the result is the same."""
        overload, forward = _CALLS[self.name]
        arguments = (x2d, *tensors, bias, *static)
        return (forward if dispatcher_adds_nothing(arguments) else overload)(*arguments)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def dispatcher_adds_nothing(arguments: Tuple[Any, ...]) -> bool:
    """Whether an op called on ``arguments`` (its tensors are what counts: None, numbers and
    flags are passed over) gives, called through its Python forward, what the dispatcher
    would give: no gradient to record (grad mode off, or no tensor requires one), not
    compiling (Dynamo must see the op) nor traced by torch.jit, no torch function or
    dispatch mode (FakeTensorMode, a user's mode) and no functorch transform (vmap, grad)
    active, the profiler off (it names the op), and plain tensors (no subclass whose
    ``__torch_function__`` or ``__torch_dispatch__`` would intercept it)."""
    recording = torch.is_grad_enabled()
    for t in arguments:  # a loop, not any(): this runs on every call
        if isinstance(t, torch.Tensor) and (type(t) not in _PLAIN or (recording and t.requires_grad)):
            return False
    return not (torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None
                or torch._C._len_torch_function_stack() or torch._C._len_torch_dispatch_stack()
                or torch._C._functorch.peek_interpreter_stack() is not None
                or torch.autograd.profiler._is_profiler_enabled)


def _csr_refusal(linear: torch.nn.Linear, options: Mapping[str, Any]) -> Optional[str]:
    """CSR keeps int32 indices: a layer keeping more than 2^31 - 1 weights cannot be one."""
    sparsity = options.get("sparsity")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        return None  # the converter says what is wrong with it
    nnz = kept(linear.weight.numel(), sparsity)
    if nnz > INT32_MAX:
        return (f"it keeps {nnz} weights at sparsity {sparsity}, past the {INT32_MAX} that CSR's "
                f"int32 indices reach")
    return None


_NM_FORMATS = {f"{n}:{m}": {"format": f"{n}:{m}"} for n, m in PATTERNS}

OPS: Tuple[WeightOp, ...] = (
    WeightOp(
        name="csr_linear", kernels="spmm_csr", format=CSR,
        static=lambda w: (), sparse=True,
        converts={"csr": {"format": "csr"}}, module="SparseLinear", methods=SPARSE_METHODS,
        dense=lambda w: w.to_dense(), bench="spmm_csr",
        examples={"csr": ("csr", {"sparsity": 0.5})}, refusal=_csr_refusal),
    WeightOp(
        name="bell_linear", kernels="spmm_bell", format=BlockedELL,
        static=lambda w: (w.shape[0],), sparse=True,
        converts={"bell": {"format": "bell"}}, module="SparseLinear", methods=SPARSE_METHODS,
        dense=lambda w: w.to_dense(), bench="spmm_bell",
        examples={"bell": ("bell", {"sparsity": 0.5, "block_size": 16})}),
    WeightOp(
        name="nm_linear", kernels="nm_linear", format=SemiStructured,
        static=lambda w: (w.n, w.m), sparse=True,
        converts=_NM_FORMATS, module="SparseLinear", methods=SPARSE_METHODS,
        dense=lambda w: w.to_dense(), bench="nm",
        examples={"2:4": ("2:4", {}), "4:8": ("4:8", {})}),
    WeightOp(
        name="int4_linear", kernels="int4_linear", format=Int4Weight,
        static=lambda w: (w.group_width,),
        sparse=False, converts={"int4": {}}, module="Int4Linear", methods=INT4_METHODS,
        dense=lambda w: w.dequantize(), bench="int4",
        examples={"int4": ("int4", {"group_size": 32}),
                  "int4-symmetric": ("int4", {"group_size": 32, "symmetric": True})}),
    WeightOp(
        name="int8_linear", kernels="int8_linear", format=Int8Weight,
        static=lambda w: (True,),  # W8A8
        sparse=False, converts={"int8": {}}, module="Int8Linear", methods=INT8_METHODS,
        dense=lambda w: w.dequantize(), bench="int8",
        examples={"int8": ("int8", {}), "int8-w16": ("int8", {"activation": None})}),
    WeightOp(
        name="fp8_linear", kernels="fp8_linear", format=FP8Weight,
        static=lambda w: (), tensors_of=lambda w: (w.qweight, w.scales.reshape(-1)),  # [1], not 0-dim
        sparse=False, converts={"fp8": {}}, module="FP8Linear", methods=None,
        dense=lambda w: w.dequantize(), bench="fp8",
        examples={"fp8": ("fp8", {}), "fp8-e5m2-tensor": ("fp8", {"dtype": "e5m2", "granularity": "tensor"})}),
)

@dataclass(frozen=True)
class Op:
    """An op that is not a weight op: its name (``torch.ops.sparqle.<name>``), its kernel and
    binding modules, and its benchmarks."""
    name: str
    kernels: str
    benches: Tuple[str, ...]


OTHER_OPS: Tuple[Op, ...] = (
    # Swin window attention (sparqle.window_attention) and its layout ops; SparseViT's
    # window pruning (sparqle.nn.SparseWindowBlock) runs on them.
    Op(name="window_attention", kernels="window_attention", benches=("window_attention", "sparse_windows")),
)

BY_FORMAT: Dict[type, WeightOp] = {entry.format: entry for entry in OPS}
BY_CONVERSION: Dict[str, WeightOp] = {name: entry for entry in OPS for name in entry.converts}
SPARSE_FORMATS = tuple(entry.format for entry in OPS if entry.sparse)
BENCHMARKS = tuple(entry.bench for entry in OPS) + tuple(bench for op in OTHER_OPS for bench in op.benches)
KERNEL_MODULES = tuple(dict.fromkeys([entry.kernels for entry in OPS] + [op.kernels for op in OTHER_OPS]))


# Weight op name -> (its overload, its Python forward: ``<name>_forward`` of its binding),
# resolved once at import: torch.compile traces a dict lookup, where a lazily cached
# attribute (functools.cached_property's lock) stopped it when the first call of an op in
# the process was a compiled one.
_CALLS: Dict[str, Tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]] = {}


def _register_ops() -> None:
    """Import the binding of every op (bindings/<kernels>.py), which registers its
    ``torch.ops.sparqle.*``, and resolve each weight op's callables (``_CALLS``)."""
    for kernels in KERNEL_MODULES:
        importlib.import_module(f"sparqle.bindings.{kernels}")
    for entry in OPS:
        binding = importlib.import_module(f"sparqle.bindings.{entry.kernels}")
        _CALLS[entry.name] = (entry.op.default, getattr(binding, f"{entry.name}_forward"))


_register_ops()


def weight_op(w, argument: str = "w", sparse_only: bool = False) -> WeightOp:
    """The entry of weight format ``w`` (TypeError naming ``argument`` if it is none)."""
    entry = BY_FORMAT.get(type(w))
    if entry is None or (sparse_only and not entry.sparse):
        formats = [f.__name__ for f in (SPARSE_FORMATS if sparse_only else BY_FORMAT)]
        raise TypeError(f"{argument} must be one of the formats {formats}, got {type(w).__name__}")
    return entry


def dense(w) -> torch.Tensor:
    """Weight format ``w`` as a dense float tensor [N, K]."""
    return weight_op(w).dense(w)
