"""Memory bounds: a call of a quantized layer holds at most one dense copy of its weight in
the compute dtype at once (the torch paths decode a block of rows at a time), forward and
backward, measured by the benchmark harness's peak per call; SparseWindowBlock keeps an
LRU of its shift masks. Shapes are large enough (2048 x 2048) that a whole-weight temporary
stands far above the bound and the page-granular measurement."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparqle
from sparqle import FP8Weight, Int4Weight, Int8Weight
from sparqle.bench.harness import peak_bytes
from sparqle.nn import SparseWindowBlock
from sparqle.nn.window_attention import MASK_CACHE_SIZE

from .test_window_modules import reference_block

N = K = 2048
DENSE_FP32 = N * K * 4  # one dense copy of the weight in the compute dtype (fp32)

pytestmark = pytest.mark.skipif(peak_bytes(lambda: None) is None,
                                reason="no peak-memory measurement on this platform")


def weight(fmt):
    w = torch.randn(N, K)
    if fmt == "int8":
        return Int8Weight.from_float(w)
    if fmt == "int4":
        return Int4Weight.from_float(w, 128)
    return FP8Weight.from_float(w)


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("m", [1, 32])
def test_forward_and_backward_hold_one_dense_copy_at_most(fmt, m):
    """The torch path (the CPU's), W8A8 for int8 and FP8 at M = 32."""
    w = weight(fmt)
    x = torch.randn(m, K, requires_grad=True)
    g = torch.randn(m, N)
    with sparqle.use_backend("torch"):
        # warm, forward and backward: anything made once (the first backward's autograd and
        # BLAS workspaces, 130 MB on this CPU when the test runs first in its process) is not
        # a per-call transient
        torch.autograd.grad(sparqle.linear(x, w), x, g)
        forward = peak_bytes(lambda: sparqle.linear(x.detach(), w))
        backward = peak_bytes(lambda: torch.autograd.grad(sparqle.linear(x, w), x, g))
    assert forward <= DENSE_FP32, f"forward holds {forward / 2**20:.1f} MB"
    assert backward <= DENSE_FP32 + (4 << 20), f"backward holds {backward / 2**20:.1f} MB"


@settings(max_examples=3, deadline=None)
@given(sizes=st.lists(st.tuples(st.integers(4, 12), st.integers(4, 12)), min_size=MASK_CACHE_SIZE + 1,
                      max_size=3 * MASK_CACHE_SIZE, unique=True))
def test_shift_mask_cache_is_bounded(sizes):
    block = SparseWindowBlock.from_block(reference_block(8, 8, 4, 2), 0.5)
    for h, w in sizes:
        block(torch.randn(1, h, w, 16))
        assert len(block._masks) <= MASK_CACHE_SIZE
    assert next(reversed(block._masks))[:2] == sizes[-1]  # the latest is kept
