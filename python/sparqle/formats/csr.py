"""Compressed sparse row (CSR) matrices, with the row swizzle the kernels use.

Row r of an [m, k] matrix holds ``values[crow[r]:crow[r+1]]`` at columns
``col_indices[crow[r]:crow[r+1]]``, as in torch.sparse_csr and scipy.sparse.csr_matrix;
repeated columns in a row add up. ``row_order`` lists the rows by nonzero count,
longest first (ties in natural order): SpMM kernels take rows in that order so that
the long rows start first and the short ones fill the tail.
"""
from typing import Dict, Optional, Sequence, Tuple

import torch

from sparqle.kernels import _capture
from sparqle.kernels.torch._sparse import csr_matrix

from ._checks import INT32_MAX, check_int32, check_shape, check_tensors, dense_and_mask


def _row_order(crow: torch.Tensor) -> torch.Tensor:
    counts = crow[1:] - crow[:-1]
    return torch.argsort(counts, descending=True, stable=True).to(torch.int32)


class CSR:
    """A sparse [m, k] matrix in CSR form.

    Args:
        crow_indices: integer [m + 1], 0 first, non-decreasing, nnz last.
        col_indices: integer [nnz], each in [0, k).
        values: floating [nnz].
        shape: (m, k).
    Indices are stored as int32. Attributes: ``crow_indices``, ``col_indices``,
    ``values``, ``shape``, ``row_order`` (int32 [m]).
    """

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
        self._set(crow, col_indices.to(torch.int32), values, shape, _row_order(crow), None)

    def _set(self, crow, col, values, shape, row_order, transposed):
        self.crow_indices, self.col_indices, self.values = crow, col, values
        self.shape, self.row_order = torch.Size(shape), row_order
        self._transposed = transposed

    @classmethod
    def _trusted(cls, crow, col, values, shape, row_order,
                 transposed: Optional[Tuple[torch.Tensor, ...]] = None) -> "CSR":
        """A CSR from tensors already known to be valid (as nn modules hold them)."""
        csr = cls.__new__(cls)
        csr._set(crow, col, values, shape, row_order, transposed)
        return csr

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
        rows = torch.repeat_interleave(
            torch.arange(m, device=self.values.device), self.crow_indices[1:] - self.crow_indices[:-1],
            output_size=self.nnz)
        dense = torch.zeros(m, k, dtype=self.values.dtype, device=self.values.device)
        return dense.index_put((rows, self.col_indices.long()), self.values, accumulate=True)

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def density(self) -> float:
        """nnz / (m * k); 0 for an empty shape."""
        return self.nnz / max(1, self.shape[0] * self.shape[1])

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def transposed_structure(self) -> Tuple[torch.Tensor, ...]:
        """(crow, col, perm, row_order) of A^T, whose values are ``values[perm]``: the
        gradient with respect to the dense operand needs it. Built on first use without a
        host sync (CUDA-graph capture allows none) and kept, unless built during capture."""
        if self._transposed is not None:
            return self._transposed
        m, k = self.shape
        rows = torch.repeat_interleave(
            torch.arange(m, dtype=torch.int32, device=self.device),
            self.crow_indices[1:] - self.crow_indices[:-1], output_size=self.nnz)
        perm = torch.argsort(self.col_indices, stable=True)
        # Row c of A^T starts at the count of columns < c: a search in the sorted columns.
        t_crow = torch.searchsorted(self.col_indices[perm],
                                    torch.arange(k + 1, dtype=torch.int32, device=self.device),
                                    out_int32=True)
        transposed = (t_crow, rows[perm], perm.to(torch.int32), _row_order(t_crow))
        if not _capture.capturing():
            self._transposed = transposed
        return transposed

    def index_tensors(self) -> Dict[str, torch.Tensor]:
        """The integer tensors an nn module keeps as buffers (the transposed structure included)."""
        t_crow, t_col, t_perm, t_row_order = self.transposed_structure()
        return {"crow_indices": self.crow_indices, "col_indices": self.col_indices,
                "row_order": self.row_order, "t_crow_indices": t_crow, "t_col_indices": t_col,
                "t_perm": t_perm, "t_row_order": t_row_order}

    @classmethod
    def from_index_tensors(cls, shape, values: torch.Tensor, t: Dict[str, torch.Tensor]) -> "CSR":
        """The inverse of ``index_tensors``, over the same tensors (no copy, no checks)."""
        return cls._trusted(t["crow_indices"], t["col_indices"], values, shape, t["row_order"],
                            (t["t_crow_indices"], t["t_col_indices"], t["t_perm"], t["t_row_order"]))

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "CSR":
        """A copy on ``device`` and/or with values of ``dtype`` (indices stay int32)."""
        move = lambda t: t.to(device)  # noqa: E731
        transposed = None if self._transposed is None else tuple(map(move, self._transposed))
        return CSR._trusted(move(self.crow_indices), move(self.col_indices),
                            self.values.to(device=device, dtype=dtype), self.shape,
                            move(self.row_order), transposed)

    def __repr__(self) -> str:
        return (f"CSR(shape={tuple(self.shape)}, nnz={self.nnz}, density={self.density:.4f}, "
                f"dtype={self.dtype}, device={self.device})")

