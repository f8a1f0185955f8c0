"""sparqle::nm_linear (N:M semi-structured sparse linear) and sparqle::nm_to_dense.

nm_linear(x, values, meta, bias, n, m) -> y [M, N] = x @ W^T + bias for W [N, K] in n:m
    (layout: sparqle.formats.nm), K = x.shape[1].
nm_to_dense(values, meta, n, m, k) -> W [N, k] in values' dtype: a format conversion, by
    the Triton kernel on CUDA (each dense element written once) and the codec's torch
    expansion otherwise (the cupy backend has no kernel of its own for it).

On CUDA ``auto`` has three ways to compute nm_linear: the Triton kernel, W expanded for
cuBLAS, and (2:4, fp16/bf16) cuSPARSELt's sparse tensor cores. It times them on the first
call per key (the shape, M rounded up to a power of two, and whether ``values`` changed
since the last call on them) and keeps the fastest, so the dispatch is never slower than
cuBLAS on the expanded W, as measured on the device it runs on.

cuSPARSELt needs its own compressed copy of W. The binding decides by itself when to make it
again, from the tensors (the schema holds no cache policy): ``kernels._derived.derived``
keeps the copy while ``values`` and ``meta`` are the same tensors at the same version
counters, so an in-place update (an optimizer step) or a replaced tensor makes it again.
The timing key tells training from inference by the same version counter: ``values``
modified in place since the last nm_linear call on them (training) makes the key's last
field True, and there cuSPARSELt is timed, and run, making its copy on every call, the cost
a training step pays; values unchanged since their last call, or on their first call, are
timed with the kept copy. The last call is tracked per ``values`` tensor, not per shape:
the layers of a model that share a shape alternate, and each keeps its own copy.

Gradients, the pattern fixed: dx = dy @ W (through the dense W: the transpose of an N:M
matrix is not N:M), d(values) = (dy^T @ x) at the kept positions, dbias = sum of dy; and
nm_to_dense's, d(values) = dW at the kept positions, so that second derivatives (double
backward) work too.
"""
import functools
import weakref
from typing import Callable, Dict, Hashable, Optional, Tuple

import torch

from sparqle.formats.nm import columns
from sparqle.kernels._derived import derived
from sparqle.kernels.dispatch import NM_UNMEASURED_CUBLAS_FROM_M

from ._autograd import register_autograd
from ._backend import FLOATS, choose, kernels, launch, requested_backend
from ._fastest import bucket, fastest
from ._weight_op import define_weight_op

# Triton 3.6 cannot lower an fp64 tl.dot here. cupy (mma.sp on sparse tensor cores, 2:4
# only) runs when forced: it joins auto's candidates once its tests have run on a GPU.
DTYPES = {"triton": FLOATS - {torch.float64}, "torch": FLOATS,
          "cupy": frozenset({torch.float16, torch.bfloat16})}
TO_DENSE_DTYPES = dict.fromkeys(("triton", "torch", "cupy"), FLOATS)
# id(values) -> (a weak reference to values, their version counter at their last call)
_last_versions: Dict[int, Tuple[weakref.ref, Optional[int]]] = {}


@functools.lru_cache(maxsize=None)
def _cusparselt_runs(device: torch.device, dtype: torch.dtype, n: int, m: int) -> bool:
    """Whether cuSPARSELt takes this pattern and dtype on this device (asked once each)."""
    return ((n, m) == (2, 4) and dtype in (torch.float16, torch.bfloat16)
            and torch.backends.cusparselt.is_available()
            and torch.cuda.get_device_capability(device) >= (8, 0))


def _values_changed(values: torch.Tensor) -> bool:
    """Whether ``values`` was modified in place (its version counter moved) since the last
    nm_linear call on it; False on its first call (a tensor not seen before: a replacement,
    whose copy ``derived`` makes anew by identity, counts as a first call). An inference
    tensor keeps no version counter: it never counts as changed (``derived`` makes its copy
    on every call, timed or not)."""
    version = None if values.is_inference() else values._version
    key = id(values)
    last = _last_versions.get(key)
    if last is None or last[0]() is not values:
        weakref.finalize(values, _last_versions.pop, key, None)
        last = None
    _last_versions[key] = (weakref.ref(values), version)
    return last is not None and last[1] != version


def _cusparselt_linear(x, values, meta, bias, changed: bool) -> torch.Tensor:
    """2:4 on cuSPARSELt. Its compressed copy of W is kept while values and meta are
    unchanged (``derived``); when values ``changed`` since the last call (training), it is
    made on every call, so that timing this counts the cost a training step pays."""
    on_torch, on_triton = kernels("torch", "nm_linear"), kernels("triton", "nm_linear")

    def compress():
        return on_torch.cusparselt_compress(on_triton.to_dense(values, meta, 2, 4, x.shape[1]))

    compressed = compress() if changed else derived("cusparselt", compress, values, meta)
    return on_torch.cusparselt_linear(x, compressed, bias, values.shape[0])


def _cuda_candidates(x, values, meta, bias, n, m, changed: bool) -> Dict[str, Callable[[], torch.Tensor]]:
    """The ways auto computes nm_linear on CUDA, the reference (the dense layer's
    arithmetic) first."""
    on_triton = kernels("triton", "nm_linear")
    candidates = {
        "cublas": lambda: on_triton.expanded_linear(x, values, meta, bias, n, m),
        "triton": lambda: on_triton.nm_linear(x, values, meta, bias, n, m),
    }
    if _cusparselt_runs(x.device, x.dtype, n, m):
        candidates["cusparselt"] = lambda: _cusparselt_linear(x, values, meta, bias, changed)
    return candidates


def _timing_key(x, values, bias, n, m) -> Tuple[Hashable, bool]:
    """(the key ``fastest`` times under, whether values changed since their last call): the
    device, dtype, pattern, M rounded up to a power of two, N, K, bias, and that flag."""
    rows, (out, k) = x.shape[0], (values.shape[0], x.shape[1])
    changed = _values_changed(values)
    return ("nm_linear", x.device, x.dtype, n, m, bucket(rows), out, k,
            bias is not None, changed), changed


def nm_linear_forward(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                      bias: Optional[torch.Tensor], n: int, m: int) -> torch.Tensor:
    rows, (out, k) = x.shape[0], (values.shape[0], x.shape[1])
    if (x.is_cuda and rows * out * k > 0 and requested_backend() == "auto"
            and choose("nm_linear", x.device, x.dtype, DTYPES) == "triton"):
        key, changed = _timing_key(x, values, bias, n, m)
        default = "cublas" if rows >= NM_UNMEASURED_CUBLAS_FROM_M else "triton"
        return fastest(key, _cuda_candidates(x, values, meta, bias, n, m, changed), default, x.device)
    return launch("nm_linear", "nm_linear", DTYPES, x, x, values, meta, bias, n, m)


nm_linear = define_weight_op(nm_linear_forward, lambda values, *_: values.shape[0])


@torch.library.custom_op("sparqle::nm_to_dense", mutates_args=())
def nm_to_dense(values: torch.Tensor, meta: torch.Tensor, n: int, m: int, k: int) -> torch.Tensor:
    return launch("nm_linear", "to_dense", TO_DENSE_DTYPES, values, values, meta, n, m, k)


@nm_to_dense.register_fake
def _(values, meta, n, m, k):
    return values.new_empty((values.shape[0], k))


def _kept(dense: torch.Tensor, meta: torch.Tensor, n: int, m: int, kc: int) -> torch.Tensor:
    """The entries of dense [R, K] at the kept positions: [R, kc], the layout of values."""
    return torch.nn.functional.pad(dense, (0, kc // n * m - dense.shape[1])).gather(1, columns(meta, n, m, kc))


def _to_dense_setup(ctx, inputs, output):
    values, meta, ctx.n, ctx.m, _ = inputs
    ctx.save_for_backward(meta)
    ctx.kc = values.shape[1]


def _to_dense_backward(ctx, grad):
    (meta,) = ctx.saved_tensors
    return _kept(grad, meta, ctx.n, ctx.m, ctx.kc), None, None, None, None


register_autograd(nm_to_dense, _to_dense_backward, _to_dense_setup)


def _setup_context(ctx, inputs, output):
    x, values, meta, bias, n, m = inputs
    ctx.save_for_backward(x, values, meta)
    ctx.n, ctx.m = n, m


def _backward(ctx, grad):
    x, values, meta = ctx.saved_tensors
    n, m, k = ctx.n, ctx.m, x.shape[1]
    grad_x = grad_values = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = grad @ torch.ops.sparqle.nm_to_dense(values, meta, n, m, k).to(grad.dtype)
    if ctx.needs_input_grad[1]:
        grad_values = _kept(grad.t() @ x.to(grad.dtype), meta, n, m, values.shape[1]).to(values.dtype)
    if ctx.needs_input_grad[3]:
        grad_bias = grad.sum(0)
    return grad_x, grad_values, None, grad_bias, None, None


register_autograd(nm_linear, _backward, _setup_context)
