"""sparqle::nm_linear (N:M semi-structured sparse linear) and sparqle::nm_to_dense.

nm_linear(x, values, meta, bias, n, m, training=False) -> y [M, N] = x @ W^T + bias for
    W [N, K] in n:m (layout: sparqle.formats.nm), K = x.shape[1]; ``training``
    says that ``values`` change between calls (they are being trained), which changes only
    how the dispatch below counts cuSPARSELt's cost.
nm_to_dense(values, meta, n, m, k) -> W [N, k] in values' dtype: a format conversion, by
    the Triton kernel on CUDA (each dense element written once) and plain torch otherwise;
    the cupy backend has no kernel of its own for it and uses the torch one.

On CUDA ``auto`` has three ways to compute nm_linear: the Triton kernel, W expanded for
cuBLAS, and (2:4, fp16/bf16) cuSPARSELt's sparse tensor cores. It times them on the first
call per shape (M rounded up to a power of two) and keeps the fastest, so the dispatch is
never slower than cuBLAS on the expanded W, as measured on the device it runs on. cuSPARSELt needs
its own compressed copy of W: kept while W is unchanged, made (and timed) on every call in
training.

Gradients, the pattern fixed: dx = dy @ W (through the dense W: the transpose of an N:M
matrix is not N:M), d(values) = (dy^T @ x) at the kept positions, dbias = sum of dy; and
nm_to_dense's, d(values) = dW at the kept positions, so that second derivatives (double
backward) work too.
"""
import functools
from typing import Callable, Dict, Optional

import torch

from sparqle.formats.nm import columns
from sparqle.kernels._derived import derived
from sparqle.kernels.dispatch import NM_UNMEASURED_CUBLAS_FROM_M

from ._autograd import register_autograd
from ._backend import FLOATS, choose, kernels, launch, requested_backend
from ._fastest import fastest

# Triton 3.6 cannot lower an fp64 tl.dot here. cupy (mma.sp on sparse tensor cores, 2:4
# only) runs when forced: it joins auto's candidates once its tests have run on a GPU.
_DTYPES = {"triton": FLOATS - {torch.float64}, "torch": FLOATS,
           "cupy": frozenset({torch.float16, torch.bfloat16})}
_TO_DENSE_DTYPES = dict.fromkeys(("triton", "torch", "cupy"), FLOATS)


@functools.lru_cache(maxsize=None)
def _cusparselt_runs(device: torch.device, dtype: torch.dtype, n: int, m: int) -> bool:
    """Whether cuSPARSELt takes this pattern and dtype on this device (asked once each)."""
    return ((n, m) == (2, 4) and dtype in (torch.float16, torch.bfloat16)
            and torch.backends.cusparselt.is_available()
            and torch.cuda.get_device_capability(device) >= (8, 0))


def _cusparselt_linear(x, values, meta, bias, training) -> torch.Tensor:
    """2:4 on cuSPARSELt. Its compressed copy of W is kept while values and meta are
    unchanged; in training (values change every step) it is made, and timed, per call."""
    on_torch, on_triton = kernels("torch", "nm_linear"), kernels("triton", "nm_linear")

    def compress():
        return on_torch.cusparselt_compress(on_triton.to_dense(values, meta, 2, 4, x.shape[1]))

    compressed = compress() if training else derived("cusparselt", compress, values, meta)
    return on_torch.cusparselt_linear(x, compressed, bias, values.shape[0])


def _cuda_candidates(x, values, meta, bias, n, m, training) -> Dict[str, Callable[[], torch.Tensor]]:
    """The ways auto computes nm_linear on CUDA, the reference (the dense layer's
    arithmetic) first."""
    on_triton = kernels("triton", "nm_linear")
    candidates = {
        "cublas": lambda: on_triton.expanded_linear(x, values, meta, bias, n, m),
        "triton": lambda: on_triton.nm_linear(x, values, meta, bias, n, m),
    }
    if _cusparselt_runs(x.device, x.dtype, n, m):
        candidates["cusparselt"] = lambda: _cusparselt_linear(x, values, meta, bias, training)
    return candidates


@torch.library.custom_op("sparqle::nm_linear", mutates_args=())
def nm_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
              bias: Optional[torch.Tensor], n: int, m: int, training: bool = False) -> torch.Tensor:
    rows, (out, k) = x.shape[0], (values.shape[0], x.shape[1])
    if (x.is_cuda and rows * out * k > 0 and requested_backend() == "auto"
            and choose("nm_linear", x.device, x.dtype, _DTYPES) == "triton"):
        key = ("nm_linear", x.device, x.dtype, n, m, 1 << (rows - 1).bit_length(), out, k,
               bias is not None, training)
        default = "cublas" if rows >= NM_UNMEASURED_CUBLAS_FROM_M else "triton"
        return fastest(key, _cuda_candidates(x, values, meta, bias, n, m, training), default, x.device)
    return launch("nm_linear", "nm_linear", _DTYPES, x, x, values, meta, bias, n, m)


@nm_linear.register_fake
def _(x, values, meta, bias, n, m, training=False):
    return x.new_empty((x.shape[0], values.shape[0]))


@torch.library.custom_op("sparqle::nm_to_dense", mutates_args=())
def nm_to_dense(values: torch.Tensor, meta: torch.Tensor, n: int, m: int, k: int) -> torch.Tensor:
    return launch("nm_linear", "to_dense", _TO_DENSE_DTYPES, values, values, meta, n, m, k)


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
    x, values, meta, bias, n, m, _ = inputs
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
    return grad_x, grad_values, None, grad_bias, None, None, None


register_autograd(nm_linear, _backward, _setup_context)
