"""Second derivatives (double backward) through the sparse weights, on every (device,
backend): N:M in x, values and bias, CSR in x, against float64 autograd through the dense
weight; those that are not supported (a CSR weight's values, Blocked-ELL) raise
NotImplementedError saying what is not supported and what to do instead."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparqle
from sparqle import CSR, BlockedELL, SemiStructured
from sparqle.formats.nm import PATTERNS

from ._oracle import assert_close, random_sparse
from .conftest import device_backends
from .test_fuzz_ops import nm_dense

BACKENDS = pytest.mark.parametrize("device,backend", device_backends(), ids=lambda p: str(p))
F32 = torch.float32


def seeded_sizes(data):
    """(M, N, K), each in [1, 9], after seeding torch from the data."""
    torch.manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    return tuple(data.draw(st.integers(1, 9), label=s) for s in ("M", "N", "K"))


def second_derivatives(linear, x, leaves):
    """d/d(leaves) of |d/dx sum(y^2)|^2: through the first backward, again."""
    (gx,) = torch.autograd.grad(linear(x).pow(2).sum(), x, create_graph=True)
    return torch.autograd.grad(gx.pow(2).sum(), leaves)


@BACKENDS
@settings(max_examples=5, deadline=None)
@given(data=st.data())
def test_nm_second_derivatives(device, backend, data):
    rows, out, k = seeded_sizes(data)
    n, m = data.draw(st.sampled_from(PATTERNS), label="n:m")
    w = SemiStructured.from_dense(torch.randn(out, k), n, m)
    w.values.requires_grad_(True)
    bias = torch.randn(out, requires_grad=True)
    x = torch.randn(rows, k, requires_grad=True)
    with sparqle.use_backend(backend):
        got = second_derivatives(lambda t: sparqle.linear(t, w, bias), x, [x, w.values, bias])
    _, cols = nm_dense(w.values, w.meta, n, m, k)

    def oracle(sign):
        """The second derivatives in float64 through W as a differentiable function of the
        kept values; of |x|, |values|, |bias| with ``sign=abs``: every term of these
        polynomials has a positive coefficient, so that is the sum of |terms|, the scale
        of the rounding error."""
        x64, values64, bias64 = (sign(t.detach().double()).requires_grad_(True) for t in (x, w.values, bias))

        def linear64(t):
            w64 = torch.zeros(out, cols.shape[1] // n * m, dtype=torch.float64).scatter(1, cols, values64)
            return torch.nn.functional.linear(t, w64[:, :k], bias64)

        return second_derivatives(linear64, x64, [x64, values64, bias64])

    for name, g, e, scale in zip(("x", "values", "bias"), got, oracle(lambda t: t), oracle(torch.abs)):
        assert_close(g, e, scale, F32, f"d2/d{name}")


@BACKENDS
@settings(max_examples=5, deadline=None)
@given(data=st.data())
def test_csr_second_derivative_in_x(device, backend, data):
    rows, out, k = seeded_sizes(data)
    dense = random_sparse(out, k, 0.4, F32)
    w = CSR.from_dense(dense)
    x = torch.randn(rows, k, requires_grad=True)
    with sparqle.use_backend(backend):
        (got,) = second_derivatives(lambda t: sparqle.linear(t, w), x, [x])
    expected, scale = (second_derivatives(lambda t: t @ sign(dense.double()).T, x64, [x64])[0]
                       for sign in (lambda t: t, torch.abs)
                       for x64 in [sign(x.detach().double()).requires_grad_(True)])
    assert_close(got, expected, scale, F32, "d2/dx")


@pytest.mark.parametrize("fmt,wrt", [("csr", "values"), ("bell", "x"), ("bell", "values")])
@BACKENDS
def test_unsupported_second_derivatives_say_so(fmt, wrt, device, backend):
    dense = random_sparse(20, 24, 0.5, F32)
    w = CSR.from_dense(dense) if fmt == "csr" else BlockedELL.from_dense(dense, 16)
    w.values.requires_grad_(True)
    x = torch.randn(3, 24, requires_grad=True)
    leaf = x if wrt == "x" else w.values
    with sparqle.use_backend(backend):
        (g,) = torch.autograd.grad(sparqle.linear(x, w).pow(2).sum(), leaf, create_graph=True)
        with pytest.raises(NotImplementedError, match="second derivative.*not supported.*to_dense"):
            torch.autograd.grad(g.pow(2).sum(), [x, w.values])
