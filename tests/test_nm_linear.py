"""N:M linear on every (device, backend) against the float64 oracle of its dense weight:
forward in every pattern, the small-M split-K and tiled paths, the expanded-W and
cuSPARSELt paths and auto's measured choice on CUDA, when values count as changed, the
to_dense op, sparse training in SparseLinear, and bad input (the contract of nm_linear:
gradients, gradcheck, opcheck, compile, state_dict, spmm: tests/test_contract.py)."""

import pytest
import torch
from torch import nn

import sparqle
from sparqle import SemiStructured
from sparqle.formats import nm as codec
from sparqle.formats.nm import PATTERNS
from sparqle.nn import SparseLinear

from ._oracle import assert_close
from .conftest import device_backends

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (rows of x, out, in): one row, the small-M and tiled paths, in not a multiple of m or
# of any block.
SHAPES = [(1, 24, 70), (5, 33, 64), (19, 17, 45), (40, 9, 129)]
TRITON_DEVICES = [d for d, b in device_backends() if b == "triton"]


def _weight(out, k, n, m, dtype, device):
    return SemiStructured.from_dense(torch.randn(out, k, dtype=dtype), n, m).to(device)


def _oracle(x, w, bias):
    w64, x64 = w.to_dense().double().cpu(), x.double().cpu().reshape(-1, w.shape[1])
    b64 = torch.zeros(w.shape[0], dtype=torch.float64) if bias is None else bias.double().cpu()
    return x64 @ w64.T + b64, x64.abs() @ w64.abs().T + b64.abs()


@pytest.mark.parametrize("rows,out,k", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_matches_oracle(device_backend, rows, out, k, dtype, with_bias):
    device, backend = device_backend
    w = _weight(out, k, 2, 4, dtype, device)
    x = torch.randn(rows, k, dtype=dtype, device=device)
    bias = torch.randn(out, dtype=dtype, device=device) if with_bias else None
    with sparqle.use_backend(backend):
        if backend == "triton" and dtype == torch.float64:
            with pytest.raises(ValueError, match="backend 'triton' runs sparqle::nm_linear in .*not torch.float64"):
                sparqle.linear(x, w, bias)
            return
        y = sparqle.linear(x, w, bias)
    assert_close(y, *_oracle(x, w, bias), dtype, "y")


@pytest.mark.parametrize("n,m", PATTERNS, ids=str)
@pytest.mark.parametrize("rows", [3, 21])
def test_every_pattern(device_backend, n, m, rows):
    device, backend = device_backend
    w = _weight(20, 77, n, m, torch.float32, device)
    x = torch.randn(rows, 77, device=device)
    with sparqle.use_backend(backend):
        y = sparqle.linear(x, w)
    assert_close(y, *_oracle(x, w, None), torch.float32, f"y ({n}:{m})")


def test_all_zero_weight_and_empty_dimensions(device_backend):
    device, backend = device_backend
    with sparqle.use_backend(backend):
        zero = SemiStructured.from_dense(torch.zeros(6, 13, device=device))
        x = torch.randn(4, 13, device=device)
        assert torch.equal(sparqle.linear(x, zero), torch.zeros(4, 6, device=device))
        w = _weight(6, 13, 2, 4, torch.float32, device)
        assert sparqle.linear(torch.randn(0, 13, device=device), w).shape == (0, 6)
        empty = SemiStructured.from_dense(torch.randn(0, 13, device=device))
        assert sparqle.linear(x, empty).shape == (4, 0)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_small_m_and_tiled_paths(device):
    """The Triton kernel on both sides of SPLIT_K_MAX_M (split-K and tiled) meets the oracle."""
    from sparqle.kernels.dispatch import SPLIT_K_MAX_M
    w = _weight(24, 100, 2, 4, torch.float32, device)
    bias = torch.randn(24, device=device)
    for rows in (1, SPLIT_K_MAX_M, SPLIT_K_MAX_M + 1, 57):
        x = torch.randn(rows, 100, device=device)
        with sparqle.use_backend("triton"):
            y = sparqle.linear(x, w, bias)
        assert_close(y, *_oracle(x, w, bias), torch.float32, f"y (M={rows})")


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,m", PATTERNS, ids=str)
def test_triton_to_dense_is_exact(device, dtype, n, m):
    """The Triton expansion writes every element (outputs are poisoned) and equals the
    torch one bit for bit: rows and columns not multiples of its tile, one row, no rows."""
    from sparqle.kernels.triton import nm_linear as triton_nm
    for out, k in [(37, 150), (1, 7), (0, 9)]:
        w = _weight(out, k, n, m, dtype, device)
        dense = triton_nm.to_dense(w.values, w.meta, n, m, k)
        assert dense.shape == (out, k) and dense.dtype == dtype
        assert torch.equal(dense, codec.to_dense(w.values, w.meta, n, m, k))


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)], ids=str)
def test_expanded_linear_matches_oracle(device, dtype, n, m):
    """W expanded by the Triton kernel for one dense GEMM: auto's reference on CUDA."""
    from sparqle.kernels.triton import nm_linear as triton_nm
    w = _weight(21, 45, n, m, dtype, device)
    x, bias = torch.randn(6, 45, dtype=dtype, device=device), torch.randn(21, dtype=dtype, device=device)
    y = triton_nm.expanded_linear(x, w.values, w.meta, bias, n, m)
    assert y.dtype == dtype
    assert_close(y, *_oracle(x, w, bias), dtype, f"y ({n}:{m})")


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and torch.backends.cusparselt.is_available()),
                    reason="needs cuSPARSELt on a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows,out,k", [(1, 24, 70), (5, 33, 64), (19, 48, 45), (200, 64, 256)], ids=str)
@pytest.mark.parametrize("changed", [False, True])
def test_cusparselt_linear_matches_oracle(dtype, rows, out, k, changed):
    """cuSPARSELt on sparse tensor cores, rows, columns and M not multiples of its tiles;
    the kept compression follows an in-place change of the values."""
    from sparqle.bindings.nm_linear import _cusparselt_linear
    w = _weight(out, k, 2, 4, dtype, "cuda")
    x, bias = torch.randn(rows, k, dtype=dtype, device="cuda"), torch.randn(out, dtype=dtype, device="cuda")
    y = _cusparselt_linear(x, w.values, w.meta, bias, changed)
    assert y.shape == (rows, out) and y.is_contiguous()
    assert_close(y, *_oracle(x, w, bias), dtype, "y")
    w.values.mul_(-2)
    assert_close(_cusparselt_linear(x, w.values, w.meta, None, changed), *_oracle(x, w, None),
                 dtype, "y after values changed")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_auto_on_cuda_measures_and_meets_the_oracle(dtype):
    """auto times its candidates once per (shape, M bucket, values changed) and runs the
    winner; values modified in place between calls (a training step) are timed under their
    own key, and every result follows the new values."""
    from sparqle.bindings import _fastest
    w = _weight(64, 96, 2, 4, dtype, "cuda")
    bias = torch.randn(64, dtype=dtype, device="cuda")
    for rows in (1, 16, 17, 300, 2048):
        x = torch.randn(rows, 96, dtype=dtype, device="cuda")
        for step, changed in ((0, False), (1, False), (2, True)):
            if changed:
                w.values.mul_(-0.5)
            y = sparqle.linear(x, w, bias)
            assert_close(y, *_oracle(x, w, bias), dtype, f"y (M={rows}, call {step})")
            key = ("nm_linear", x.device, dtype, 2, 4, 1 << (rows - 1).bit_length(), 64, 96, True, changed)
            assert _fastest._fastest[key] in ("cublas", "triton", "cusparselt")


class TestValuesChanged:
    """The N:M binding's cache policy on CUDA, its logic run here on CPU tensors: whether
    values changed since their last call (the timing key's last field), and cuSPARSELt's
    compressed copy kept while they do not, made on every call when they do."""

    @pytest.fixture(autouse=True)
    def _fresh(self, monkeypatch):
        from sparqle.bindings import nm_linear as binding
        monkeypatch.setattr(binding, "_last_versions", {})
        self.binding = binding

    def _changed(self, x, values, bias=None):
        key, changed = self.binding._timing_key(x, values, bias, 2, 4)
        assert key[-1] == changed
        return changed

    def test_in_place_updates_are_seen(self):
        x, values = torch.randn(3, 8), torch.randn(5, 4)
        assert not self._changed(x, values)  # the first call
        assert not self._changed(x, values)
        values.add_(1)  # an optimizer step
        assert self._changed(x, values)
        assert not self._changed(torch.randn(40, 8), values)  # another M: the same tensor
        with torch.no_grad():
            values.mul_(2)
        assert self._changed(x, values, torch.randn(5))
        assert not self._changed(x, values.clone())  # a new tensor: its first call

    def test_layers_of_one_shape_are_tracked_apart(self):
        """Two layers of one shape called in turn (a model's blocks) are unchanged; only the
        one updated in place is changed."""
        x, first, second = torch.randn(3, 8), torch.randn(5, 4), torch.randn(5, 4)
        for _ in range(3):
            assert not self._changed(x, first) and not self._changed(x, second)
        second.sub_(1)
        assert not self._changed(x, first) and self._changed(x, second)

    def test_a_freed_tensor_is_forgotten(self):
        values = torch.randn(5, 4)
        self._changed(torch.randn(3, 8), values)
        assert len(self.binding._last_versions) == 1
        del values
        assert self.binding._last_versions == {}

    def test_inference_tensors_never_count_as_changed(self):
        with torch.inference_mode():
            x, values = torch.randn(3, 8), torch.randn(5, 4)
            assert not self._changed(x, values)
            values.add_(1)
            assert not self._changed(x, values)

    @pytest.mark.parametrize("changed,compressions", [(False, 1), (True, 3)])
    def test_cusparselt_copy_is_kept_unless_values_changed(self, monkeypatch, changed, compressions):
        """Three runs of the cuSPARSELt candidate (as timing runs it): one compression
        while values are unchanged, one per run when they changed; an in-place update then
        makes the kept copy again."""
        from sparqle.bindings._backend import kernels
        on_torch = kernels("torch", "nm_linear")
        made = []
        monkeypatch.setattr(self.binding, "_cusparselt_runs", lambda *args: True)
        monkeypatch.setattr(on_torch, "cusparselt_compress", lambda dense: made.append(dense.clone()) or dense)
        monkeypatch.setattr(on_torch, "cusparselt_linear",
                            lambda x, dense, bias, out: torch.nn.functional.linear(x, dense, bias))
        w = _weight(6, 16, 2, 4, torch.float32, "cpu")
        x = torch.randn(3, 16)
        candidates = self.binding._cuda_candidates(x, w.values, w.meta, None, 2, 4, changed)
        assert list(candidates) == ["cublas", "triton", "cusparselt"]
        for _ in range(3):
            assert_close(candidates["cusparselt"](), *_oracle(x, w, None), torch.float32, "y")
        assert len(made) == compressions
        w.values.mul_(-1)
        assert_close(candidates["cusparselt"](), *_oracle(x, w, None), torch.float32, "y after values changed")
        assert len(made) == compressions + 1 and torch.equal(made[-1], w.to_dense())


def test_cusparselt_algorithm_is_searched_once_per_problem_and_never_in_capture(monkeypatch):
    """cuSPARSELt's algorithm comes from its own search at the first call of a problem
    (device, dtype, padded x, padded N, bias) and is kept: the id found is the one the
    product runs with; a new padded M searches again, M = 1 to 8 share one search. While a
    graph is captured an unsearched problem runs algorithm 0 and stays unsearched. (torch's
    cuSPARSELt ops faked on the CPU: the "compressed" weight is the padded dense one.)"""
    from sparqle.bindings._backend import kernels
    on_torch = kernels("torch", "nm_linear")
    searches, runs = [], []

    def product(compressed, dense_t, bias=None, transpose_result=True):
        y = (compressed @ dense_t).T
        return y + bias if bias is not None else y

    def search(compressed, dense_t, bias=None, transpose_result=True):
        searches.append(tuple(dense_t.shape))
        return 7

    def sparse_mm(compressed, dense_t, bias=None, transpose_result=True, alg_id=0):
        runs.append(alg_id)
        return product(compressed, dense_t, bias, transpose_result)

    monkeypatch.setattr(on_torch, "_ALGORITHMS", {})
    monkeypatch.setattr(torch, "_cslt_sparse_mm_search", search)
    monkeypatch.setattr(torch, "_cslt_sparse_mm", sparse_mm)
    w = _weight(20, 40, 2, 4, torch.float32, "cpu")
    compressed = on_torch._padded(w.to_dense(), 16, 16)
    bias = torch.randn(20)
    for rows in (3, 8, 5, 9):
        x = torch.randn(rows, 40)
        assert_close(on_torch.cusparselt_linear(x, compressed, bias, 20), *_oracle(x, w, bias), torch.float32, "y")
    assert searches == [(48, 8), (48, 16)] and runs == [7, 7, 7, 7]
    monkeypatch.setattr(on_torch, "host_reads_allowed", lambda: False)
    x = torch.randn(17, 40)
    assert_close(on_torch.cusparselt_linear(x, compressed, None, 20), *_oracle(x, w, None), torch.float32, "y")
    assert runs[-1] == 0 and len(searches) == 2 and len(on_torch._ALGORITHMS) == 2


def test_opcheck_to_dense():
    """(nm_linear itself: tests/test_contract.py, with every other contract check.)"""
    w = _weight(20, 70, 2, 4, torch.float32, "cpu")
    torch.library.opcheck(torch.ops.sparqle.nm_to_dense.default, (w.values, w.meta, 2, 4, 70))


def test_module_and_sparse_training():
    model = nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 8))
    sparqle.convert(model, "2:4")
    assert isinstance(model[0], SparseLinear) and "format=2:4" in repr(model[0])
    model[2] = SparseLinear.from_linear(nn.Linear(24, 8), format="4:8")
    x = torch.randn(16, 32)
    # Sparse training with the pattern fixed: the loss falls and the weight stays 2:4.
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    target = torch.randn(16, 8)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = ((model(x) - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    dense = model[0].weight.to_dense()
    assert ((dense.view(24, 8, 4) != 0).sum(-1) <= 2).all()


class TestBadInput:
    def setup_method(self):
        self.w = _weight(8, 20, 2, 4, torch.float32, "cpu")

    def test_linear(self):
        with pytest.raises(TypeError, match="x has dtype torch.float16"):
            sparqle.linear(torch.randn(2, 20, dtype=torch.float16), self.w)
        with pytest.raises(ValueError, match="x must have w.shape"):
            sparqle.linear(torch.randn(2, 19), self.w)
        with pytest.raises(ValueError, match="x is on meta"):
            sparqle.linear(torch.randn(2, 20, device="meta"), self.w)
        with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
            sparqle.linear(torch.randn(2, 20), self.w, torch.randn(7))
        with pytest.raises(ValueError, match="b must have a.shape"):
            sparqle.spmm(self.w, torch.randn(19, 3))

    def test_module(self):
        with pytest.raises(ValueError, match="format must be one of"):
            SparseLinear.from_linear(nn.Linear(8, 8), format="3:4")
        with pytest.raises(ValueError, match="format='2:4' sets the sparsity"):
            SparseLinear.from_linear(nn.Linear(8, 8), 0.5, format="2:4")
        with pytest.raises(ValueError, match="sparsity is required"):
            SparseLinear.from_linear(nn.Linear(8, 8), format="csr")
        with pytest.raises(ValueError, match="fmt must be one of"):
            sparqle.convert(nn.Sequential(nn.Linear(8, 8)), "2:3")
