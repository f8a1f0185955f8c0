"""sparqle.CSR: construction, conversions, row swizzle, transposed structure, validation."""
import pytest
import scipy.sparse
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparqle import CSR

from ._oracle import random_sparse


@settings(max_examples=40, deadline=None)
@given(m=st.integers(0, 12), k=st.integers(0, 12), density=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_dense_round_trip_and_scipy_agree(m, k, density, seed):
    torch.manual_seed(seed)
    dense = random_sparse(m, k, density)
    a = CSR.from_dense(dense)
    assert torch.equal(a.to_dense(), dense)
    assert a.nnz == int((dense != 0).sum()) and a.shape == (m, k)
    assert a.density == pytest.approx(a.nnz / max(1, m * k))
    ref = scipy.sparse.csr_matrix(dense.numpy())
    assert a.crow_indices.tolist() == ref.indptr.tolist()
    assert a.col_indices.tolist() == ref.indices.tolist()
    assert a.values.tolist() == ref.data.tolist()
    assert a.crow_indices.dtype == a.col_indices.dtype == a.row_order.dtype == torch.int32


def test_row_order_is_longest_first_and_stable():
    crow = torch.tensor([0, 1, 4, 4, 7, 9])  # lengths 1, 3, 0, 3, 2
    a = CSR(crow, torch.tensor([0, 0, 1, 2, 0, 1, 2, 0, 1]), torch.ones(9), (5, 3))
    assert a.row_order.tolist() == [1, 3, 4, 0, 2]


def test_sparse_csr_round_trip():
    dense = random_sparse(9, 14, 0.3, torch.float32)
    t = dense.to_sparse_csr()
    a = CSR.from_sparse_csr(t)
    assert torch.equal(a.to_dense(), dense)
    assert torch.equal(a.to_sparse_csr().to_dense(), dense)
    with pytest.raises(TypeError, match="t must have layout torch.sparse_csr"):
        CSR.from_sparse_csr(dense)


def test_from_dense_mask_keeps_zeros():
    dense = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    mask = torch.tensor([[True, True], [False, False]])
    a = CSR.from_dense(dense, mask=mask)
    assert a.nnz == 2 and a.values.tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        CSR.from_dense(dense, mask=mask.float())


@pytest.mark.parametrize("m,k,density", [(0, 3, 0.5), (7, 5, 0.0), (11, 13, 0.4), (6, 6, 1.0)])
def test_transposed_structure(m, k, density):
    dense = random_sparse(m, k, density)
    a = CSR.from_dense(dense)
    t_crow, t_col, t_perm, t_row_order = a.transposed_structure()
    at = CSR(t_crow, t_col, a.values[t_perm.long()], (k, m))
    assert torch.equal(at.to_dense(), dense.T)
    assert torch.equal(t_row_order, at.row_order)


def test_to_moves_and_casts():
    a = CSR.from_dense(random_sparse(5, 4, 0.5))
    b = a.to(dtype=torch.float16)
    assert b.dtype == torch.float16 and b.crow_indices.dtype == torch.int32
    assert torch.equal(b.to_dense(), a.to_dense().half())
    assert "nnz=" in repr(b)


class TestValidation:
    crow, col, values = torch.tensor([0, 2, 3]), torch.tensor([0, 2, 1]), torch.ones(3)

    def test_shape(self):
        with pytest.raises(ValueError, match="shape must be 2-D"):
            CSR(self.crow, self.col, self.values, (2, 3, 1))
        with pytest.raises(ValueError, match="shape must be a pair"):
            CSR(self.crow, self.col, self.values, 5)

    def test_crow_length(self):
        with pytest.raises(ValueError, match="crow_indices must have shape"):
            CSR(self.crow, self.col, self.values, (3, 3))

    def test_crow_ends(self):
        with pytest.raises(ValueError, match="crow_indices must start at 0 and end at nnz"):
            CSR(torch.tensor([1, 2, 3]), self.col, self.values, (2, 3))

    def test_crow_monotone(self):
        with pytest.raises(ValueError, match="non-decreasing"):
            CSR(torch.tensor([0, 4, 1, 3]), self.col, self.values, (3, 3))

    def test_col_range(self):
        with pytest.raises(ValueError, match=r"col_indices must lie in \[0, 3\)"):
            CSR(self.crow, torch.tensor([0, 3, 1]), self.values, (2, 3))
        with pytest.raises(ValueError, match="col_indices must lie"):
            CSR(self.crow, torch.tensor([0, -1, 1]), self.values, (2, 3))

    def test_lengths(self):
        with pytest.raises(ValueError, match="col_indices has 2 entries but values has 3"):
            CSR(self.crow, self.col[:2], self.values, (2, 3))

    def test_dtypes(self):
        with pytest.raises(TypeError, match="values must be floating point"):
            CSR(self.crow, self.col, torch.ones(3, dtype=torch.int64), (2, 3))
        with pytest.raises(TypeError, match="col_indices must hold integers"):
            CSR(self.crow, self.col.float(), self.values, (2, 3))
        with pytest.raises(TypeError, match="crow_indices must be a torch.Tensor"):
            CSR([0, 2, 3], self.col, self.values, (2, 3))

    def test_dims_and_devices(self):
        with pytest.raises(ValueError, match="values must be 1-D"):
            CSR(self.crow, self.col, torch.ones(3, 1), (2, 3))
        with pytest.raises(ValueError, match="col_indices is on meta"):
            CSR(self.crow, self.col.to("meta"), self.values, (2, 3))

    def test_from_dense_needs_2d(self):
        with pytest.raises(ValueError, match="t must be a 2-D tensor"):
            CSR.from_dense(torch.ones(3))
