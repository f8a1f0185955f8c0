"""sparqle::int8_linear (W8A8 or W8A16 linear) and sparqle::int8_quantize_rows.

int8_linear(x, qweight, scales, bias, quantize_activation, smoothing=None) -> y [M, N]
    = x @ (q_w * scale_w)^T + bias, x quantized per row to int8 first when
    quantize_activation (W8A8), else used as is (W8A16). ``smoothing`` (W8A8 only; fp32
    [K], SmoothQuant's per-input-channel divisor s, which ``Int8Linear`` holds, not the
    format): x / s is quantized instead, the division fused into the quantizer, so
    y = (x / s) @ (q_w * scale_w)^T + bias.
int8_quantize_rows(x, static_scale) -> (q int8 [M, K], scale [M] fp32, fp64 for fp64 x)

On CUDA, ``auto`` has two ways to compute W8A8 (each the same y bit for bit as the other):
the quantizer and the Triton GEMM, against, for M <= 16, the fused kernel that quantizes
x in the GEMM's registers (one launch instead of three: ``fused_takes``), and above it,
where cuBLASLt's int8 GEMM takes the shape (``int_mm_takes``: N and K multiples of 8),
torch._int_mm with sparqle's epilogue. It times both on the first call per key (the
shape, M rounded up to a power of two, bias, smoothing) and keeps the faster
(bindings/_fastest.py), the Triton GEMM while a CUDA graph is captured before that.

Gradients (straight through): dx = dy @ (q_w * scale_w) (/ s), dbias = sum of dy; the
quantized weight and s are frozen.
"""
from typing import Optional, Tuple

import torch

from sparqle.formats._checks import compute_dtype

from ._autograd import register_row_scaled_autograd
from ._backend import FLOATS, choose, kernels, launch, requested_backend
from ._fastest import bucket, fastest
from ._weight_op import define_weight_op

DTYPES = {"triton": FLOATS - {torch.float64}, "torch": FLOATS}


def int8_linear_forward(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                        bias: Optional[torch.Tensor], quantize_activation: bool,
                        smoothing: Optional[torch.Tensor] = None) -> torch.Tensor:
    if smoothing is not None:
        _check_smoothing(smoothing, x, quantize_activation)
    if x.is_cuda and quantize_activation and requested_backend() == "auto" \
            and choose("int8_linear", x.device, x.dtype, DTYPES) == "triton":
        on_triton = kernels("triton", "int8_linear")
        rows, (out, k) = x.shape[0], qweight.shape
        candidates = {"triton": lambda: on_triton.int8_linear(x, qweight, scales, bias, True, smoothing)}
        if on_triton.fused_takes(rows, k):
            candidates["fused"] = lambda: on_triton.quantize_linear(x, qweight, scales, bias, smoothing)
        elif on_triton.int_mm_takes(rows, out, k) and qweight.stride(1) == 1:
            candidates["int_mm"] = lambda: on_triton.int_mm_linear(x, qweight, scales, bias, smoothing)
        if len(candidates) > 1:
            key = ("int8_linear", x.device, x.dtype, bucket(rows), out, k,
                   bias is not None, smoothing is not None)
            return fastest(key, candidates, "triton", x.device)
    return launch("int8_linear", "int8_linear", DTYPES, x, x, qweight, scales, bias, quantize_activation, smoothing)


def _check_smoothing(smoothing: torch.Tensor, x: torch.Tensor, quantize_activation: bool) -> None:
    """The per-call checks of ``smoothing`` (shape, dtype, device: nothing that reads its
    values; Int8Linear checks those, finite and > 0, when it is built or loaded)."""
    if not quantize_activation:
        raise ValueError("smoothing divides the activations that W8A8 quantizes: it needs quantize_activation")
    if smoothing.dtype != torch.float32 or tuple(smoothing.shape) != (x.shape[1],) or smoothing.device != x.device:
        raise ValueError(f"smoothing must be a float32 [{x.shape[1]}] tensor on {x.device}, got "
                         f"{smoothing.dtype} {tuple(smoothing.shape)} on {smoothing.device}")


int8_linear = define_weight_op(int8_linear_forward, lambda qweight, *_: qweight.shape[0])


@torch.library.custom_op("sparqle::int8_quantize_rows", mutates_args=())
def int8_quantize_rows(x: torch.Tensor, static_scale: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    return launch("int8_linear", "quantize_rows", DTYPES, x, x, static_scale)


@int8_quantize_rows.register_fake
def _(x, static_scale):
    return (x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[0],), dtype=compute_dtype(x.dtype)))


register_row_scaled_autograd(int8_linear, smoothing_at=5)
