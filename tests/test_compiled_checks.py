"""Checks that must hold under torch.compile: the index checks of the window ops (mask_index,
partition and merge indices out of range or repeated) raise ValueError compiled as they do
eagerly, for indices hypothesis draws, on every (device, backend); and linear on a freshly
built CSR or Blocked-ELL compiles with fullgraph=True on its first call, x requiring grad."""
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparqle
from sparqle import CSR, BlockedELL

from ._oracle import random_sparse
from .conftest import device_backends

BACKENDS = pytest.mark.parametrize("device,backend", device_backends(), ids=lambda p: str(p))
B, H, W, C, WS = 2, 8, 8, 3, 4  # 4 windows per image
NW = (H // WS) * (W // WS)


def bad_index(data, rows, per_row, high):
    """An integer [rows, per_row] (or [rows] when per_row is None) tensor with at least one
    value outside [0, high), or (for rows of windows) a window named twice in one row."""
    shape = (rows,) if per_row is None else (rows, per_row)
    index = torch.stack([torch.randperm(high)[:per_row or 1] for _ in range(rows)]).reshape(shape)
    kind = data.draw(st.sampled_from(["negative", "too large"] + (["repeated"] if per_row else [])), label="kind")
    where = tuple(data.draw(st.integers(0, s - 1), label="where") for s in shape)
    if kind == "repeated":
        index[where[0], :] = index[where[0], 0]
    else:
        index[where] = data.draw(st.integers(-1000, -1) if kind == "negative" else st.integers(high, high + 1000),
                                 label="value")
    return index


OPS = {
    "mask_index": lambda x, windows, q, mask, index: sparqle.window_attention(q, q, q, mask=mask, mask_index=index),
    "partition": lambda x, windows, q, mask, index: sparqle.window_partition(x, WS, 1, index),
    "merge": lambda x, windows, q, mask, index: sparqle.window_merge(windows, x, WS, 1, index),
}


@pytest.mark.parametrize("op", sorted(OPS))
@BACKENDS
def test_window_index_checks_hold_compiled(op, device, backend):
    x, windows = torch.randn(B, H, W, C), torch.randn(B * 2, WS * WS, C)
    q, mask = torch.randn(B * NW, 1, 16, 8), torch.zeros(NW, 16, 16)
    torch._dynamo.reset()
    compiled = torch.compile(OPS[op], fullgraph=True)
    good = torch.arange(B * NW) % NW if op == "mask_index" else torch.tensor([[0, 3], [2, 1]])
    with sparqle.use_backend(backend):
        torch.testing.assert_close(compiled(x, windows, q, mask, good), OPS[op](x, windows, q, mask, good))

    @settings(max_examples=10, deadline=None)
    @given(data=st.data())
    def raises_compiled_and_eager(data):
        index = bad_index(data, B * NW, None, NW) if op == "mask_index" else bad_index(data, B, 2, NW)
        with sparqle.use_backend(backend):
            for run in (compiled, OPS[op]):
                with pytest.raises(ValueError, match="outside|twice"):
                    run(x, windows, q, mask, index)

    raises_compiled_and_eager()


def test_a_converted_model_compiles_fullgraph_before_any_eager_call_in_the_process():
    """In a fresh process, a converted model compiled with fullgraph=True before any op ran
    eagerly (the common convert-then-compile): the registry's callables are resolved at
    import, so tracing meets no lazily cached attribute (a cached_property's lock stopped
    Dynamo there). A subprocess: in this one, earlier tests have called every op."""
    import subprocess
    import sys
    script = (
        "import torch, sparqle\n"
        "torch.manual_seed(0)\n"
        "for fmt, kw in [('int8', {}), ('int4', {}), ('2:4', {}), ('csr', {'sparsity': 0.5}), ('fp8', {})]:\n"
        "    m = torch.nn.Sequential(torch.nn.Linear(64, 32))\n"
        "    sparqle.convert(m, fmt, **kw)\n"
        "    x = torch.randn(5, 64)\n"
        "    y = torch.compile(m, backend='aot_eager', fullgraph=True)(x)\n"
        "    torch.testing.assert_close(y, m(x), rtol=0, atol=0)\n"
        "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "SPARQLE_BACKEND": "torch"})
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


@pytest.mark.parametrize("fmt", ["csr", "bell"])
@BACKENDS
def test_sparse_linear_compiles_fullgraph_on_the_first_call(fmt, device, backend):
    dense = random_sparse(24, 40, 0.3, torch.float32)
    x = torch.randn(5, 40, requires_grad=True)

    def fresh():
        return CSR.from_dense(dense) if fmt == "csr" else BlockedELL.from_dense(dense, 16)

    torch._dynamo.reset()
    with sparqle.use_backend(backend):
        w = fresh()
        y = torch.compile(lambda t: sparqle.linear(t, w), fullgraph=True)(x)
        (grad,) = torch.autograd.grad(y.sum(), x)
        expected = sparqle.linear(x, fresh())
        (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(grad, expected_grad)
