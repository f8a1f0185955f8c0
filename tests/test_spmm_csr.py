"""sparqle.spmm / sparqle.linear on CSR weights, and the ops behind them, on every
(device, backend) that can run here, against float64 dense oracles: shapes off every block,
empty rows and dimensions, the row order, repeated columns, SDDMM, gradients, A^T's
structure built once, bad input (the contract of csr_linear: gradcheck, opcheck, compile,
state_dict: tests/test_contract.py)."""
import pytest
import torch
import triton

import sparqle
from sparqle import CSR
from sparqle.kernels import _derived

from ._oracle import RTOL, assert_close, random_sparse
from .conftest import device_backends

# (m, k, n, density): odd sizes off every block, one row, k or n of 1, all-zero, dense.
SHAPES = [
    (1, 1, 1, 1.0),
    (1, 37, 5, 0.5),
    (37, 29, 19, 0.3),
    (64, 33, 1, 0.2),
    (5, 70, 40, 0.9),
    (23, 1, 17, 0.5),
    (19, 21, 13, 0.0),
    (9, 13, 33, 1.0),
]
DTYPES = {"torch": [torch.float64, torch.float32, torch.float16, torch.bfloat16],
          # The interpreter's bf16 loads and fp32 math are right (bf16 tl.dot is not,
          # and these kernels use none); fp64 runs so that gradcheck covers Triton too.
          "triton": [torch.float64, torch.float32, torch.float16, torch.bfloat16]}


def _params():
    return [(shape, dtype) for shape in SHAPES for dtype in DTYPES["torch"]]


def _pair(m, k, n, density, dtype, device):
    w64 = random_sparse(m, k, density, empty_rows=(0, 3, m - 1) if m > 4 else ())
    w = w64.to(dtype)
    b = torch.randn(k, n, dtype=dtype, device=device)
    return CSR.from_dense(w.to(device)), w.double(), b


@pytest.mark.parametrize("shape,dtype", _params(), ids=str)
def test_spmm_matches_oracle(device_backend, shape, dtype):
    device, backend = device_backend
    if dtype not in DTYPES[backend]:
        pytest.skip(f"{backend} does not take {dtype}")
    a, w64, b = _pair(*shape, dtype, device)
    with sparqle.use_backend(backend):
        c = sparqle.spmm(a, b)
    b64 = b.double().cpu()
    assert_close(c, w64 @ b64, w64.abs() @ b64.abs(), dtype, "C")


@pytest.mark.parametrize("across", [True, False], ids=["nonzeros-across-threads", "rows-per-thread"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("device", [device for device, backend in device_backends() if backend == "triton"])
def test_both_ways_of_spreading_a_row_match_the_oracle(monkeypatch, device, across, dtype):
    """The Triton CSR kernel's two configs families (kernels/triton/spmm_csr.py): the
    nonzeros of a chunk across the threads, or each thread owning rows of x and walking the
    nonzeros (Sputnik's); each pinned, on rows whose lengths are off the chunk (empty rows
    included), x rows off the tile, through sparqle.linear (x row-major, bias) and
    sparqle.spmm (x a transposed view)."""
    from sparqle.kernels.triton import spmm_csr as kernels
    config = triton.Config({"BLOCK_X_ROWS": 16, "BLOCK_NNZ": 8 if across else 4, "NNZ_ACROSS_THREADS": across})
    monkeypatch.setattr(kernels, "_csr_linear_kernel", kernels._csr_linear_kernel.pinned(config))
    a, w64, b = _pair(37, 29, 19, 0.4, dtype, device)
    x, bias = b.T.contiguous(), torch.randn(37, dtype=dtype, device=device)
    with sparqle.use_backend("triton"):
        c, y = sparqle.spmm(a, b), sparqle.linear(x, a, bias)
    b64 = b.double().cpu()
    assert_close(c, w64 @ b64, w64.abs() @ b64.abs(), dtype, "C")
    assert_close(y, b64.T @ w64.T + bias.double().cpu(), b64.T.abs() @ w64.T.abs() + bias.double().abs().cpu(),
                 dtype, "y")


@pytest.mark.parametrize("m,k,n", [(0, 4, 3), (4, 0, 3), (4, 5, 0), (0, 0, 0)])
def test_spmm_empty_dimensions(device_backend, m, k, n):
    device, backend = device_backend
    a = CSR.from_dense(torch.zeros(m, k, device=device))
    with sparqle.use_backend(backend):
        c = sparqle.spmm(a, torch.randn(k, n, device=device))
    assert c.shape == (m, n) and (c == 0).all()


def test_row_order_is_a_schedule_not_semantics(device_backend):
    """Any permutation of the rows gives the same C: every row is written exactly once."""
    device, backend = device_backend
    a, w64, b = _pair(31, 17, 9, 0.4, torch.float32, device)
    shuffled = CSR._trusted(**{**a.tensors(), "row_order": torch.randperm(31).to(torch.int32).to(device)},
                            shape=a.shape)
    with sparqle.use_backend(backend):
        expected, got = sparqle.spmm(a, b), sparqle.spmm(shuffled, b)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_unsorted_and_repeated_columns_add_up(device_backend):
    device, backend = device_backend
    crow = torch.tensor([0, 3, 3, 5])
    col = torch.tensor([4, 1, 4, 0, 0])
    values = torch.tensor([1.0, 2.0, 3.0, -1.0, 0.5], dtype=torch.float64)
    a = CSR(crow, col, values, (3, 5))
    dense = torch.zeros(3, 5, dtype=torch.float64)
    dense[0, 4], dense[0, 1], dense[2, 0] = 4.0, 2.0, -0.5
    torch.testing.assert_close(a.to_dense(), dense, rtol=0, atol=0)
    b = torch.randn(5, 7, dtype=torch.float64)
    with sparqle.use_backend(backend):
        c = sparqle.spmm(a.to(device), b.to(device))
    assert_close(c, dense @ b, dense.abs() @ b.abs(), torch.float64, "C")


@pytest.mark.parametrize("m,k,n,density", [(1, 1, 1, 1.0), (29, 37, 13, 0.3), (8, 19, 70, 0.6),
                                           (11, 7, 5, 0.0)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_sddmm_matches_oracle(device_backend, m, k, n, density, dtype):
    device, backend = device_backend
    a = CSR.from_dense(random_sparse(m, k, density, dtype, device))
    x = torch.randn(m, n, dtype=dtype, device=device)
    y = torch.randn(k, n, dtype=dtype, device=device)
    with sparqle.use_backend(backend):
        out = torch.ops.sparqle.sddmm_csr(a.crow_indices, a.col_indices, x, y)
    rows = torch.repeat_interleave(torch.arange(m), (a.crow_indices[1:] - a.crow_indices[:-1]).cpu())
    cols = a.col_indices.long().cpu()
    x64, y64 = x.double().cpu(), y.double().cpu()
    assert_close(out, (x64 @ y64.T)[rows, cols], (x64.abs() @ y64.abs().T)[rows, cols], dtype, "sddmm")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k", [40000, 65536, 65537])
def test_column_indices_past_int16_are_read_as_16_bit_where_they_fit(device_backend, dtype, k):
    """Columns at and past 32768 (negative as int16: read unsigned), up to k - 1, through
    sparqle.linear (bias) and sparqle.spmm (x a transposed view): the Triton kernel reads
    16-bit indices, kept per index tensor, exactly where fp16/bf16 and k <= 65536 allow."""
    device, backend = device_backend
    cols = [0, 1, 32767, 32768, 32769, k - 2, k - 1]
    crow = torch.tensor([0, 4, 4, 7])
    col = torch.tensor([cols[6], cols[3], 0, cols[2], cols[4], cols[1], cols[5]])
    a = CSR(crow, col, torch.randn(7, dtype=dtype), (3, k)).to(device)
    x, bias = torch.randn(2, k, dtype=dtype, device=device), torch.randn(3, dtype=dtype, device=device)
    with sparqle.use_backend(backend):
        y, c = sparqle.linear(x, a, bias), sparqle.spmm(a, x.T)
    w64, x64, b64 = a.to_dense().double().cpu(), x.double().cpu(), bias.double().cpu()
    assert_close(y, x64 @ w64.T + b64, x64.abs() @ w64.abs().T + b64.abs(), dtype, "y")
    assert_close(c, w64 @ x64.T, w64.abs() @ x64.abs().T, dtype, "C")
    narrowed = (id(a.col_indices), "csr_u16_col_indices") in _derived._kept
    assert narrowed == (backend == "triton" and dtype != torch.float32 and k <= 65536)


def test_sixteen_bit_column_indices_are_exact_kept_and_follow_in_place_changes():
    col = torch.tensor([0, 1, 32767, 32768, 65535, 7], dtype=torch.int32)
    narrow = _derived.csr_col_indices(col, 65536, torch.bfloat16)
    assert narrow.dtype == torch.int16 and narrow.is_contiguous()
    torch.testing.assert_close(narrow.to(torch.int32) & 0xFFFF, col, rtol=0, atol=0)
    assert _derived.csr_col_indices(col, 65536, torch.float16) is narrow  # kept, one copy for both
    col[0] = 9
    assert int(_derived.csr_col_indices(col, 65536, torch.bfloat16)[0]) == 9
    for k, dtype in ((65537, torch.bfloat16), (100, torch.float32), (100, torch.float64)):
        assert _derived.csr_col_indices(col, k, dtype) is col


def _leaf_csr(w, device):
    a = CSR.from_dense(w.to(device))
    a.values.requires_grad_(True)
    return a


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("m,k,n,density", [(1, 5, 1, 1.0), (23, 17, 11, 0.3), (40, 9, 30, 0.5)])
def test_linear_gradients_match_oracle(device_backend, dtype, m, k, n, density):
    """y = x @ W^T + bias: dx, dvalues, dbias against float64 autograd through dense W."""
    device, backend = device_backend
    w64 = random_sparse(m, k, density, empty_rows=(1,))
    w = _leaf_csr(w64.to(dtype), device)
    x = torch.randn(2, n, k, dtype=dtype, device=device, requires_grad=True)
    bias = torch.randn(m, dtype=dtype, device=device, requires_grad=True)
    dy = torch.randn(2, n, m, dtype=dtype, device=device)
    with sparqle.use_backend(backend):
        y = sparqle.linear(x, w, bias)
        y.backward(dy)

    w_dense = torch.zeros(m, k, dtype=torch.float64)
    rows, cols = (w64.to(dtype) != 0).nonzero(as_tuple=True)
    vals64 = w.values.detach().double().cpu().requires_grad_(True)
    w_dense = w_dense.index_put((rows, cols), vals64)
    x64 = x.detach().double().cpu().requires_grad_(True)
    b64 = bias.detach().double().cpu().requires_grad_(True)
    y64 = x64 @ w_dense.T + b64
    dy64 = dy.double().cpu()
    y64.backward(dy64)
    assert_close(y, y64, x64.abs() @ w_dense.abs().T + b64.abs(), dtype, "y")
    assert_close(x.grad, x64.grad, dy64.abs() @ w_dense.abs(), dtype, "dx")
    scale_dw = (dy64.abs().reshape(-1, m).T @ x64.abs().reshape(-1, k))[rows, cols]
    assert_close(w.values.grad, vals64.grad, scale_dw, dtype, "dvalues")
    assert_close(bias.grad, b64.grad, dy64.abs().sum((0, 1)), dtype, "dbias")


def _transposed_kept(a: CSR) -> bool:
    """Whether the backward keeps A^T's structure for ``a``'s indices."""
    return (id(a.col_indices), "csr_transposed") in _derived._kept


def test_transposed_structure_built_for_dx_only_and_once(device_backend):
    """Only dvalues asked for: A^T's structure is never built; dx asked for: it is built
    on the first backward and kept for the next ones (an eager training loop builds it
    once), and it is the format's transposed_structure()."""
    device, backend = device_backend
    a = _leaf_csr(random_sparse(9, 8, 0.5), device)
    x = torch.randn(3, 8, dtype=torch.float64, device=device)
    with sparqle.use_backend(backend):
        sparqle.linear(x, a).sum().backward()
        assert not _transposed_kept(a) and a.values.grad is not None
        x.requires_grad_(True)
        sparqle.linear(x, a).sum().backward()
        first = _derived._kept[(id(a.col_indices), "csr_transposed")][2]
        sparqle.linear(x, a).sum().backward()
    assert _derived._kept[(id(a.col_indices), "csr_transposed")][2] is first
    for kept, built in zip(first, a.transposed_structure()):
        assert torch.equal(kept, built)


TRITON_DEVICES = [device for device, backend in device_backends() if backend == "triton"]


@pytest.mark.parametrize("m,k,density", [(1, 1, 1.0), (37, 70, 0.3), (5, 64, 0.9), (19, 21, 0.0), (3, 33, 1.0)])
def test_bitmap_structure_describes_the_matrix(m, k, density):
    """formats.csr.bitmap_structure: bit j of word (r, c) is set exactly where A[r, 32 c + j]
    is stored (bit 31 too: the word's sign), and the entry there is values[start + the set
    bits below j]; empty rows, k off the 32-column words, all-zero and dense rows."""
    from sparqle.formats.csr import bitmap_structure
    w = random_sparse(m, k, density, empty_rows=(0, 3) if m > 4 else ())
    a = CSR.from_dense(w)
    words, starts = bitmap_structure(a.crow_indices, a.col_indices, k)
    chunks = -(-k // 32)
    assert words.shape == starts.shape == (m, chunks) and words.dtype == starts.dtype == torch.int32
    bits = (words.long()[:, :, None] >> torch.arange(32)) & 1                 # [m, chunks, 32]
    stored = bits.reshape(m, chunks * 32)[:, :k].bool()
    assert torch.equal(stored, w != 0)
    rank = bits.cumsum(2) - bits
    position = (starts.long()[:, :, None] + rank).reshape(m, chunks * 32)[:, :k]
    rebuilt = torch.zeros_like(w)
    rebuilt[stored] = a.values[position[stored]]
    assert torch.equal(rebuilt, w)


def test_columns_increase_tells_the_bitmaps_condition():
    from sparqle.formats.csr import columns_increase
    crow = torch.tensor([0, 2, 2, 4], dtype=torch.int32)
    assert bool(columns_increase(crow, torch.tensor([1, 3, 0, 2], dtype=torch.int32)))
    assert not bool(columns_increase(crow, torch.tensor([3, 1, 0, 2], dtype=torch.int32)))   # unsorted
    assert not bool(columns_increase(crow, torch.tensor([1, 1, 0, 2], dtype=torch.int32)))   # repeated
    assert bool(columns_increase(torch.zeros(4, dtype=torch.int32), torch.zeros(0, dtype=torch.int32)))


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,k,n,density,bias,transposed", [
    (1, 1, 1, 1.0, True, False), (40, 72, 17, 0.3, True, True), (33, 130, 5, 0.1, False, False),
    (8, 40, 3, 0.0, True, False), (70, 64, 33, 0.9, False, True)], ids=str)
def test_tensor_core_path_matches_oracle(device, dtype, m, k, n, density, bias, transposed):
    """csr_bitmap_linear (the tensor-core path auto may pick on CUDA): y = x @ A^T + bias for
    A rebuilt tile by tile from its bitmap; rows and columns off every tile and word, empty
    rows, an all-zero A, x a transposed view (sparqle.spmm's b^T), with and without bias."""
    from sparqle.formats.csr import bitmap_structure
    from sparqle.kernels.triton import spmm_csr as csr_kernels
    w64 = random_sparse(m, k, density, empty_rows=(0, 3) if m > 4 else ())
    a = CSR.from_dense(w64.to(dtype)).to(device)
    x = torch.randn(k, n, dtype=dtype, device=device).t() if transposed else \
        torch.randn(n, k, dtype=dtype, device=device)
    b = torch.randn(m, dtype=dtype, device=device) if bias else None
    words, starts = bitmap_structure(a.crow_indices, a.col_indices, k)
    y = csr_kernels.csr_bitmap_linear(x, words, starts, a.values, b)
    w = a.to_dense().double().cpu()
    x64 = x.double().cpu()
    b64 = torch.zeros(m, dtype=torch.float64) if b is None else b.double().cpu()
    assert_close(y, x64 @ w.T + b64, x64.abs() @ w.abs().T + b64.abs(), dtype, "y")


@pytest.mark.gpu
def test_auto_on_cuda_times_both_cores_for_sorted_columns_only():
    """auto on CUDA times the CUDA-core and tensor-core kernels once per key and keeps the
    faster, every call meeting the oracle; a CSR whose columns are unsorted or repeated
    (the bitmap cannot describe it) runs the CUDA-core kernel only."""
    from sparqle.bindings import _fastest
    for unsorted in (False, True):
        if unsorted:  # row 0 stores column 5 twice (3.0 in all) and column 1 after it
            a = CSR(torch.tensor([0, 3] + [3] * 63), torch.tensor([5, 5, 1]), torch.tensor([1.0, 2.0, -1.0]), (64, 96))
        else:
            a = CSR.from_dense(random_sparse(64, 96, 0.3).float())
        w64 = a.to_dense().double()
        a = a.to("cuda")
        for rows in (16, 300):
            x = torch.randn(rows, 96, device="cuda")
            y = sparqle.linear(x, a)
            x64 = x.double().cpu()
            assert_close(y, x64 @ w64.T, x64.abs() @ w64.abs().T, torch.float32, f"y (M={rows})")
            nnz = a.values.numel()
            key = ("csr_linear", x.device, torch.float32, 1 << (rows - 1).bit_length(), 64, 96,
                   1 << max(0, nnz // 64 - 1).bit_length(), False, 1 if unsorted else 2)
            assert _fastest._fastest[key] in (("cuda_cores",) if unsorted else ("cuda_cores", "tensor_cores"))


def test_opcheck_sddmm():
    """(csr_linear itself: tests/test_contract.py, with every other contract check.)"""
    a = CSR.from_dense(random_sparse(13, 11, 0.4))
    x, y = torch.randn(13, 5, dtype=torch.float64), torch.randn(11, 5, dtype=torch.float64)
    torch.library.opcheck(torch.ops.sparqle.sddmm_csr.default, (a.crow_indices, a.col_indices, x, y))


class TestBadInput:
    def setup_method(self):
        self.a = CSR.from_dense(random_sparse(6, 5, 0.5, torch.float32))

    def test_b_shape(self):
        with pytest.raises(ValueError, match="b must have a.shape"):
            sparqle.spmm(self.a, torch.randn(4, 3))
        with pytest.raises(ValueError, match="b must be 2-D"):
            sparqle.spmm(self.a, torch.randn(5))

    def test_b_dtype(self):
        with pytest.raises(TypeError, match="b has dtype torch.float64"):
            sparqle.spmm(self.a, torch.randn(5, 3, dtype=torch.float64))

    def test_b_device(self):
        with pytest.raises(ValueError, match="b is on meta"):
            sparqle.spmm(self.a, torch.randn(5, 3, device="meta"))

    def test_a_not_a_format(self):
        with pytest.raises(TypeError, match="a must be one of the formats"):
            sparqle.spmm(torch.randn(6, 5), torch.randn(5, 3))

    def test_linear_x_features(self):
        with pytest.raises(ValueError, match="x must have w.shape"):
            sparqle.linear(torch.randn(2, 4), self.a)

    def test_linear_bias(self):
        with pytest.raises(ValueError, match="bias must have shape"):
            sparqle.linear(torch.randn(2, 5), self.a, torch.randn(5))
        with pytest.raises(TypeError, match="bias has dtype"):
            sparqle.linear(torch.randn(2, 5), self.a, torch.randn(6, dtype=torch.float64))

    def test_linear_x_dtype(self):
        with pytest.raises(TypeError, match="x has dtype torch.float16"):
            sparqle.linear(torch.randn(2, 5, dtype=torch.float16), self.a)

    def test_linear_w_type(self):
        with pytest.raises(TypeError, match="w must be"):
            sparqle.linear(torch.randn(2, 5), "weights")

    def test_linear_dense_weight_is_f_linear(self):
        x, w = torch.randn(3, 5), torch.randn(4, 5)
        torch.testing.assert_close(sparqle.linear(x, w), x @ w.T)


def test_rtol_table_covers_tested_dtypes():
    for dtypes in DTYPES.values():
        assert set(dtypes) <= set(RTOL)
