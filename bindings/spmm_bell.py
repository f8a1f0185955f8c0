"""sparqle::bell_linear (x @ A^T + bias for a Blocked-ELL A) and its gradient ops
sparqle::bell_matmul and sparqle::sddmm_bell.

bell_linear(x, ell_cols, values, bias, out_features) -> y [n, m] = x [n, k] @ A^T + bias
    for A [m = out_features, k], bias [m] or None, the bias added in the kernel's epilogue.
bell_matmul(x, t_ell_cols, t_slots, values, k) -> y [n, k] = x [n, m] @ A, over A^T's
    block structure (t_ell_cols, t_slots).
sddmm_bell(ell_cols, dy, x, b) -> [R, W, b, b]: dy^T @ x at A's stored blocks

Gradients of y = x @ A^T + bias: dx = dy @ A (bell_matmul); dvalues = sddmm_bell(dy, x);
dbias = dy.sum(0). A^T's block structure is not an argument: the backward derives it from
ell_cols with the format's codec (sparqle.formats.bell.transposed_structure), kept while
ell_cols lives and is unchanged (sparqle.kernels._derived). Its width is exact where a
host sync is allowed (eager, no CUDA graph being captured) and the static bound (the
block-rows of A, unused slots skipped by the kernel) where none is (torch.compile's
tracing, CUDA-graph capture).
bell_matmul and sddmm_bell have no derivative: a second derivative raises.
The ops trust their inputs: sparqle.spmm and sparqle.linear check them first.
"""
from typing import Optional

import torch

from sparqle.formats._checks import cdiv
from sparqle.formats.bell import transposed_structure
from sparqle.kernels._capture import host_reads_allowed
from sparqle.kernels._derived import derived, kept

from ._autograd import register_autograd
from ._backend import FLOATS, launch
from ._weight_op import define_weight_op

DTYPES = {"triton": FLOATS, "torch": FLOATS}


def bell_linear_forward(x: torch.Tensor, ell_cols: torch.Tensor, values: torch.Tensor,
                        bias: Optional[torch.Tensor], out_features: int) -> torch.Tensor:
    return launch("spmm_bell", "bell_linear", DTYPES, x, x, ell_cols, values, bias, out_features)


bell_linear = define_weight_op(bell_linear_forward, lambda ell_cols, values, bias, out_features: out_features)


@torch.library.custom_op("sparqle::bell_matmul", mutates_args=())
def bell_matmul(x: torch.Tensor, t_ell_cols: torch.Tensor, t_slots: torch.Tensor,
                values: torch.Tensor, k: int) -> torch.Tensor:
    return launch("spmm_bell", "bell_matmul", DTYPES, x, x, t_ell_cols, t_slots, values, k)


@bell_matmul.register_fake
def _(x, t_ell_cols, t_slots, values, k):
    return x.new_empty((x.shape[0], k))


@torch.library.custom_op("sparqle::sddmm_bell", mutates_args=())
def sddmm_bell(ell_cols: torch.Tensor, dy: torch.Tensor, x: torch.Tensor, b: int) -> torch.Tensor:
    return launch("spmm_bell", "sddmm_bell", DTYPES, dy, ell_cols, dy, x, b)


@sddmm_bell.register_fake
def _(ell_cols, dy, x, b):
    return dy.new_empty((ell_cols.shape[0], ell_cols.shape[1], b, b))


def _second_derivative(ctx, *grads):
    raise NotImplementedError(
        "sparqle: second derivatives (double backward) through a Blocked-ELL weight are not "
        "supported: sparqle::bell_matmul and sparqle::sddmm_bell, the gradient ops, have no "
        "derivative. Use the dense weight (w.to_dense()) where a second derivative is needed.")


for _op in (bell_matmul, sddmm_bell):
    register_autograd(_op, _second_derivative, lambda ctx, inputs, output: None)


def _transposed(ell_cols: torch.Tensor, k: int, b: int):
    """A^T's block structure (t_ell_cols, t_slots): the exact width where the host may read
    it, else the one kept from an eager call before (a CUDA graph captured after warm-up
    replays it), else the static bound (see sparqle.formats.bell.transposed_structure)."""
    exact = host_reads_allowed()
    if not exact:
        warm = kept("bell_transposed_exact", ell_cols)
        if warm is not None:
            return warm
    return derived("bell_transposed_exact" if exact else "bell_transposed_bound",
                   lambda: transposed_structure(ell_cols, cdiv(k, b), exact), ell_cols)


def _setup_context(ctx, inputs, output):
    x, ell_cols, values, bias, out_features = inputs
    ctx.save_for_backward(x, ell_cols, values)


def _backward(ctx, grad):
    x, ell_cols, values = ctx.saved_tensors
    k, b = x.shape[1], values.shape[-1]
    grad_x = grad_values = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.sparqle.bell_matmul(grad, *_transposed(ell_cols, k, b), values, k)
    if ctx.needs_input_grad[2]:
        grad_values = torch.ops.sparqle.sddmm_bell(ell_cols, grad, x, b)
    if ctx.needs_input_grad[3]:
        grad_bias = grad.sum(0)
    return grad_x, None, grad_values, grad_bias, None


register_autograd(bell_linear, _backward, _setup_context)
