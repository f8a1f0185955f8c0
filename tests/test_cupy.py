"""The CuPy backend (kernels/cupy): CUDA C that compiles here with nvcc, launchers whose kernel
choice and argument handling run without CuPy, the 2:4 mma.sp kernel's fragment index math
emulated on the CPU against the PTX ISA's fragment layouts, and (marked ``cupy``, skipped
without CuPy and a GPU) the kernels themselves against float64 dense oracles."""
import functools
import pathlib
import re
import shutil
import subprocess
import tempfile

import pytest
import torch

import sparqle
from sparqle import CSR
from sparqle.backends import cupy_status
from sparqle.formats._checks import cdiv
from sparqle.kernels.cupy import _module
from sparqle.kernels.cupy import nm_linear as cupy_nm
from sparqle.kernels.cupy import spmm_csr as cupy_csr

from ._oracle import assert_close, random_sparse
from .test_csr_bell_linear import BIAS_LAYOUTS, X_LAYOUTS, check_linear, laid_out_bias, laid_out_x
from .test_spmm_csr import SHAPES

CU_FILES = sorted(p.name for p in _module.DIR.glob("*.cu"))
TARGETS = {"sm_80": ["-arch=sm_80"], "sm_90a": ["-gencode=arch=compute_90a,code=sm_90a"]}
NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: the CUDA C cannot be compiled here")
CSR_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _nvcc(file, target, out, *flags):
    return subprocess.run([NVCC, "-std=c++17", "-Werror", "all-warnings", *TARGETS[target], *flags,
                           "-o", str(out), str(_module.DIR / file)], capture_output=True, text=True)


# ---- compile checks (CPU, nvcc) ---------------------------------------------------------------

def test_every_cu_file_is_package_data():
    setup = (pathlib.Path(__file__).resolve().parents[1] / "setup.py").read_text()
    assert '"sparqle.kernels.cupy": ["*.cu"]' in setup
    assert set(CU_FILES) == {"spmm_csr.cu", "nm_linear.cu"}


@needs_nvcc
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("file", CU_FILES)
def test_cu_compiles_to_cubin(tmp_path, file, target):
    """nvcc and ptxas accept every kernel, warnings (ptxas advisories included) being errors."""
    result = _nvcc(file, target, tmp_path / "out.cubin", "-cubin")
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "out.cubin").stat().st_size > 0


@functools.lru_cache(maxsize=None)
def _entry_points(file):
    """The extern "C" kernels of ``file``, from its PTX (sm_80)."""
    with tempfile.TemporaryDirectory() as d:
        out = pathlib.Path(d) / "out.ptx"
        result = _nvcc(file, "sm_80", out, "-ptx")
        assert result.returncode == 0, result.stderr[-4000:]
        return frozenset(re.findall(r"\.entry\s+(\w+)\(", out.read_text()))


# ---- launchers without CuPy: every kernel they ask for exists --------------------------------

class _Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, file, name, grid, block, args, like):
        self.calls.append((file, name, grid, block, args))


@pytest.fixture
def recorded(monkeypatch):
    recorder = _Recorder()
    monkeypatch.setattr(cupy_csr, "launch", recorder)
    monkeypatch.setattr(cupy_nm, "launch", recorder)
    return recorder


@needs_nvcc
@pytest.mark.parametrize("dtype", CSR_DTYPES)
def test_csr_launchers_ask_for_existing_kernels(recorded, dtype):
    """Every (dtype, rows of x, k, layout of x, bias) reaches a kernel the .cu defines, with
    a grid that covers every row of A and of x and 128-thread blocks; x^T is staged
    contiguously, so the vector kernels run wherever the rows of x are a multiple of the
    vector width; the bias goes as its address (null for none) and its stride."""
    entries = _entry_points("spmm_csr.cu")
    for k, n, transposed, with_bias in [(9, 1, False, True), (9, 5, False, False), (70000, 16, False, True),
                                        (9, 19, False, False), (9, 64, False, True), (9, 300, False, False),
                                        (9, 64, True, True)]:
        a = CSR.from_dense(random_sparse(7, k, 0.001 if k > 100 else 0.5, dtype))
        x = torch.randn(k, n, dtype=dtype).T if transposed else torch.randn(n, k, dtype=dtype)
        bias = torch.randn(7, dtype=dtype) if with_bias else None
        recorded.calls.clear()
        cupy_csr.csr_linear(x, a.crow_indices, a.col_indices, a.values, a.row_order, bias)
        cupy_csr.sddmm_csr(a.crow_indices, a.col_indices, torch.randn(7, n, dtype=dtype), x.T)
        for file, name, grid, block, _ in recorded.calls:
            assert file == "spmm_csr.cu" and name in entries, name
            assert block[0] * block[1] == 128
        (_, linear_name, grid, block, args), (_, sddmm_name, sgrid, _, _) = recorded.calls
        subwarp = int(re.search(r"_s(\d+)_", linear_name).group(1))
        width = 16 // dtype.itemsize if linear_name.endswith("_vec") else 1
        assert block[0] == subwarp and grid[0] * block[1] >= 7 and grid[1] * subwarp * width >= n
        assert ("_u16_" in linear_name) == (dtype != torch.float32 and k <= 65536)
        assert linear_name.endswith("_vec") == (n % (16 // dtype.itemsize) == 0)
        assert (int(args[5]) == 0) == (bias is None)
        assert [int(v) for v in args[-3:]] == [1, 7, 1 if with_bias else 0]  # y^T's strides, the bias's
        assert sgrid[0] * block[1] >= a.nnz


@needs_nvcc
def test_nm_launcher_asks_for_existing_kernels(recorded):
    entries = _entry_points("nm_linear.cu")
    for dtype in (torch.float16, torch.bfloat16):
        x, values, meta = torch.randn(70, 45, dtype=dtype), torch.randn(130, 24, dtype=dtype), \
            torch.zeros(130, 2, dtype=torch.int32)
        cupy_nm.nm_linear(x, values, meta, None, 2, 4)
        _, name, grid, block, args = recorded.calls[-1]
        assert name in entries and block == (128,) and grid == (3, 2)
        assert [int(v) for v in args[5:]] == [70, 130, 45, 24, 2]


def test_nm_launcher_rejects_other_patterns_and_dtypes():
    x, values = torch.randn(3, 8, dtype=torch.float16), torch.randn(4, 4, dtype=torch.float16)
    meta = torch.zeros(4, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="2:4 pattern only, got n:m = 2:8"):
        cupy_nm.nm_linear(x, values, meta, None, 2, 8)
    with pytest.raises(ValueError, match="float16 or bfloat16 x, got torch.float32"):
        cupy_nm.nm_linear(x.float(), values.float(), meta, None, 2, 4)


# ---- the backend without CuPy -----------------------------------------------------------------

@pytest.mark.parametrize("how", ["env", "use_backend"])
def test_forced_cupy_says_why_it_cannot_run(monkeypatch, how):
    """Without CuPy (or on CPU tensors) forcing cupy raises ValueError with the reason."""
    a = CSR.from_dense(random_sparse(5, 4, 0.5, torch.float32))
    b = torch.randn(4, 3)
    why = cupy_status(b.device)[1]
    assert why  # CPU tensors: the backend cannot run, CuPy installed or not
    if how == "env":
        monkeypatch.setenv("SPARQLE_BACKEND", "cupy")
        with pytest.raises(ValueError, match=re.escape(why)):
            sparqle.spmm(a, b)
    else:
        with sparqle.use_backend("cupy"), pytest.raises(ValueError, match=re.escape(why)):
            sparqle.spmm(a, b)


# ---- CSR: spmm_csr.cu's schedule emulated on the CPU -------------------------------------------

def emulate_linear_kernel(crow, col, values, row_order, b, bias, subwarp, vec, sparse_vec):
    """C [m, n] = A @ b + bias[:, None] (y^T) and how often each element was written, computed
    as spmm_csr.cu's csr_linear does: blocks of 128 // subwarp rows taken in row_order, column
    tiles of subwarp * vec, the reverse-offset chunk sweep with per-lane loads of sparse_vec
    nonzeros (none past nnz), the broadcast that skips the previous and the next row's
    entries, and the epilogue's bias and guarded stores."""
    crow, col, row_order = crow.tolist(), col.tolist(), row_order.tolist()
    values, bl = values.tolist(), b.tolist()
    m, nnz, (_, n) = len(crow) - 1, len(col), b.shape
    c = torch.full((m, n), float("nan"), dtype=torch.float64)
    writes = torch.zeros(m, n, dtype=torch.int64)
    rows_per_block = 128 // subwarp
    for bx in range(cdiv(m, rows_per_block)):
        for by in range(cdiv(n, subwarp * vec)):
            for ty in range(rows_per_block):
                slot = bx * rows_per_block + ty
                if slot >= m:
                    continue
                row = row_order[slot]
                start, end = crow[row], crow[row + 1]
                acc = [[0.0] * vec for _ in range(subwarp)]
                for chunk in range(start - start % sparse_vec, end, subwarp * sparse_vec):
                    loaded = []
                    for lane in range(subwarp):
                        mine = chunk + lane * sparse_vec
                        if mine + sparse_vec <= nnz:
                            loaded.append([(values[mine + e], col[mine + e]) for e in range(sparse_vec)])
                        else:
                            loaded.append([(values[mine + e], col[mine + e]) if mine + e < nnz else (0.0, 0)
                                           for e in range(sparse_vec)])
                    for src in range(subwarp):
                        first = chunk + src * sparse_vec
                        if first >= end:
                            break
                        for e in range(sparse_vec):
                            a, kk = loaded[src][e]
                            if first + e < start or first + e >= end:
                                continue
                            for lane in range(subwarp):
                                col0 = (by * subwarp + lane) * vec
                                for q in range(vec):
                                    if col0 + q < n:
                                        acc[lane][q] += a * bl[kk][col0 + q]
                bias_row = 0.0 if bias is None else float(bias[row])
                for lane in range(subwarp):
                    col0 = (by * subwarp + lane) * vec
                    for q in range(vec):
                        if col0 + q < n:
                            c[row, col0 + q] = acc[lane][q] + bias_row
                            writes[row, col0 + q] += 1
    return c, writes


def emulate_sddmm_rows(crow, nnz):
    """The row spmm_csr.cu's SDDMM finds for each entry by its binary search in crow."""
    crow, m, rows = crow.tolist(), len(crow) - 1, []
    for i in range(nnz):
        lo, hi = 0, m
        while hi - lo > 1:
            mid = (lo + hi) >> 1
            lo, hi = (mid, hi) if crow[mid] <= i else (lo, mid)
        rows.append(lo)
    return rows


@pytest.mark.parametrize("subwarp,vec,sparse_vec", [(4, 4, 4), (8, 8, 4), (16, 4, 4), (32, 8, 4), (32, 1, 1)])
def test_linear_schedule_emulated(subwarp, vec, sparse_vec):
    """Every element of C = y^T is written once with the right sum and the bias: rows starting
    at every offset modulo the vector width, rows spanning several chunks, empty rows, the
    last chunk at nnz."""
    w = random_sparse(23, 90, 0.15, empty_rows=(0, 5, 22))
    w[7] = torch.randn(90)  # one long row: several chunks
    w[9, :3] = torch.tensor([1.0, -2.0, 0.5])
    a = CSR.from_dense(w)
    b, bias = torch.randn(90, 19, dtype=torch.float64), torch.randn(23, dtype=torch.float64)
    c, writes = emulate_linear_kernel(a.crow_indices, a.col_indices, a.values, a.row_order, b, bias,
                                      subwarp, vec, sparse_vec)
    assert (writes == 1).all()
    assert set((a.crow_indices[:-1] % 4).tolist()) == {0, 1, 2, 3}
    torch.testing.assert_close(c, w @ b + bias[:, None], rtol=1e-12, atol=1e-12)


def test_sddmm_binary_search_finds_every_row():
    a = CSR.from_dense(random_sparse(30, 9, 0.3, empty_rows=(0, 1, 14, 29)))
    counts = a.crow_indices[1:] - a.crow_indices[:-1]
    expected = torch.repeat_interleave(torch.arange(30), counts).tolist()
    assert emulate_sddmm_rows(a.crow_indices, a.nnz) == expected


# ---- N:M 2:4: the format, its decoder, and the mma.sp kernel emulated on the CPU ----------------

def encode_24(w):
    """(values [N, Kc], meta int32 [N, ceil(Kc / 16)]) of a 2:4-sparse [N, K] matrix, following
    the format's contract: per group of 4 the 2 kept positions (largest magnitudes, ties to the
    lower index), increasing, 2 bits each LSB first, 16 positions a word."""
    rows, k = w.shape
    kp = cdiv(k, 4) * 4
    padded = torch.zeros(rows, kp, dtype=w.dtype)
    padded[:, :k] = w
    groups = padded.view(rows, kp // 4, 4)
    order = torch.sort(groups.abs(), dim=2, descending=True, stable=True).indices[:, :, :2]
    pos = torch.sort(order, dim=2).values                         # [N, G, 2] increasing
    values = torch.gather(groups, 2, pos).reshape(rows, kp // 2)
    flat = pos.reshape(rows, -1).long()                            # [N, Kc] 2-bit indices
    words = cdiv(flat.shape[1], 16)
    meta = torch.zeros(rows, words, dtype=torch.int64)
    for j in range(flat.shape[1]):
        meta[:, j // 16] |= flat[:, j] << (2 * (j % 16))
    return values, (meta - (meta >> 31 << 32)).to(torch.int32)  # as signed int32 words


def decode_24(values, meta, k):
    """Dense float64 W [N, k] from (values, meta): kept value j of row r sits at column
    4 (j // 2) + ((meta[r, j // 16] >> (2 (j % 16))) & 3)."""
    rows, kc = values.shape
    words = meta.long() & 0xFFFFFFFF
    w = torch.zeros(rows, 2 * kc, dtype=torch.float64)
    for j in range(kc):
        idx = (words[:, j // 16] >> (2 * (j % 16))) & 3
        w[torch.arange(rows), 4 * (j // 2) + idx] += values[:, j].double()
    return w[:, :k]


def random_24(rows, k, dtype):
    """A random 2:4-sparse [rows, k] matrix (k need not be a multiple of 4)."""
    w = torch.randn(rows, cdiv(k, 4) * 4, dtype=torch.float64)
    keep = torch.rand(rows, w.shape[1] // 4, 4).argsort(dim=2)[:, :, :2]
    mask = torch.zeros(rows, w.shape[1] // 4, 4, dtype=torch.bool).scatter_(2, keep, True)
    return (w * mask.view_as(w))[:, :k].to(dtype)


def test_encode_decode_round_trip():
    w = random_24(9, 45, torch.float64)
    values, meta = encode_24(w)
    assert values.shape == (9, 24) and meta.shape == (9, 2) and meta.dtype == torch.int32
    torch.testing.assert_close(decode_24(values, meta, 45), w, rtol=0, atol=0)


# The PTX ISA's fragment layouts for mma.sp.m16n8k32 with .f16/.bf16, lanes g = lane // 4,
# t = lane % 4, written from the ISA's description independently of the kernel:
#   A (compressed 16 x 16, as dense m16n8k16's A): a_i, i = 0..7, at row g + 8 [i in 2,3,6,7],
#     compressed column 2 t + (i & 1) + 8 [i >= 4].
#   metadata, selector 0: the 2 positions of chunk c (dense columns 4c..4c+3) of row r are bits
#     16 (r // 8) + 4 (c % 4) .. +3 of lane 4 (r % 8) + c // 4 (low 2 bits: the first kept value,
#     compressed column 2c; high 2 bits: the second, 2c + 1); 0b00/0b01/0b10/0b11 repeated is undefined.
#   B (32 x 8): b_i, i = 0..7, at row 2 t + (i & 1) + 8 (i >> 1), column g.
#   D (16 x 8): d_i, i = 0..3, at row g + 8 (i >> 1), column 2 t + (i & 1).

def ptx_mma_sp_m16n8k32(a_regs, b_regs, e_regs):
    """D [lane][4] = A @ B for the lanes' registers, per the PTX ISA layouts above."""
    compressed = torch.zeros(16, 16, dtype=torch.float64)
    b = torch.zeros(32, 8, dtype=torch.float64)
    for lane in range(32):
        g, t = divmod(lane, 4)
        for i in range(8):
            compressed[g + 8 * (i in (2, 3, 6, 7)), 2 * t + (i & 1) + 8 * (i >= 4)] = a_regs[lane][i]
            b[2 * t + (i & 1) + 8 * (i >> 1), g] = b_regs[lane][i]
    a = torch.zeros(16, 32, dtype=torch.float64)
    for r in range(16):
        for c in range(8):
            nibble = (e_regs[4 * (r % 8) + c // 4] >> (16 * (r // 8) + 4 * (c % 4))) & 0xF
            first, second = nibble & 3, nibble >> 2
            assert first < second, f"metadata nibble {nibble:#06b} of row {r} chunk {c} (undefined or unordered)"
            a[r, 4 * c + first] += compressed[r, 2 * c]
            a[r, 4 * c + second] += compressed[r, 2 * c + 1]
    d = a @ b
    return [[d[g + 8 * (i >> 1), 2 * t + (i & 1)].item() for i in range(4)]
            for g, t in (divmod(lane, 4) for lane in range(32))]


def emulate_nm24_kernel(x, values, meta, bias):
    """y [M, N] computed as nm_linear.cu's kernel does, its index math mirrored line by line
    (block, k step, the staging of the block's tiles by its 128 threads, warp, lane, fragment
    reads from the staged tiles, metadata assembly, epilogue), with each mma.sp executed by
    ``ptx_mma_sp_m16n8k32``. Staged elements are None until a thread writes them, so a
    fragment read of an element no thread staged fails."""
    tokens, k = x.shape
    rows, kc = values.shape
    kp = 2 * kc
    words = [[int(v) & 0xFFFFFFFF for v in row] for row in meta.tolist()]
    xv, vv = x.double().tolist(), values.double().tolist()
    y = torch.full((tokens, rows), float("nan"), dtype=torch.float64)

    def stage_chunk(tile, r, c, src, row, col, nrows, ncols):
        valid = max(0, min(8, ncols - col)) if row < nrows else 0
        for e in range(8):
            tile[r][c + e] = src[row][col + e] if e < valid else 0.0

    def stage_step(row0, token0, k0):
        sv = [[None] * (16 + 8) for _ in range(64)]
        sx = [[None] * (32 + 8) for _ in range(64)]
        sm = [None] * 64
        for i in range(128):
            vc = (i % 2) * 8
            stage_chunk(sv, i // 2, vc, vv, row0 + i // 2, k0 // 2 + vc, rows, kc)
            for c in range(i, 64 * 32 // 8, 128):
                xc = (c % 4) * 8
                stage_chunk(sx, c // 4, xc, xv, token0 + c // 4, k0 + xc, tokens, k)
            if i < 64:
                sm[i] = words[row0 + i][k0 // 32] if row0 + i < rows else 0
        return sv, sx, sm

    def meta_word(word, row, k0):
        if row >= rows:
            return 0x44444444
        groups = (kp - k0) // 4
        if groups >= 8:
            return word
        kept = (1 << (4 * groups)) - 1
        return (word & kept) | (0x44444444 & ~kept & 0xFFFFFFFF)

    for bx in range(cdiv(rows, 64)):
        for by in range(cdiv(tokens, 64)):
            row0, token0 = bx * 64, by * 64
            acc = [[[[[0.0] * 4 for _ in range(32)] for _ in range(4)] for _ in range(2)] for _ in range(4)]
            for k0 in range(0, kp, 32):
                sv, sx, sm = stage_step(row0, token0, k0)
                for warp in range(4):
                    warp_row, warp_token = (warp >> 1) * 32, (warp & 1) * 32
                    a, e, b = [[None] * 32 for _ in range(2)], [[None] * 32 for _ in range(2)], \
                        [[None] * 32 for _ in range(4)]
                    for lane in range(32):
                        g, t = lane >> 2, lane & 3
                        for i in range(2):
                            r = warp_row + 16 * i + g
                            a[i][lane] = [sv[r + 8 * (j & 1)][2 * t + 8 * (j >> 1) + h] for j in range(4) for h in (0, 1)]
                            lo, hi = meta_word(sm[r], row0 + r, k0), meta_word(sm[r + 8], row0 + r + 8, k0)
                            e[i][lane] = (lo & 0xFFFF) | (hi << 16 & 0xFFFFFFFF) if t == 0 else \
                                (lo >> 16) | (hi & 0xFFFF0000)
                        for jn in range(4):
                            b[jn][lane] = [sx[warp_token + 8 * jn + g][2 * t + 8 * j + h] for j in range(4) for h in (0, 1)]
                    assert all(v is not None for frag in a + b for regs in frag for v in regs), "read an unstaged element"
                    for i in range(2):
                        for jn in range(4):
                            d = ptx_mma_sp_m16n8k32(a[i], b[jn], e[i])
                            for lane in range(32):
                                for q in range(4):
                                    acc[warp][i][jn][lane][q] += d[lane][q]
            for warp in range(4):
                row_base, token_base = row0 + (warp >> 1) * 32, token0 + (warp & 1) * 32
                for lane in range(32):
                    g, t = lane >> 2, lane & 3
                    for i in range(2):
                        for q in range(4):
                            row = row_base + 16 * i + g + 8 * (q >> 1)
                            if row >= rows:
                                continue
                            shift = 0.0 if bias is None else float(bias[row])
                            for jn in range(4):
                                token = token_base + 8 * jn + 2 * t + (q & 1)
                                if token < tokens:
                                    y[token, row] = acc[warp][i][jn][lane][q] + shift
    return y


@pytest.mark.parametrize("tokens,rows,k,with_bias", [(13, 37, 45, True), (3, 16, 64, False),
                                                     (70, 70, 30, True), (1, 5, 3, False)])
def test_mma_sp_fragment_mapping_emulated(tokens, rows, k, with_bias):
    """The kernel's fragment, metadata and output index math, executed with the PTX ISA's
    mma.sp semantics, gives x @ W^T + bias for W decoded from the format: every element lands
    where the hardware expects it, padded groups get valid metadata, and nothing is left unwritten."""
    w = random_24(rows, k, torch.float64)
    values, meta = encode_24(w)
    x = torch.randn(tokens, k, dtype=torch.float64)
    bias = torch.randn(rows, dtype=torch.float64) if with_bias else None
    expected = x @ decode_24(values, meta, k).T + (0 if bias is None else bias)
    torch.testing.assert_close(emulate_nm24_kernel(x, values, meta, bias), expected, rtol=1e-12, atol=1e-12)


def test_emulated_mma_sp_rejects_unordered_metadata():
    """The emulator checks what the hardware leaves undefined, so the test above can fail."""
    e = [0x44444444 if lane % 4 < 2 else 0 for lane in range(32)]
    e[0] = 0x44444440  # chunk 0 of row 0: positions 0 and 0
    with pytest.raises(AssertionError, match="undefined or unordered"):
        ptx_mma_sp_m16n8k32([[0.0] * 8] * 32, [[0.0] * 8] * 32, e)


# ---- on a GPU with CuPy -----------------------------------------------------------------------

def _csr_case(m, k, n, density, dtype):
    w64 = random_sparse(m, k, density, empty_rows=(0, 3, m - 1) if m > 4 else ())
    w = w64.to(dtype)
    return CSR.from_dense(w.cuda()), w.double(), torch.randn(k, n, dtype=dtype, device="cuda")


@pytest.mark.cupy
@pytest.mark.parametrize("dtype", CSR_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES + [(5, 70000, 16, 0.01), (4, 40000, 8, 0.01), (300, 40, 64, 0.9),
                                   (33, 50, 24, 0.5)],
                         ids=str)
def test_cupy_spmm_matches_oracle(shape, dtype):
    """Shapes off every tile, long rows (many chunks, unaligned starts), 16-bit column indices
    past 32767 (k = 40000), and k past them (70000: 32-bit indices)."""
    a, w64, b = _csr_case(*shape, dtype)
    with sparqle.use_backend("cupy"):
        c = sparqle.spmm(a, b)
    b64 = b.double().cpu()
    assert_close(c, w64 @ b64, w64.abs() @ b64.abs(), dtype, "C")


@pytest.mark.cupy
@pytest.mark.parametrize("dtype", CSR_DTYPES, ids=str)
def test_cupy_spmm_scalar_paths(dtype):
    """Strided b, n not a multiple of the vector width, and values not 16-byte aligned."""
    w64 = random_sparse(29, 31, 0.4)
    a = CSR.from_dense(w64.to(dtype).cuda())
    shifted = torch.empty(a.nnz + 1, dtype=dtype, device="cuda")
    shifted[1:] = a.values
    unaligned = CSR._trusted(**{**a.tensors(), "values": shifted[1:]}, shape=a.shape)
    w = w64.to(dtype).double()
    for csr, b in [(a, torch.randn(24, 31, dtype=dtype, device="cuda").T),
                   (a, torch.randn(31, 19, dtype=dtype, device="cuda")),
                   (unaligned, torch.randn(31, 16, dtype=dtype, device="cuda"))]:
        with sparqle.use_backend("cupy"):
            c = sparqle.spmm(csr, b)
        b64 = b.double().cpu()
        assert_close(c, w @ b64, w.abs() @ b64.abs(), dtype, "C")


@pytest.mark.cupy
@pytest.mark.parametrize("m,k,n", [(0, 4, 3), (4, 0, 3), (4, 5, 0), (0, 0, 0)])
def test_cupy_spmm_empty_dimensions(m, k, n):
    a = CSR.from_dense(torch.zeros(m, k, device="cuda"))
    with sparqle.use_backend("cupy"):
        c = sparqle.spmm(a, torch.randn(k, n, device="cuda"))
    assert c.shape == (m, n) and (c == 0).all()


@pytest.mark.cupy
def test_cupy_row_order_is_a_schedule_not_semantics():
    a, _, b = _csr_case(31, 17, 9, 0.4, torch.float32)
    shuffled = CSR._trusted(**{**a.tensors(), "row_order": torch.randperm(31).to(torch.int32).cuda()},
                            shape=a.shape)
    with sparqle.use_backend("cupy"):
        torch.testing.assert_close(sparqle.spmm(shuffled, b), sparqle.spmm(a, b), rtol=0, atol=0)


@pytest.mark.cupy
def test_cupy_unsorted_and_repeated_columns_add_up():
    a = CSR(torch.tensor([0, 3, 3, 5]), torch.tensor([4, 1, 4, 0, 0]),
            torch.tensor([1.0, 2.0, 3.0, -1.0, 0.5]), (3, 5)).to("cuda")
    dense = torch.zeros(3, 5, dtype=torch.float64)
    dense[0, 4], dense[0, 1], dense[2, 0] = 4.0, 2.0, -0.5
    b = torch.randn(5, 8, device="cuda")
    with sparqle.use_backend("cupy"):
        c = sparqle.spmm(a, b)
    assert_close(c, dense @ b.double().cpu(), dense.abs() @ b.double().cpu().abs(), torch.float32, "C")


@pytest.mark.cupy
@pytest.mark.parametrize("m,k,n,density", [(1, 1, 1, 1.0), (29, 37, 13, 0.3), (8, 19, 70, 0.6),
                                           (11, 7, 5, 0.0), (40, 30, 300, 0.5)])
@pytest.mark.parametrize("dtype", CSR_DTYPES, ids=str)
def test_cupy_sddmm_matches_oracle(m, k, n, density, dtype):
    a = CSR.from_dense(random_sparse(m, k, density, dtype, "cuda", empty_rows=(0, m - 1)))
    x = torch.randn(m, n, dtype=dtype, device="cuda")
    y = torch.randn(k, n, dtype=dtype, device="cuda")
    with sparqle.use_backend("cupy"):
        out = torch.ops.sparqle.sddmm_csr(a.crow_indices, a.col_indices, x, y)
    counts = (a.crow_indices[1:] - a.crow_indices[:-1]).cpu()
    rows, cols = torch.repeat_interleave(torch.arange(m), counts), a.col_indices.long().cpu()
    x64, y64 = x.double().cpu(), y.double().cpu()
    assert_close(out, (x64 @ y64.T)[rows, cols], (x64.abs() @ y64.abs().T)[rows, cols], dtype, "sddmm")


@pytest.mark.cupy
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,k,n,density", [(1, 5, 1, 1.0), (23, 17, 11, 0.3), (40, 9, 32, 0.5)])
@pytest.mark.parametrize("x_layout", X_LAYOUTS)
@pytest.mark.parametrize("bias_layout", BIAS_LAYOUTS)
def test_cupy_linear_and_gradients_match_oracle(dtype, m, k, n, density, x_layout, bias_layout):
    """Through the binding, the bias fused in the .cu epilogue, x and bias in every layout;
    the backward's SDDMM and the linear of dy over A^T run on CuPy too."""
    w = CSR.from_dense(random_sparse(m, k, density, dtype, "cuda", empty_rows=(1,)))
    check_linear(w, laid_out_x(n, k, x_layout, dtype, "cuda"), laid_out_bias(m, bias_layout, dtype, "cuda"), "cupy")


@pytest.mark.cupy
def test_cupy_opcheck(monkeypatch):
    monkeypatch.setenv("SPARQLE_BACKEND", "cupy")
    a = CSR.from_dense(random_sparse(13, 11, 0.4, torch.float32, "cuda"))
    x = torch.randn(6, 11, device="cuda", requires_grad=True)
    values = a.values.clone().requires_grad_(True)
    for bias in (None, torch.randn(13, device="cuda", requires_grad=True)):
        torch.library.opcheck(torch.ops.sparqle.csr_linear.default,
                              (x, a.crow_indices, a.col_indices, values, a.row_order, bias))
    x, y = torch.randn(13, 5, device="cuda"), torch.randn(11, 5, device="cuda")
    torch.library.opcheck(torch.ops.sparqle.sddmm_csr.default, (a.crow_indices, a.col_indices, x, y))


@pytest.mark.cupy
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tokens,rows,k,with_bias", [(1, 1, 1, False), (13, 37, 45, True), (64, 64, 64, False),
                                                     (130, 200, 1000, True), (5, 4096, 4096, True)])
def test_cupy_nm_linear_matches_oracle(dtype, tokens, rows, k, with_bias):
    w = random_24(rows, k, dtype)
    values, meta = encode_24(w)
    x = torch.randn(tokens, k, dtype=dtype)
    bias = torch.randn(rows, dtype=dtype) if with_bias else None
    y = cupy_nm.nm_linear(x.cuda(), values.cuda(), meta.cuda(), None if bias is None else bias.cuda(), 2, 4)
    w64, x64 = decode_24(values, meta, k), x.double()
    b64 = 0 if bias is None else bias.double()
    assert_close(y, x64 @ w64.T + b64, x64.abs() @ w64.abs().T + (0 if bias is None else b64.abs()),
                 dtype, "y")


@pytest.mark.cupy
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cupy_nm_linear_stages_misaligned_operands(dtype):
    """x and values starting at an odd element (contiguous views of a shifted storage, rows
    that would take 16-byte cp.async otherwise): the kernel stages them with plain loads."""
    tokens, rows, k = 70, 96, 256
    w = random_24(rows, k, dtype)
    values, meta = encode_24(w)
    x = torch.randn(tokens, k, dtype=dtype)
    x_odd = torch.empty(tokens * k + 1, dtype=dtype, device="cuda")[1:].view(tokens, k).copy_(x)
    values_odd = torch.empty(values.numel() + 1, dtype=dtype, device="cuda")[1:].view(values.shape).copy_(values)
    y = cupy_nm.nm_linear(x_odd, values_odd, meta.cuda(), None, 2, 4)
    w64, x64 = decode_24(values, meta, k), x.double()
    assert_close(y, x64 @ w64.T, x64.abs() @ w64.abs().T, dtype, "y")
