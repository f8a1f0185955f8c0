"""Blocked-ELL: block sparsity that tensor cores can use.

An [m, k] matrix is cut into b x b blocks (b in 16, 32, 64, 128; m and k are padded up to
multiples of b inside, never visibly). Block-row r keeps W slots, W being the most nonzero
blocks in any block-row: slot s holds the block at block-column ``ell_cols[r, s]`` with
entries ``values[r, s]`` (row-major), or is unused (``ell_cols[r, s] = -1``, values ignored),
as cuSPARSE's Blocked-ELL does. Used slots come first in a block-row, by block-column.

The kernels take block-rows in :func:`row_schedule`'s order (the longest first) and visit
only the slots up to each block-row's last used one; they derive it once per ``ell_cols``
and keep it (sparqle.kernels._derived), so the format holds no extra tensor.
"""
from typing import Optional, Sequence, Tuple

import torch

from ._base import WeightFormat, layer_dtype
from ._checks import cdiv, check_int32, check_shape, check_tensors, dense_and_mask
from .csr import longest_first

BLOCK_SIZES = (16, 32, 64, 128)


def check_block_size(block_size, name: str = "block_size") -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size not in BLOCK_SIZES:
        raise ValueError(f"{name} must be one of {BLOCK_SIZES}, got {block_size!r}")
    return block_size


def block_sums(t: torch.Tensor, b: int) -> torch.Tensor:
    """The sum over each b x b block of 2-D ``t`` (zero-padded), in float32:
    [ceil(m/b), ceil(k/b)]."""
    m, k = t.shape
    padded = torch.nn.functional.pad(t.detach().float(), (0, cdiv(k, b) * b - k, 0, cdiv(m, b) * b - m))
    return padded.view(cdiv(m, b), b, cdiv(k, b), b).sum((1, 3))


def row_schedule(ell_cols: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(order [R], slots [R]), int32, for a block structure ``ell_cols`` [R, W] (-1: unused):
    ``slots[r]`` is 1 + the last used slot of block-row r (0 for none), the slots a kernel
    must visit, which is its stored-block count where used slots come first (as from_dense
    and transposed_structure lay them out); ``order`` lists the block-rows by ``slots``,
    longest first (ties in natural order; :func:`sparqle.formats.csr.longest_first`). On
    the device, with no host sync."""
    rows, width = ell_cols.shape
    position = torch.arange(1, width + 1, dtype=torch.int32, device=ell_cols.device)
    slots = torch.where(ell_cols >= 0, position, 0).amax(dim=1) if width else ell_cols.new_zeros(rows)
    return longest_first(slots), slots.to(torch.int32)


def transposed_structure(ell_cols: torch.Tensor, block_cols: int,
                         exact: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(t_ell_cols, t_slots) [block_cols, W_t], int32: A^T's block structure for A of block
    structure ``ell_cols`` [R, W] with ``block_cols`` block-columns. Block-row c of A^T
    lists, in order, the block-rows r of A with a stored block in block-column c
    (``t_ell_cols[c, s] = r``) and that block's flat slot index ``r * W + s'`` in
    ``values.view(-1, b, b)`` (``t_slots``); used slots come first, unused ones hold -1.

    W_t, the most blocks in a block-column of A, is data-dependent: ``exact`` reads it on
    the host (a device sync); otherwise W_t is its static bound R (a block-column has at
    most one block per block-row), so that no value is read on the host, as torch.compile's
    tracing and CUDA-graph capture require. Used slots come first, so the kernels' loops
    stop at each block-row's last one (:func:`row_schedule`) and never visit the bound's
    padding; the bound costs only its size (R slots per block-row of A^T instead of W_t):
    the backward asks for the exact width wherever a sync is allowed."""
    rows, width = ell_cols.shape
    device = ell_cols.device
    flat = ell_cols.flatten().long()
    key = torch.where(flat >= 0, flat, block_cols)              # unused slots: a spill block-column
    order = torch.argsort(key, stable=True)                      # by block-column, then slot
    key = key[order]
    counts = torch.zeros(block_cols + 1, dtype=torch.int64, device=device).scatter_add_(
        0, key, torch.ones_like(key))
    position = torch.arange(key.numel(), device=device) - (torch.cumsum(counts, 0) - counts)[key]
    # Used slots land at [column, position] (position < R: no block-column twice in a
    # block-row); unused ones all in one spill entry past the end, dropped.
    target = torch.where(key < block_cols, key * rows + position, block_cols * rows)
    t_ell_cols = torch.full((block_cols * rows + 1,), -1, dtype=torch.int32, device=device)
    t_slots = torch.full_like(t_ell_cols, -1)
    t_ell_cols[target] = (order // max(1, width)).to(torch.int32)
    t_slots[target] = order.to(torch.int32)
    t_width = (int(counts[:block_cols].max()) if block_cols else 0) if exact else rows
    return tuple(t[:-1].view(block_cols, rows)[:, :t_width].contiguous() for t in (t_ell_cols, t_slots))


class BlockedELL(WeightFormat):
    """A sparse [m, k] matrix of b x b blocks in Blocked-ELL form.

    Args:
        ell_cols: integer [ceil(m/b), W]: block-column of each slot, -1 for unused;
            no block-column twice in one block-row.
        values: floating [ceil(m/b), W, b, b].
        shape: (m, k).
    Attributes: ``block_size``, ``ell_cols`` (int32), ``values``, ``shape``. ``to(dtype=)``
    casts ``values`` (stored in the layer's float dtype); ``ell_cols`` stays int32.
    """

    tensor_names = ("ell_cols", "values")
    setting_names = ("shape",)
    dtype_follows = {"values": layer_dtype}
    repr_names = ("block_size", "width", "density")

    def __init__(self, ell_cols: torch.Tensor, values: torch.Tensor, shape: Sequence[int]):
        shape = check_shape("BlockedELL", shape)
        check_tensors("BlockedELL", {"ell_cols": ell_cols}, values)
        if values.dim() != 4 or values.shape[2] != values.shape[3]:
            raise ValueError(f"BlockedELL: values must have shape [block_rows, width, b, b], "
                             f"got {tuple(values.shape)}")
        b = check_block_size(values.shape[-1], "values.shape[-1] (the block size)")
        m, k = shape
        expected = (cdiv(m, b), values.shape[1])
        if tuple(ell_cols.shape) != expected:
            raise ValueError(f"BlockedELL: ell_cols must have shape {expected} (ceil(m / b), width) "
                             f"for shape {shape}, block size {b} and values {tuple(values.shape)}, "
                             f"got {tuple(ell_cols.shape)}")
        if values.shape[0] != cdiv(m, b):
            raise ValueError(f"BlockedELL: values must have ceil(m / b) = {cdiv(m, b)} block-rows for "
                             f"shape {shape} and block size {b}, got {tuple(values.shape)}")
        if ell_cols.numel() > 0:
            lo, hi = int(ell_cols.min()), int(ell_cols.max())
            if lo < -1 or hi >= cdiv(k, b):
                raise ValueError(f"BlockedELL: ell_cols must lie in [-1, {cdiv(k, b)}) (block "
                                 f"columns of {k} columns), got [{lo}, {hi}]")
            check_int32("BlockedELL", "ell_cols", hi)
            ordered = ell_cols.sort(dim=1).values
            if bool(((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any()):
                raise ValueError("BlockedELL: ell_cols repeats a block-column within a block-row")
        self._fill(ell_cols=ell_cols.to(torch.int32), values=values, shape=shape)

    @classmethod
    def from_dense(cls, t: torch.Tensor, block_size: int = 32,
                   mask: Optional[torch.Tensor] = None) -> "BlockedELL":
        """The b x b blocks of 2-D ``t`` that hold a nonzero (or, with a bool ``mask`` of
        t's shape, a True entry; entries outside the mask are zeroed)."""
        b = check_block_size(block_size)
        mask = dense_and_mask("BlockedELL.from_dense", t, mask)
        m, k = t.shape
        rows, cols = cdiv(m, b), cdiv(k, b)
        pad = (0, cols * b - k, 0, rows * b - m)
        blocks = torch.nn.functional.pad(t.detach().masked_fill(~mask, 0), pad)
        blocks = blocks.view(rows, b, cols, b).permute(0, 2, 1, 3)        # [R, C, b, b]
        keep = torch.nn.functional.pad(mask, pad).view(rows, b, cols, b).any(3).any(1)  # [R, C]
        width = int(keep.sum(1).max()) if keep.numel() else 0
        # Kept block-columns first, in order: sort by (not kept, column).
        order = torch.argsort((~keep).to(torch.int64) * cols + torch.arange(cols, device=t.device), dim=1)
        order = order[:, :width]
        kept = torch.gather(keep, 1, order)
        ell_cols = torch.where(kept, order, torch.full_like(order, -1))
        values = blocks[torch.arange(rows, device=t.device)[:, None], order]  # [R, W, b, b]
        values = values * kept[..., None, None]
        return cls(ell_cols, values.contiguous(), (m, k))

    def to_dense(self) -> torch.Tensor:
        m, k = self.shape
        b = self.block_size
        rows, cols = cdiv(m, b), cdiv(k, b)
        dense = torch.zeros(rows, cols + 1, b, b, dtype=self.dtype, device=self.device)
        target = torch.where(self.ell_cols >= 0, self.ell_cols, cols).long()  # unused -> spill column
        dense[torch.arange(rows, device=self.device)[:, None], target] = self.values
        return dense[:, :cols].permute(0, 2, 1, 3).reshape(rows * b, cols * b)[:m, :k]

    @property
    def block_size(self) -> int:
        return self.values.shape[-1]

    @property
    def width(self) -> int:
        """W, the slots of a block-row."""
        return self.ell_cols.shape[1]

    @property
    def nnz_blocks(self) -> int:
        return int((self.ell_cols >= 0).sum())

    @property
    def density(self) -> float:
        """Stored blocks / all blocks; 0 for an empty shape."""
        b = self.block_size
        return self.nnz_blocks / max(1, cdiv(self.shape[0], b) * cdiv(self.shape[1], b))

    def transposed_structure(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(t_ell_cols, t_slots) [ceil(k/b), W_t]: block-row c of A^T lists the block-rows of
        A with a stored block in block-column c, and the flat slot index of that block in
        ``values.view(-1, b, b)`` (-1 for unused), W_t exact (read on the host; see
        :func:`transposed_structure`). The gradient with respect to x of ``linear(x, self)``
        reads it; the backward keeps it while ``ell_cols`` lives."""
        return transposed_structure(self.ell_cols, cdiv(self.shape[1], self.block_size), exact=True)
