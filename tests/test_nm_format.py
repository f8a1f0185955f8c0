"""The N:M format: the kept set is the top n of every m by magnitude, compress/decompress
round trip, the packed metadata decodes (bit by bit, as the hardware reads it) to the same
dense matrix, from_mask, pruning, and bad input."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparqle
from sparqle import SemiStructured
from sparqle.formats.nm import PATTERNS

SHAPES = [(1, 1), (5, 7), (3, 64), (9, 70)]


def _decode_by_bits(s: SemiStructured) -> torch.Tensor:
    """W [out, in] read from values and meta bit by bit, as the docs state the layout."""
    rows, k = s.shape
    bits = 2 if s.m <= 4 else 4
    per_word = 32 // bits
    kp = -(-k // s.m) * s.m
    dense = torch.zeros(rows, kp, dtype=torch.float64)
    meta = s.meta.tolist()
    for r in range(rows):
        for j in range(s.values.shape[1]):
            word = meta[r][j // per_word] & 0xFFFFFFFF
            position = (word >> (bits * (j % per_word))) & ((1 << bits) - 1)
            dense[r, j // s.n * s.m + position] = float(s.values[r, j])
    return dense[:, :k]


@pytest.mark.parametrize("n,m", PATTERNS, ids=lambda p: str(p))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_top_n_round_trip_and_bits(n, m, shape):
    w = torch.randn(*shape, dtype=torch.float64)
    s = SemiStructured.from_dense(w, n, m)
    dense = s.to_dense()
    # Every group of m keeps exactly its n largest magnitudes.
    rows, k = shape
    for r in range(rows):
        for g0 in range(0, k, m):
            group = w[r, g0:g0 + m].abs()
            kept = (dense[r, g0:g0 + m] != 0).nonzero().flatten().tolist()
            expected = sorted(torch.argsort(group, descending=True, stable=True)[:n].tolist())
            assert kept == expected, (r, g0)
    assert torch.equal(dense, torch.where(dense != 0, w, 0))
    assert torch.equal(_decode_by_bits(s), dense)
    assert s.values.shape == (rows, -(-k // m) * n) and s.meta.dtype == torch.int32
    # The constructor accepts what from_dense made, and the round trip is exact.
    again = SemiStructured(s.values, s.meta, s.shape, n, m)
    assert torch.equal(SemiStructured.from_dense(again.to_dense(), n, m).values, s.values)
    assert torch.equal(sparqle.prune.magnitude(w, n=n, m=m), dense != 0)


def test_ties_keep_the_lower_index():
    w = torch.tensor([[1.0, -1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 2.0, 3.0, -3.0, 2.0]])
    assert SemiStructured.from_dense(w).to_dense().tolist() == [
        [1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0, -3.0, 0.0]]
    assert SemiStructured.from_dense(w).meta.tolist() == [[(1 << 2) | (1 << 6) | (1 << 8) | (2 << 10)]]


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 6), k=st.integers(1, 40), pattern=st.sampled_from(PATTERNS),
       seed=st.integers(0, 2**16))
def test_from_mask_keeps_exactly_the_mask(rows, k, pattern, seed):
    n, m = pattern
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, k, generator=g)
    # A random N:M mask, with groups keeping fewer than n as well.
    kp = -(-k // m) * m
    scores = torch.rand(rows, kp // m, m, generator=g)
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.argsort(-1)[..., :n], True)
    keep &= torch.rand(rows, kp // m, 1, generator=g) < 0.8
    mask = keep.view(rows, kp)[:, :k]
    s = SemiStructured.from_mask(w, mask, n, m)
    assert torch.equal(s.to_dense(), torch.where(mask, w, 0))
    assert torch.equal(_decode_by_bits(s).float(), s.to_dense())


def test_all_zero_and_attributes():
    s = SemiStructured.from_dense(torch.zeros(3, 10, dtype=torch.float16))
    assert torch.equal(s.to_dense(), torch.zeros(3, 10, dtype=torch.float16))
    assert s.dtype == torch.float16 and s.device.type == "cpu" and s.density == 0.5
    assert s.shape == (3, 10) and "pattern=2:4" in repr(s)
    moved = s.to(dtype=torch.float32)
    assert moved.dtype == torch.float32 and torch.equal(moved.meta, s.meta)


class TestBadInput:
    def setup_method(self):
        self.s = SemiStructured.from_dense(torch.randn(4, 10))

    def test_pattern(self):
        with pytest.raises(ValueError, match="n must be smaller than m"):
            SemiStructured.from_dense(torch.randn(4, 8), 4, 4)
        with pytest.raises(ValueError, match="n:m = 3:8 is not supported"):
            SemiStructured.from_dense(torch.randn(4, 8), 3, 8)
        with pytest.raises(TypeError, match="n must be an int"):
            sparqle.prune.magnitude(torch.randn(4, 8), n=2.0, m=4)
        with pytest.raises(ValueError, match="pass neither sparsity nor block"):
            sparqle.prune.magnitude(torch.randn(4, 8), 0.5, n=2, m=4)

    def test_weight(self):
        with pytest.raises(TypeError, match="w must be a floating-point tensor"):
            SemiStructured.from_dense(torch.ones(4, 8, dtype=torch.int32))
        with pytest.raises(ValueError, match="w must be 2-D"):
            SemiStructured.from_dense(torch.randn(2, 4, 8))
        w = torch.randn(4, 8)
        w[1, 1] = float("nan")
        with pytest.raises(ValueError, match="w holds NaN or Inf"):
            SemiStructured.from_dense(w)

    def test_mask(self):
        w = torch.randn(2, 9)
        mask = torch.zeros(2, 9, dtype=torch.bool)
        mask[1, 4:7] = True
        with pytest.raises(ValueError, match=r"mask is not 2:4: row 1, columns 4..7 keep 3"):
            SemiStructured.from_mask(w, mask)
        with pytest.raises(ValueError, match="mask must be a bool tensor of shape"):
            SemiStructured.from_mask(w, mask.float())
        mask[1, 6] = False
        mask[0, 8] = True  # the last, partial group
        assert SemiStructured.from_mask(w, mask).to_dense()[0, 8] == w[0, 8]

    def test_constructor(self):
        s = self.s
        with pytest.raises(ValueError, match=r"values must have shape \(4, 6\)"):
            SemiStructured(s.values[:, :4], s.meta, s.shape)
        with pytest.raises(ValueError, match="meta must be int32 of shape"):
            SemiStructured(s.values, s.meta.long(), s.shape)
        with pytest.raises(TypeError, match="values must be floating point"):
            SemiStructured(s.values.int(), s.meta, s.shape)
        with pytest.raises(ValueError, match="meta is on meta"):
            SemiStructured(s.values, s.meta.to("meta"), s.shape)
        repeated = s.meta.clone()
        repeated[0, 0] = 0  # positions 0, 0 in every group of row 0
        with pytest.raises(ValueError, match="must increase strictly"):
            SemiStructured(s.values, repeated, s.shape)
        stray = s.meta.clone()
        stray[2, 0] |= 1 << 30
        with pytest.raises(ValueError, match="bits set past the last stored value"):
            SemiStructured(s.values, stray, s.shape)
        values = s.values.clone()
        positions = SemiStructured.from_dense(torch.ones(4, 10))  # last group: columns 8, 9 kept
        values[:, -2:] = 1.0
        SemiStructured(values, positions.meta, s.shape)  # columns 8, 9 lie inside in = 10
        with pytest.raises(ValueError, match="values at padded columns"):
            SemiStructured(values, positions.meta.clone().fill_(positions.meta[0, 0] | (3 << 10) | (2 << 8)),
                           s.shape)
