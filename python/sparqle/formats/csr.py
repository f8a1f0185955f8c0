"""Compressed sparse row (CSR) matrices, with the row swizzle the kernels use.

Row r of an [m, k] matrix holds ``values[crow[r]:crow[r+1]]`` at columns
``col_indices[crow[r]:crow[r+1]]``, as in torch.sparse_csr and scipy.sparse.csr_matrix;
repeated columns in a row add up. ``row_order`` lists the rows by nonzero count,
longest first (ties in natural order): SpMM kernels take rows in that order so that
the long rows start first and the short ones fill the tail.

The kernels read the column indices as 16-bit values where they fit and x is 16-bit
(:func:`reads_u16_col_indices`): :func:`u16_col_indices` narrows them, a copy the kernels
keep per index tensor (sparqle.kernels._derived); the format itself holds int32.
"""
from typing import Optional, Sequence, Tuple

import torch

from ._base import WeightFormat, layer_dtype
from ._checks import INT32_MAX, check_int32, check_shape, check_tensors, dense_and_mask
from ._sparse import csr_matrix


# Column indices below this fit 16 bits read unsigned.
U16_COLUMNS = 1 << 16


def reads_u16_col_indices(dtype: torch.dtype, k: int) -> bool:
    """Whether the CSR kernels read 16-bit column indices for A [m, k] times x of ``dtype``:
    for fp16 and bf16 x (a nonzero then costs 2 bytes of value and 2 of index instead of 2
    and 4) where every column fits, k <= 65536."""
    return dtype in (torch.float16, torch.bfloat16) and k <= U16_COLUMNS


def u16_col_indices(col: torch.Tensor) -> torch.Tensor:
    """int16 [nnz]: the low 16 bits of int32 ``col`` [nnz], which kernels read as unsigned
    16-bit values (exact for columns in [0, 65536)): half the bytes of ``col``."""
    # The low halves of little-endian int32.
    return col.contiguous().view(torch.int16).view(-1, 2)[:, 0].contiguous()


def longest_first(counts: torch.Tensor) -> torch.Tensor:
    """int32: the indices of ``counts`` (work per row) by count, largest first, ties in
    natural order: the order in which SpMM programs take rows so that the long ones start
    first and the short ones fill the tail."""
    return torch.argsort(counts, descending=True, stable=True).to(torch.int32)


def _row_order(crow: torch.Tensor) -> torch.Tensor:
    return longest_first(crow[1:] - crow[:-1])


def entry_rows(crow: torch.Tensor, nnz: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """The row of each of the ``nnz`` stored entries of a CSR structure with row pointers
    ``crow``, [nnz] of ``dtype`` on crow's device; nnz is given (col.numel()), so nothing
    is read on the host."""
    return torch.repeat_interleave(torch.arange(crow.numel() - 1, dtype=dtype, device=crow.device),
                                   crow[1:] - crow[:-1], output_size=nnz)


def transposed_structure(crow: torch.Tensor, col: torch.Tensor, k: int) -> Tuple[torch.Tensor, ...]:
    """(t_crow [k+1], t_col [nnz], t_perm [nnz], t_row_order [k]), int32: the CSR structure of
    A^T [k, m] for A [m, k] of structure (crow, col), whose values are ``values[t_perm]``.
    Entries of a column of A keep their order in A (by row). No host sync (CUDA-graph
    capture and torch.compile's tracing allow none): nnz is ``col.numel()``, the rest is
    computed on the device."""
    rows = entry_rows(crow, col.numel(), torch.int32)
    perm = torch.argsort(col, stable=True)
    # Row c of A^T starts at the count of columns < c: a search in the sorted columns.
    t_crow = torch.searchsorted(col[perm], torch.arange(k + 1, dtype=col.dtype, device=col.device),
                                out_int32=True)
    return t_crow, rows[perm], perm.to(torch.int32), _row_order(t_crow)


def columns_increase(crow: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """A bool 0-d tensor: whether the columns of every row increase strictly (sorted, no
    repeats), as ``from_dense`` and pruning make them; computed on the device."""
    rows = entry_rows(crow, col.numel())
    return ((rows[1:] != rows[:-1]) | (col[1:] > col[:-1])).all()


BITMAP_COLUMNS = 32  # the columns of a bitmap word (bitmap_structure)


def bitmap_structure(crow: torch.Tensor, col: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(words, starts), int32 [m, ceil(k / 32)] each, for A [m, k] of structure (crow, col):
    bit j of words[r, c] is set where A[r, 32 c + j] is stored, and starts[r, c] is the
    position in ``values`` of row r's first entry at or after column 32 c, so the entry at
    column 32 c + j is values[starts[r, c] + (the set bits of words[r, c] below j)]. The
    values stay where CSR keeps them: the pair adds 8 bytes per row and 32 columns (a
    quarter of a byte per dense entry) for a kernel that rebuilds dense tiles of A to
    multiply them on tensor cores. It describes A only where each row's columns increase
    strictly (``columns_increase``; CSR also allows them unsorted and repeated, adding up).
    No host sync: nnz is ``col.numel()``."""
    m = crow.numel() - 1
    chunks = -(-k // BITMAP_COLUMNS)
    rows = entry_rows(crow, col.numel())
    col = col.to(torch.int64)
    slot = rows * chunks + col // BITMAP_COLUMNS
    bits = torch.zeros(m * chunks, dtype=torch.int64, device=col.device)
    bits.index_add_(0, slot, torch.ones_like(col) << (col % BITMAP_COLUMNS))   # distinct bits: a sum is an OR
    words = torch.where(bits >= 2 ** 31, bits - 2 ** 32, bits).to(torch.int32)
    counts = torch.zeros(m * chunks, dtype=torch.int64, device=col.device)
    counts.index_add_(0, slot, torch.ones_like(col))
    counts = counts.view(m, chunks)
    starts = crow[:-1, None].to(torch.int64) + counts.cumsum(1) - counts
    return words.view(m, chunks), starts.to(torch.int32)


class CSR(WeightFormat):
    """A sparse [m, k] matrix in CSR form.

    Args:
        crow_indices: integer [m + 1], 0 first, non-decreasing, nnz last.
        col_indices: integer [nnz], each in [0, k).
        values: floating [nnz].
        shape: (m, k).
    Indices are stored as int32. Attributes: ``crow_indices``, ``col_indices``,
    ``values``, ``shape``, ``row_order`` (int32 [m]). ``to(dtype=)`` casts ``values`` (stored
    in the layer's float dtype); the indices stay int32.
    """

    tensor_names = ("crow_indices", "col_indices", "values", "row_order")
    setting_names = ("shape",)
    dtype_follows = {"values": layer_dtype}
    repr_names = ("nnz", "density")

    def __init__(self, crow_indices: torch.Tensor, col_indices: torch.Tensor,
                 values: torch.Tensor, shape: Sequence[int]):
        shape = check_shape("CSR", shape)
        m, k = shape
        check_tensors("CSR", {"crow_indices": crow_indices, "col_indices": col_indices}, values)
        for name, t in (("crow_indices", crow_indices), ("col_indices", col_indices),
                        ("values", values)):
            if t.dim() != 1:
                raise ValueError(f"CSR: {name} must be 1-D, got shape {tuple(t.shape)}")
        nnz = values.numel()
        if crow_indices.numel() != m + 1:
            raise ValueError(f"CSR: crow_indices must have shape[0] + 1 = {m + 1} entries, "
                             f"got {crow_indices.numel()}")
        if col_indices.numel() != nnz:
            raise ValueError(f"CSR: col_indices has {col_indices.numel()} entries but values "
                             f"has {nnz}; they must match")
        if nnz > INT32_MAX:
            raise ValueError(f"CSR: {nnz} nonzeros do not fit int32 indices")
        if int(crow_indices[0]) != 0 or int(crow_indices[-1]) != nnz:
            raise ValueError(f"CSR: crow_indices must start at 0 and end at nnz = {nnz}, got "
                             f"{int(crow_indices[0])} and {int(crow_indices[-1])}")
        if m > 0 and bool((crow_indices[1:] < crow_indices[:-1]).any()):
            raise ValueError("CSR: crow_indices must be non-decreasing")
        if nnz > 0:
            lo, hi = int(col_indices.min()), int(col_indices.max())
            if lo < 0 or hi >= k:
                raise ValueError(f"CSR: col_indices must lie in [0, {k}) for shape {shape}, got "
                                 f"[{lo}, {hi}]")
            check_int32("CSR", "col_indices", hi)
        crow = crow_indices.to(torch.int32)
        self._fill(crow_indices=crow, col_indices=col_indices.to(torch.int32), values=values,
                   row_order=_row_order(crow), shape=shape)

    @classmethod
    def from_dense(cls, t: torch.Tensor, mask: Optional[torch.Tensor] = None) -> "CSR":
        """The entries of 2-D ``t`` where ``mask`` is True (default: where t != 0)."""
        mask = dense_and_mask("CSR.from_dense", t, mask)
        counts = mask.sum(dim=1)
        crow = torch.zeros(t.shape[0] + 1, dtype=torch.int64, device=t.device)
        torch.cumsum(counts, dim=0, out=crow[1:])
        rows, cols = mask.nonzero(as_tuple=True)
        return cls(crow, cols, t[rows, cols].detach().clone(), t.shape)

    @classmethod
    def from_sparse_csr(cls, t: torch.Tensor) -> "CSR":
        """From a ``torch.sparse_csr`` tensor."""
        if not isinstance(t, torch.Tensor) or t.layout != torch.sparse_csr:
            raise TypeError(f"CSR.from_sparse_csr: t must have layout torch.sparse_csr, got "
                            f"{t.layout if isinstance(t, torch.Tensor) else type(t).__name__}")
        return cls(t.crow_indices(), t.col_indices(), t.values(), t.shape)

    def to_sparse_csr(self) -> torch.Tensor:
        """The same matrix as a torch.sparse_csr tensor over the same tensors (no copy)."""
        return csr_matrix(self.crow_indices, self.col_indices, self.values, self.shape)

    def to_dense(self) -> torch.Tensor:
        m, k = self.shape
        rows = entry_rows(self.crow_indices, self.nnz)
        dense = torch.zeros(m, k, dtype=self.values.dtype, device=self.values.device)
        return dense.index_put((rows, self.col_indices.long()), self.values, accumulate=True)

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def density(self) -> float:
        """nnz / (m * k); 0 for an empty shape."""
        return self.nnz / max(1, self.shape[0] * self.shape[1])

    def transposed_structure(self) -> Tuple[torch.Tensor, ...]:
        """(crow, col, perm, row_order) of A^T, whose values are ``values[perm]``: the
        gradient with respect to x of ``linear(x, self)`` reads it (see
        :func:`transposed_structure`; the backward keeps it while A's indices live)."""
        return transposed_structure(self.crow_indices, self.col_indices, self.shape[1])
