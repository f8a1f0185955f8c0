"""Autograd glue of the ops: a backward runs on the backend forced for its forward
(bindings/_backend.py), also on the autograd engine's own threads."""
import contextlib
from typing import Callable, Iterator, Optional

import torch

from sparqle.formats._row_blocks import dequantize_rows

from ._backend import _forced


def remember_backend(ctx) -> None:
    """Record on an autograd ``ctx`` the backend :func:`use_backend` forced for the forward."""
    if not torch.compiler.is_compiling():  # Dynamo does not trace a ContextVar
        ctx.forced_backend = _forced.get()


@contextlib.contextmanager
def forward_backend(ctx) -> Iterator[None]:
    """Run a backward under the backend recorded by :func:`remember_backend`: the autograd
    engine runs CUDA backwards on its own threads, which do not see the forward's context.
    A compiled backward reads the backend when it runs: there only SPARQLE_BACKEND reaches
    a CUDA backward."""
    if torch.compiler.is_compiling():
        yield
        return
    token = _forced.set(ctx.forced_backend)
    try:
        yield
    finally:
        _forced.reset(token)


def register_autograd(op, backward: Callable, setup_context: Callable) -> None:
    """``op.register_autograd(backward, setup_context=...)``, the backward run under the
    backend forced for the forward (see :func:`forward_backend`)."""
    def setup(ctx, inputs, output):
        remember_backend(ctx)
        setup_context(ctx, inputs, output)

    def run_backward(ctx, *grads):
        with forward_backend(ctx):
            return backward(ctx, *grads)

    op.register_autograd(run_backward, setup_context=setup)


def register_row_scaled_autograd(op, smoothing_at: Optional[int] = None) -> None:
    """The autograd of a linear op ``op(x, qweight, scales, bias, *static)`` whose weight is
    q_w [N, K] with a scale per row (or one per tensor), int8 or FP8: straight through the
    dequantized weight, dx = dy @ (q_w * scale_w) and dbias = sum of dy; the quantized
    weight, its scales and the static arguments are frozen (no gradient). ``smoothing_at``:
    the index of an optional input s [K] that the op divides x by (y = (x / s) @ ...), so
    that dx = dy @ (q_w * scale_w) / s."""
    def setup_context(ctx, inputs, output):
        smoothing = inputs[smoothing_at] if smoothing_at is not None and len(inputs) > smoothing_at else None
        ctx.save_for_backward(inputs[1], inputs[2], smoothing)
        ctx.static = len(inputs) - 4

    def backward(ctx, grad):
        qweight, scales, smoothing = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ dequantize_rows(qweight, scales, grad.dtype)
            if smoothing is not None:
                grad_x = grad_x / smoothing.to(grad.dtype)
        grad_bias = grad.sum(0) if ctx.needs_input_grad[3] else None
        return (grad_x, None, None, grad_bias) + (None,) * ctx.static

    register_autograd(op, backward, setup_context)
