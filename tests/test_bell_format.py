"""sparqle.BlockedELL: construction, round trips, transposed structure, validation."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparqle import BlockedELL
from sparqle.formats._checks import cdiv
from sparqle.formats.bell import row_schedule

from .test_spmm_bell import block_sparse


@settings(max_examples=30, deadline=None)
@given(m=st.integers(0, 80), k=st.integers(0, 80), b=st.sampled_from([16, 32]),
       density=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_dense_round_trip(m, k, b, density, seed):
    torch.manual_seed(seed)
    dense = block_sparse(m, k, b, density)
    a = BlockedELL.from_dense(dense, block_size=b)
    assert torch.equal(a.to_dense(), dense)
    rows, cols = cdiv(m, b), cdiv(k, b)
    nonzero_blocks = (torch.nn.functional.pad(dense, (0, cols * b - k, 0, rows * b - m))
                      .view(rows, b, cols, b).ne(0).any(3).any(1))
    assert a.nnz_blocks == int(nonzero_blocks.sum())
    assert a.ell_cols.shape == (rows, int(nonzero_blocks.sum(1).max()) if rows and cols else 0)
    assert a.values.shape == (*a.ell_cols.shape, b, b) and a.ell_cols.dtype == torch.int32
    used = a.ell_cols >= 0
    # Used slots first, by block-column; unused slots hold zeros.
    assert (used[:, 1:] <= used[:, :-1]).all()
    assert (a.values[~used] == 0).all()


def test_attributes_and_mask():
    dense = torch.zeros(40, 70)
    dense[0, 0], dense[20, 50] = 1.0, 2.0
    a = BlockedELL.from_dense(dense, block_size=16)
    assert a.block_size == 16 and a.shape == (40, 70) and a.nnz_blocks == 2
    assert a.density == pytest.approx(2 / 15)
    assert a.ell_cols.tolist() == [[0], [3], [-1]]
    mask = torch.zeros(40, 70, dtype=torch.bool)
    mask[32:, 64:] = True                 # a block of zeros kept by the mask; the 2.0 masked out
    kept = BlockedELL.from_dense(dense, block_size=16, mask=mask)
    assert kept.ell_cols.tolist() == [[-1], [-1], [4]] and (kept.to_dense() == 0).all()
    assert "block_size=16" in repr(a)
    half = a.to(dtype=torch.float16)
    assert half.dtype == torch.float16 and torch.equal(half.to_dense(), dense.half())


@pytest.mark.parametrize("m,k,b,density", [(0, 40, 16, 0.5), (37, 70, 16, 0.4), (64, 64, 32, 1.0),
                                           (50, 50, 16, 0.0)])
def test_transposed_structure(m, k, b, density):
    dense = block_sparse(m, k, b, density)
    a = BlockedELL.from_dense(dense, block_size=b)
    t_cols, t_slots = a.transposed_structure()
    assert t_cols.shape == t_slots.shape and t_cols.shape[0] == cdiv(k, b)
    flat = a.values.reshape(-1, b, b)
    at = BlockedELL(t_cols, torch.where((t_slots >= 0)[..., None, None],
                                        flat[t_slots.clamp(min=0).long()].transpose(-1, -2), 0),
                    (k, m))
    assert torch.equal(at.to_dense(), dense.T)


def test_row_schedule_visits_up_to_the_last_used_slot_longest_first():
    """Slots to visit: 1 + the last used one (a hole before it counted, -1 after it not);
    block-rows by that count, largest first, ties in natural order; no slots, no rows."""
    ell_cols = torch.tensor([[0, 2, -1, -1], [-1, -1, -1, -1], [1, -1, 3, -1], [0, 1, 2, 3], [2, 0, -1, -1]],
                            dtype=torch.int32)
    order, slots = row_schedule(ell_cols)
    assert slots.tolist() == [2, 0, 3, 4, 2] and order.tolist() == [3, 2, 0, 4, 1]
    assert order.dtype == slots.dtype == torch.int32
    order, slots = row_schedule(ell_cols[:, :0])
    assert slots.tolist() == [0] * 5 and order.tolist() == list(range(5))
    assert [t.numel() for t in row_schedule(ell_cols[:0])] == [0, 0]


class TestValidation:
    ell_cols = torch.tensor([[0, 2], [1, -1]])
    values = torch.zeros(2, 2, 16, 16)

    def test_ok(self):
        BlockedELL(self.ell_cols, self.values, (20, 40))

    def test_block_size(self):
        with pytest.raises(ValueError, match="block size.* must be one of"):
            BlockedELL(self.ell_cols, torch.zeros(2, 2, 8, 8), (10, 20))
        with pytest.raises(ValueError, match="block_size must be one of"):
            BlockedELL.from_dense(torch.ones(4, 4), block_size=24)

    def test_values_shape(self):
        with pytest.raises(ValueError, match=r"values must have shape \[block_rows, width, b, b\]"):
            BlockedELL(self.ell_cols, torch.zeros(2, 2, 16, 32), (20, 40))
        with pytest.raises(ValueError, match=r"ell_cols must have shape \(2, 3\)"):
            BlockedELL(self.ell_cols, torch.zeros(2, 3, 16, 16), (20, 40))
        with pytest.raises(ValueError, match=r"ell_cols must have shape \(1, 2\)"):
            BlockedELL(self.ell_cols, self.values, (16, 40))

    def test_range_and_repeats(self):
        with pytest.raises(ValueError, match=r"ell_cols must lie in \[-1, 3\)"):
            BlockedELL(torch.tensor([[0, 3], [1, -1]]), self.values, (20, 40))
        with pytest.raises(ValueError, match=r"ell_cols must lie in"):
            BlockedELL(torch.tensor([[0, -2], [1, -1]]), self.values, (20, 40))
        with pytest.raises(ValueError, match="repeats a block-column"):
            BlockedELL(torch.tensor([[1, 1], [1, -1]]), self.values, (20, 40))
        BlockedELL(torch.tensor([[-1, -1], [1, -1]]), self.values, (20, 40))  # -1 may repeat

    def test_types_and_devices(self):
        with pytest.raises(TypeError, match="values must be floating point"):
            BlockedELL(self.ell_cols, self.values.long(), (20, 40))
        with pytest.raises(TypeError, match="ell_cols must hold integers"):
            BlockedELL(self.ell_cols.float(), self.values, (20, 40))
        with pytest.raises(ValueError, match="ell_cols is on meta"):
            BlockedELL(self.ell_cols.to("meta"), self.values, (20, 40))
        with pytest.raises(ValueError, match="shape must be 2-D"):
            BlockedELL(self.ell_cols, self.values, (20, 40, 1))
        with pytest.raises(ValueError, match="t must be a 2-D tensor"):
            BlockedELL.from_dense(torch.ones(3), block_size=16)
