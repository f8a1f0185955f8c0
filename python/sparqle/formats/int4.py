"""int4 weights with a scale and a zero point per group of input channels (W4A16).

W [N, K] (out, in) is cut along K into groups of ``group_size`` consecutive channels (the
last group may be partial; ``group_size=-1``: one group per row). Per group,
w ~= (q - zero) * scale with q in [0, 15]:

- asymmetric (default): lo = min(w, 0), hi = max(w, 0), scale = (hi - lo) / 15,
  zero = clamp(round(-lo / scale), 0, 15); taking 0 into the range keeps 0 exact.
- symmetric: scale = max|w| / 7, zero = 8.
- ``method="mse"``: lo and hi (or max|w|) are shrunk by the factor in CLIP_RATIOS that
  gives the group the least squared error; factor 1 is min-max, so it is never worse.
- ``method="hqq"`` (half-quadratic quantization, Badri & Shaji 2023; no data): from the
  min-max grid, HQQ_ITERS rounds of: the error e = w - (q - zero) scale, measured in steps
  (e / scale), is split by the proximal operator of the l_p norm, p = HQQ_P < 1,
  shrink(e) = sign(e) max(|e| - |e|^(p-1) / beta, 0): the errors it keeps are outliers the
  grid gives up on, the rest (t = w - shrink(e) scale) it fits: zero = mean(q - t / scale)
  over the group (the least-squares zero point; asymmetric only, clamped to [0, 15] and
  not rounded: it is stored as a float), then scale = <t, q - zero> / |q - zero|^2, q
  rounded again, beta *= HQQ_KAPPA; it stops early when no group's error fell. Each group
  keeps the iterate (min-max included) of least squared error, so it is never worse than
  min-max.

q = clamp(round(w / scale + zero), 0, 15) (an integer zero point gives round(w / scale) + zero).

Layout: ``packed`` uint8 [N, 64 ceil(K / 128)]. Byte j of a row in K order holds q[2j] in
its low nibble and q[2j + 1] in its high one (K is padded to a multiple of TILE_K = 128
with q = zero); the row is stored in tiles of 64 such bytes (128 codes), and within a tile
the byte of K order 4 i + t (i < 16, t < 4) is stored at 16 t + i (``interleave``). That is
the order in which the tensor cores' register fragments hold the codes: the thread of
quad lane t holds K-order bytes t, t + 4, t + 8, ... of a 128-code step (codes 2t, 2t + 1,
then 8 further on, in every 16-code slice of wgmma and mma.sync), so here they are its 16
contiguous bytes, one 16-byte load (docs/int4.md). ``scales`` (finite, > 0) and ``zeros``
(in [0, 15]; all 8 when symmetric) [N, ceil(K / group)] in the weight's float dtype.

Decoding (the codec every kernel backend imports): ``dequantize_block`` gives rows of
W = (q - zero) * scale, computed in fp32 (fp64 for fp64) and rounded to the dtype asked
for, as the Triton kernel does; ``dequantize`` builds the whole W block by block
(sparqle.formats._row_blocks): its transient is W and one block (unpacking the whole weight
at once held about 16x the packed bytes).
"""
from typing import Tuple

import torch

from ._base import WeightFormat, layer_dtype
from ._checks import cdiv, check_float_weight, check_scales, check_shape, compute_dtype
from ._row_blocks import dense_by_row_blocks

GROUP_SIZES = (32, 64, 128, 256, -1)
TILE_K = 128  # the codes of one interleaved tile of ``packed``: 64 bytes of a row
# The name of that layout, which Int4Linear records in its settings (a state_dict saved
# without it holds the K-order rows of earlier versions: ``from_k_order`` reads them).
PACKING = "interleaved-128"
METHODS = ("minmax", "mse", "hqq")
CLIP_RATIOS = torch.linspace(1.0, 0.5, 26).tolist()
# HQQ's l_p norm, its penalty's start and growth, and its rounds (the HQQ paper's 4-bit
# settings; beta acts on errors measured in quantization steps, so it is scale-free).
HQQ_P, HQQ_BETA, HQQ_KAPPA, HQQ_ITERS = 0.7, 10.0, 1.01, 20


def _quantize(groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """clamp(round(w / scale + zero), 0, 15), the integer part of zero added after rounding
    (so an integer zero gives exactly round(w / scale) + zero, ties included)."""
    whole = torch.round(zero)
    return torch.clamp(torch.round(groups / scale + (zero - whole)) + whole, 0, 15)


def _params(groups: torch.Tensor, symmetric: bool, ratio: float, dtype: torch.dtype):
    """Scale and zero point [N, G, 1] (scale rounded to ``dtype``, as stored)."""
    if symmetric:
        scale = groups.abs().amax(-1, keepdim=True) * ratio / 7
        zero = torch.full_like(scale, 8.0)
    else:
        lo = groups.amin(-1, keepdim=True).clamp(max=0) * ratio
        hi = groups.amax(-1, keepdim=True).clamp(min=0) * ratio
        scale = (hi - lo) / 15
    scale = scale.to(dtype).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group
    if not symmetric:
        zero = torch.clamp(torch.round(-lo / scale), 0, 15)
    return scale, zero


def _hqq(groups: torch.Tensor, symmetric: bool, dtype: torch.dtype):
    """The (scale, zero) [N, G, 1] iterates of HQQ from the min-max grid (see the module
    doc), each rounded to ``dtype`` as stored; the caller keeps each group's best."""
    scale, zero = _params(groups, symmetric, 1.0, dtype)
    yield scale, zero
    beta = HQQ_BETA
    for _ in range(HQQ_ITERS):
        q = _quantize(groups, scale, zero)
        steps = groups / scale - (q - zero)                 # the error in quantization steps
        outliers = torch.sign(steps) * torch.relu(steps.abs() - steps.abs().pow(HQQ_P - 1) / beta)
        target = groups - outliers * scale
        if not symmetric:
            zero = torch.clamp((q - target / scale).mean(-1, keepdim=True), 0, 15).to(dtype).float()
        centred = q - zero
        fitted = (target * centred).sum(-1, keepdim=True) / centred.pow(2).sum(-1, keepdim=True)
        scale = torch.where(fitted > 0, fitted, scale).to(dtype).float()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        beta *= HQQ_KAPPA
        yield scale, zero


class Int4Weight(WeightFormat):
    """A [N, K] weight in 4 bits with group-wise scales and zero points (see module doc).

    Attributes: ``packed`` (uint8 [N, packed_width(K)], in tiles interleaved as the module
    doc says), ``scales``, ``zeros`` ([N, G], float),
    ``shape`` (N, K), ``group_size`` (as given, -1 for per channel), ``group_width``
    (the channels per group: K for -1), ``symmetric`` (every zero point is 8).
    ``scales`` and ``zeros`` are stored in the layer's float dtype: ``to(dtype=)`` casts them
    (through the checked constructor: a scale that underflows in ``dtype`` is refused);
    ``packed`` stays uint8.
    """

    tensor_names = ("packed", "scales", "zeros")
    setting_names = ("shape", "group_size", "symmetric")
    dtype_follows = {"scales": layer_dtype, "zeros": layer_dtype}
    checked_to = True

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 shape, group_size: int, symmetric: bool = False):
        n, k = check_shape("Int4Weight", shape)
        check_group_size(group_size)
        if not isinstance(symmetric, bool):
            raise TypeError(f"Int4Weight: symmetric must be a bool, got {type(symmetric).__name__}")
        for name, t in (("packed", packed), ("scales", scales), ("zeros", zeros)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"Int4Weight: {name} must be a torch.Tensor, got {type(t).__name__}")
            if t.device != scales.device:
                raise ValueError(f"Int4Weight: {name} is on {t.device} but scales is on {scales.device}")
        if packed.dtype != torch.uint8:
            raise TypeError(f"Int4Weight: packed must be uint8, got {packed.dtype}")
        if not scales.is_floating_point() or zeros.dtype != scales.dtype:
            raise TypeError(f"Int4Weight: scales and zeros must share one float dtype, got "
                            f"{scales.dtype} and {zeros.dtype}")
        if tuple(packed.shape) != (n, packed_width(k)):
            raise ValueError(f"Int4Weight: packed must have shape {(n, packed_width(k))} for shape "
                             f"{(n, k)} (64 bytes per 128 input channels), got {tuple(packed.shape)}")
        groups = cdiv(k, k if group_size == -1 else group_size) if k else 0
        for name, t in (("scales", scales), ("zeros", zeros)):
            if tuple(t.shape) != (n, groups):
                raise ValueError(f"Int4Weight: {name} must have shape {(n, groups)} for shape "
                                 f"{(n, k)} and group_size {group_size}, got {tuple(t.shape)}")
        check_scales("Int4Weight", scales)
        if zeros.numel() and not bool(((zeros >= 0) & (zeros <= 15)).all()):
            bad = zeros[~((zeros >= 0) & (zeros <= 15))].flatten()[0]
            raise ValueError(f"Int4Weight: zeros must lie in [0, 15] (q is 4 bits), got {float(bad)}")
        if symmetric and zeros.numel() and not bool((zeros == 8).all()):
            raise ValueError("Int4Weight: symmetric=True needs every zero point at 8, but zeros "
                             "holds others")
        self._fill(packed=packed, scales=scales, zeros=zeros, shape=(n, k), group_size=group_size,
                   symmetric=symmetric)

    @classmethod
    def from_float(cls, w: torch.Tensor, group_size: int = 128, *, symmetric: bool = False,
                   method: str = "minmax") -> "Int4Weight":
        """Quantize a 2-D float weight [N, K] (see the module doc)."""
        check_float_weight(w)
        check_group_size(group_size)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        n, k = w.shape
        width = max(1, k if group_size == -1 else group_size)
        g = cdiv(k, width)
        groups = torch.nn.functional.pad(w.detach().float(), (0, g * width - k)).view(n, g, width)
        candidates = (_hqq(groups, symmetric, w.dtype) if method == "hqq" else
                      (_params(groups, symmetric, ratio, w.dtype)
                       for ratio in (CLIP_RATIOS if method == "mse" else [1.0])))
        best = None
        for scale, zero in candidates:
            q = _quantize(groups, scale, zero)
            err = ((q - zero) * scale - groups).pow(2).sum(-1, keepdim=True)
            if best is None:
                best = (err, q, scale, zero)
            else:
                better = err < best[0]
                best = tuple(torch.where(better, new, old)
                             for new, old in zip((err, q, scale, zero), best))
                if method == "hqq" and not bool(better.any()):
                    break  # HQQ's stopping rule: the error stopped falling
        _, q, scale, zero = best
        return cls.from_codes(q.view(n, g * width)[:, :k], scale.view(n, g).to(w.dtype),
                              zero.view(n, g).to(w.dtype), group_size, symmetric)

    @classmethod
    def from_codes(cls, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                   symmetric: bool = False) -> "Int4Weight":
        """Pack the codes ``q`` [N, K] (integers in [0, 15], any dtype) with their ``scales`` and
        ``zeros`` [N, G] (checked as the constructor checks them)."""
        if not isinstance(q, torch.Tensor) or q.dim() != 2:
            raise ValueError(f"Int4Weight.from_codes: q must be a 2-D tensor, got "
                             f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
        if q.numel() and not bool(((q >= 0) & (q <= 15) & (q == torch.round(q.double()))).all()):
            raise ValueError("Int4Weight.from_codes: q must hold integers in [0, 15]")
        n, k = q.shape
        return cls(_pack(q.to(torch.uint8), zeros), scales, zeros, (n, k), group_size, symmetric)

    @property
    def group_width(self) -> int:
        return self.shape[1] if self.group_size == -1 else self.group_size

    def unpack(self) -> torch.Tensor:
        """q, uint8 [N, K] in [0, 15]."""
        return _codes(self.packed)[:, :self.shape[1]]

    def dequantize(self) -> torch.Tensor:
        """(q - zero) * scale, [N, K] in the weight's float dtype (computed in fp32)."""
        return torch.ops.sparqle.int4_dequantize(self.packed, self.scales, self.zeros,
                                                 self.group_width, self.shape[1])


def _pack(q: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """``packed`` for the codes q uint8 [N, K], K padded with each row's last zero point."""
    n, k = q.shape
    pad = 2 * packed_width(k) - k
    if pad:
        q = torch.cat([q, zeros[:, -1:].to(torch.uint8).expand(n, pad)], dim=1)
    return interleave(q[:, 0::2] | (q[:, 1::2] << 4))


def from_k_order(rows: torch.Tensor, zeros: torch.Tensor, k: int) -> torch.Tensor:
    """``packed`` from the layout earlier versions of sparqle stored (rows of uint8
    [N, ceil(k / 2)] in K order, byte j holding q[2j] and q[2j + 1], no tiles): the same
    codes, repacked."""
    return _pack(_nibbles(rows)[:, :k], zeros)


def packed_width(k: int) -> int:
    """The bytes of a row of ``packed`` for K = ``k`` input channels: 64 per TILE_K codes."""
    return TILE_K // 2 * cdiv(k, TILE_K)


def interleave(rows: torch.Tensor) -> torch.Tensor:
    """``packed`` [R, 64 T] from its bytes in K order [R, 64 T]: in each tile of 64, the byte
    of K order 4 i + t is stored at 16 t + i (see the module doc)."""
    r, width = rows.shape
    return rows.reshape(r, width // 64, 16, 4).transpose(-1, -2).reshape(r, width).contiguous()


def deinterleave(packed: torch.Tensor) -> torch.Tensor:
    """The bytes of ``packed`` [R, 64 T] in K order (the inverse of :func:`interleave`)."""
    r, width = packed.shape
    return packed.reshape(r, width // 64, 4, 16).transpose(-1, -2).reshape(r, width)


def _nibbles(rows: torch.Tensor) -> torch.Tensor:
    """q [R, 2 W] from bytes [R, W] in K order (byte j: q[2j] low, q[2j + 1] high)."""
    return torch.stack([rows & 15, rows >> 4], dim=-1).view(rows.shape[0], 2 * rows.shape[1])


def _codes(packed: torch.Tensor) -> torch.Tensor:
    """q [R, 128 T] in K order (padding included) from ``packed`` [R, 64 T]."""
    return _nibbles(deinterleave(packed))


def dequantize_block(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     group_width: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """The rows of W = (q - zero) * scale that ``packed`` [R, packed_width(k)], ``scales``
    and ``zeros`` [R, G] hold, [R, k] in ``dtype``, computed in fp32 (fp64 for fp64)."""
    rows, groups = scales.shape
    cdt = compute_dtype(dtype)
    q = _codes(packed)[:, :k]
    q = torch.nn.functional.pad(q, (0, groups * group_width - k)).view(rows, groups, group_width)
    w = (q.to(cdt) - zeros.to(cdt)[..., None]) * scales.to(cdt)[..., None]
    return w.view(rows, groups * group_width)[:, :k].to(dtype)


def dequantize(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               group_width: int, k: int) -> torch.Tensor:
    """W [N, K] = (q - zero) * scale in the scales' dtype (contiguous), a block of rows at a
    time."""
    def rows(lo: int, hi: int) -> torch.Tensor:
        return dequantize_block(packed[lo:hi], scales[lo:hi], zeros[lo:hi], group_width, k, scales.dtype)

    return dense_by_row_blocks(packed.shape[0], k, rows, scales.dtype, packed.device)


def check_group_size(group_size) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size!r}")
    return group_size


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """10 log10(|ref|^2 / |ref - approx|^2): the signal-to-quantization-noise ratio in dB."""
    ref = reference.detach().double()
    noise = (ref - approximation.detach().double()).pow(2).sum()
    return float(10 * torch.log10(ref.pow(2).sum() / noise))


__all__: Tuple[str, ...] = ("Int4Weight", "GROUP_SIZES", "TILE_K", "sqnr_db")
