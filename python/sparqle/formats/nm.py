"""N:M semi-structured sparsity: in every group of m consecutive weights along the input
dimension, at most n are nonzero (2:4 is what sparse tensor cores accelerate), and its
layout codec, which every kernel backend imports from here.

Layout. A weight W [N, K] (out, in) in n:m keeps, in each group of m consecutive input
columns (K padded with zeros to Kp, a multiple of m), n values: ``values`` [N, Kc],
Kc = Kp * n / m, the kept values of group g at columns [g*n, (g+1)*n) in increasing
position. The position of kept value j inside its group (0..m-1) is stored in ``meta``
int32 [N, ceil(Kc / P)], BITS = ``index_bits(m)`` bits each (2 for m <= 4, 4 for m = 8),
P = 32 / BITS to a word, LSB first:
position(j) = (meta[:, j // P] >> (BITS * (j % P))) & (2**BITS - 1).
For 2:4 each group of 4 gets a nibble (its first position in the low 2 bits), eight
groups (32 dense columns) a word: the per-row metadata encoding of sparse tensor cores.

Codec: ``pack_positions`` / ``unpack_positions`` (positions <-> meta), ``columns`` (the
dense column of every stored value) and ``to_dense`` (W from values and meta, in torch).
"""
from typing import Sequence, Tuple

import torch

from ._base import WeightFormat, layer_dtype
from ._checks import cdiv, check_shape, check_tensors

PATTERNS = ((1, 2), (2, 4), (1, 4), (2, 8), (4, 8))


def index_bits(m: int) -> int:
    """Bits per stored position for groups of ``m``."""
    return 2 if m <= 4 else 4


def pack_positions(positions: torch.Tensor, m: int) -> torch.Tensor:
    """meta int32 [R, ceil(Kc / P)] from positions [R, Kc] (integers in [0, m))."""
    bits = index_bits(m)
    per_word = 32 // bits
    rows, kc = positions.shape
    words = cdiv(kc, per_word)
    padded = torch.nn.functional.pad(positions.to(torch.int64), (0, words * per_word - kc))
    shifts = bits * torch.arange(per_word, device=positions.device)
    packed = (padded.view(rows, words, per_word) << shifts).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_positions(meta: torch.Tensor, m: int, kc: int) -> torch.Tensor:
    """positions int32 [R, kc]: the inverse of pack_positions."""
    bits = index_bits(m)
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=meta.device)
    fields = (meta[..., None] >> shifts) & (2**bits - 1)  # the mask drops the sign's copies
    return fields.reshape(meta.shape[0], meta.shape[1] * shifts.numel())[:, :kc]


def columns(meta: torch.Tensor, n: int, m: int, kc: int) -> torch.Tensor:
    """The dense column (in [0, Kp)) of every stored value, int64 [R, kc]."""
    group = torch.arange(kc, dtype=torch.int32, device=meta.device) // n
    return (group * m + unpack_positions(meta, m, kc)).long()


def to_dense(values: torch.Tensor, meta: torch.Tensor, n: int, m: int, k: int) -> torch.Tensor:
    """W [R, k] (contiguous, values' dtype) from the compressed form."""
    rows, kc = values.shape
    dense = values.new_zeros(rows, kc // n * m)
    dense.scatter_(1, columns(meta, n, m, kc), values)
    return dense[:, :k].contiguous()


def check_pattern(n, m) -> Tuple[int, int]:
    """(n, m) as ints, one of PATTERNS."""
    for name, v in (("n", n), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if n >= m:
        raise ValueError(f"n must be smaller than m, got n={n}, m={m}")
    if (n, m) not in PATTERNS:
        raise ValueError(f"n:m = {n}:{m} is not supported; choose one of "
                         f"{[f'{a}:{b}' for a, b in PATTERNS]}")
    return n, m


def _grouped(t: torch.Tensor, m: int) -> torch.Tensor:
    """t [R, K] padded with zeros (False) to a multiple of m, as [R, K / m, m]."""
    rows, k = t.shape
    return torch.nn.functional.pad(t, (0, cdiv(k, m) * m - k)).view(rows, cdiv(k, m), m)


class SemiStructured(WeightFormat):
    """A [out, in] weight in n:m semi-structured form (see the module doc).
    Attributes: ``values`` [out, Kc], ``meta`` int32 [out, ceil(Kc * BITS / 32)], ``n``,
    ``m``, ``shape``. ``to(dtype=)`` casts ``values`` (stored in the layer's float dtype);
    ``meta`` stays int32."""

    tensor_names = ("values", "meta")
    setting_names = ("shape", "n", "m")
    dtype_follows = {"values": layer_dtype}
    repr_names = ("pattern",)

    def __init__(self, values: torch.Tensor, meta: torch.Tensor, shape: Sequence[int],
                 n: int = 2, m: int = 4):
        n, m = check_pattern(n, m)
        shape = check_shape("SemiStructured", shape)
        check_tensors("SemiStructured", {"meta": meta}, values)
        rows, k = shape
        kc = cdiv(k, m) * n
        if tuple(values.shape) != (rows, kc):
            raise ValueError(f"SemiStructured: values must have shape {(rows, kc)} "
                             f"(out, ceil(in / m) * n) for shape {shape} and {n}:{m}, got "
                             f"{tuple(values.shape)}")
        words = cdiv(kc * index_bits(m), 32)
        if meta.dtype != torch.int32 or tuple(meta.shape) != (rows, words):
            raise ValueError(f"SemiStructured: meta must be int32 of shape {(rows, words)}, got "
                             f"{meta.dtype} {tuple(meta.shape)}")
        positions = unpack_positions(meta, m, kc).view(rows, kc // n, n)
        if not torch.equal(pack_positions(positions.view(rows, kc), m), meta):
            raise ValueError("SemiStructured: meta has bits set past the last stored value")
        if bool((positions >= m).any()) or bool((positions[..., 1:] <= positions[..., :-1]).any()):
            raise ValueError(f"SemiStructured: meta's positions must increase strictly inside "
                             f"each group and lie in [0, {m})")
        padding = (positions.view(rows, kc) + torch.arange(kc, device=meta.device) // n * m) >= k
        if bool((values[padding] != 0).any()):
            raise ValueError("SemiStructured: values at padded columns (>= in) must be zero")
        self._fill(values=values, meta=meta, shape=shape, n=n, m=m)

    @classmethod
    def from_dense(cls, w: torch.Tensor, n: int = 2, m: int = 4) -> "SemiStructured":
        """Keep, in each group of m along dim 1 of 2-D ``w``, the n entries of largest |w|
        (ties: the lower index)."""
        n, m = check_pattern(n, m)
        _check_weight(w)
        return cls._compress(w, keep_top_n(w, n, m), n, m)

    @classmethod
    def from_mask(cls, w: torch.Tensor, mask: torch.Tensor, n: int = 2, m: int = 4) -> "SemiStructured":
        """Keep the entries of 2-D ``w`` where the bool ``mask`` (w's shape) is True; every
        group of m along dim 1 must have at most n of them. Entries outside it are zeroed."""
        n, m = check_pattern(n, m)
        _check_weight(w)
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != w.shape:
            raise ValueError(f"mask must be a bool tensor of shape {tuple(w.shape)}, got "
                             f"{getattr(mask, 'dtype', type(mask).__name__)} "
                             f"{tuple(getattr(mask, 'shape', ()))}")
        if mask.device != w.device:
            raise ValueError(f"mask is on {mask.device} but w is on {w.device}")
        per_group = _grouped(mask, m).sum(-1)
        if bool((per_group > n).any()):
            row, group = (per_group > n).nonzero()[0].tolist()
            raise ValueError(f"mask is not {n}:{m}: row {row}, columns {group * m}..{group * m + m - 1} "
                             f"keep {int(per_group[row, group])} entries, more than {n}")
        return cls._compress(w, mask, n, m)

    @classmethod
    def _compress(cls, w: torch.Tensor, keep: torch.Tensor, n: int, m: int) -> "SemiStructured":
        """Store the entries of ``keep`` (at most n a group) and, to fill each group's n
        slots, its lowest-positioned other entries, zeroed."""
        rows, kc = w.shape[0], cdiv(w.shape[1], m) * n
        groups = _grouped(keep, m)
        # Kept slots first, then the others, each in increasing position; take n, sort.
        order = torch.sort((~groups).to(torch.int8), dim=-1, stable=True).indices[..., :n]
        positions = torch.sort(order, dim=-1).values
        values = _grouped(w.detach(), m).gather(-1, positions)
        values = torch.where(groups.gather(-1, positions), values, 0)
        return cls._trusted(values=values.reshape(rows, kc).contiguous(),
                            meta=pack_positions(positions.reshape(rows, kc), m), shape=w.shape, n=n, m=m)

    @property
    def pattern(self) -> str:
        """The pattern as "n:m"."""
        return f"{self.n}:{self.m}"

    @property
    def density(self) -> float:
        """The fraction of stored values, n / m (zeros stored in a group count)."""
        return self.n / self.m

    def to_dense(self) -> torch.Tensor:
        """W [out, in] in values' dtype."""
        return torch.ops.sparqle.nm_to_dense(self.values, self.meta, self.n, self.m, self.shape[1])


def _check_weight(w) -> None:
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise TypeError(f"w must be a floating-point tensor, got "
                        f"{w.dtype if isinstance(w, torch.Tensor) else type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D [out, in], got shape {tuple(w.shape)}")


def keep_top_n(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The bool mask of the n entries of largest |w| in each group of m along dim 1 (ties:
    the lower index)."""
    if not bool(torch.isfinite(w).all()):
        raise ValueError("w holds NaN or Inf: its magnitudes cannot be ranked")
    rows, k = w.shape
    groups = _grouped(w.detach().abs(), m)
    # A stable descending sort keeps the lower index first among equal magnitudes.
    top = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :n]
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return keep.view(rows, groups.shape[1] * m)[:, :k]
