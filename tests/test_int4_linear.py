"""int4 weight-only linear: the format (pack/unpack exact, quantization rules, SQNR), the op
on every (device, backend) against the float64 oracle of its dequantized weight, the
dequantize op, the module, convert, adapter training, and bad input (the contract of
int4_linear: gradients, gradcheck, opcheck, compile, state_dict: tests/test_contract.py)."""

import pytest
import torch
import triton
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sparqle
from sparqle import Int4Weight
from sparqle.formats.int4 import GROUP_SIZES, sqnr_db
from sparqle.nn import Int4Linear

from ._oracle import assert_close, int4_stored_byte
from .conftest import device_backends


def _packed_by_the_docs(q: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """``packed`` built entry by entry as docs/int4.md describes it: K padded to a multiple
    of 128 with the codes ``pad`` (one a row); in K order, byte b of a row holds q[2b] (low
    nibble) and q[2b + 1] (high), stored at ``int4_stored_byte(b)``."""
    n, k = q.shape
    width = 64 * -(-k // 128)
    codes = torch.cat([q, pad[:, None].expand(n, 2 * width - k)], 1).int()
    packed = torch.zeros(n, width, dtype=torch.uint8)
    for b in range(width):
        byte = codes[:, 2 * b] | codes[:, 2 * b + 1] << 4
        packed[:, int4_stored_byte(b)] = byte.to(torch.uint8)
    return packed


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 9), k=st.integers(0, 300), group=st.sampled_from([32, 64, -1]),
       seed=st.integers(0, 2**16))
def test_pack_unpack_exact(n, k, group, seed):
    """unpack reads the documented layout (any padding codes), and from_codes writes it
    (padded with the last group's zero point)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    groups = -(-k // (k if group == -1 else group)) if k else 0
    scales, zeros = torch.rand(n, groups) + 0.1, torch.randint(0, 16, (n, groups)).float()
    w = Int4Weight(_packed_by_the_docs(q, torch.randint(0, 16, (n,), dtype=torch.uint8, generator=g)),
                   scales, zeros, (n, k), group)
    assert torch.equal(w.unpack(), q)
    packed = Int4Weight.from_codes(q, scales, zeros, group).packed
    pad = zeros[:, -1].to(torch.uint8) if groups else torch.zeros(n, dtype=torch.uint8)
    assert torch.equal(packed, _packed_by_the_docs(q, pad))


def test_each_thread_of_a_quad_finds_its_fragment_bytes_contiguous():
    """Why the tiles are interleaved: in a 128-code K step, the tensor cores' register fragment
    (wgmma's A from registers, mma.sync's A) gives the thread of quad lane t codes 2t, 2t + 1
    of every 8 (bytes t, t + 4, ... in K order); in ``packed`` they are 16 contiguous bytes."""
    q = torch.randint(0, 16, (1, 256), generator=torch.Generator().manual_seed(0))
    packed = Int4Weight.from_codes(q, torch.ones(1, 2), torch.zeros(1, 2), 128).packed
    for tile in range(2):
        for t in range(4):
            run = packed[0, 64 * tile + 16 * t: 64 * tile + 16 * t + 16].long()
            codes = torch.stack([run & 15, run >> 4], -1).flatten()      # the thread's codes, in order
            fragment = [128 * tile + 8 * i + 2 * t + j for i in range(16) for j in range(2)]
            assert torch.equal(codes, q[0, fragment])


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group", [32, 128, -1])
@pytest.mark.parametrize("k", [1, 77, 300])
def test_quantization_follows_the_rules(symmetric, group, k):
    """q, scale and zero are exactly the documented functions of w; dequantize is (q - z) s."""
    w = torch.randn(6, k, dtype=torch.float64)
    qw = Int4Weight.from_float(w, group, symmetric=symmetric)
    width = k if group == -1 else group
    s = qw.scales.repeat_interleave(width, 1)[:, :k]
    z = qw.zeros.repeat_interleave(width, 1)[:, :k]
    q = qw.unpack().double()
    assert torch.equal(q, torch.clamp(torch.round(w / s) + z, 0, 15))
    assert torch.equal(qw.dequantize(), ((q - z) * s))
    groups = torch.nn.functional.pad(w, (0, -(-k // width) * width - k)).view(6, -1, width)
    if symmetric:
        assert torch.equal(qw.zeros, torch.full_like(qw.zeros, 8))
        torch.testing.assert_close(qw.scales, groups.abs().amax(-1) / 7)
    else:
        lo, hi = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
        torch.testing.assert_close(qw.scales, (hi - lo) / 15)
        assert torch.equal(qw.zeros, torch.clamp(torch.round(-lo / qw.scales), 0, 15))
    assert qw.packed.shape == (6, 64 * -(-k // 128)) and qw.scales.dtype == torch.float64


def test_sqnr_floor_and_mse_beats_minmax():
    w = torch.randn(256, 1024)
    minmax = Int4Weight.from_float(w, 128)
    mse = Int4Weight.from_float(w, 128, method="mse")
    assert sqnr_db(w, minmax.dequantize()) >= 17.0
    assert sqnr_db(w, mse.dequantize()) > sqnr_db(w, minmax.dequantize())
    assert sqnr_db(w, Int4Weight.from_float(w, 128, symmetric=True).dequantize()) >= 17.0


def test_all_zero_rows_and_groups():
    w = torch.zeros(3, 64)
    w[1, 40:] = torch.randn(24)
    qw = Int4Weight.from_float(w, 32)
    assert torch.isfinite(qw.scales).all() and torch.equal(qw.dequantize()[0], w[0])
    assert torch.equal(qw.dequantize()[1, :32], w[1, :32])


DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1, 1, 32), (1, 40, 70, 32), (5, 33, 130, 64), (17, 8, 256, -1), (33, 19, 77, 32)]


@pytest.mark.parametrize("m,n,k,group", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_matches_oracle(device_backend, m, n, k, group, dtype, with_bias):
    device, backend = device_backend
    qw = Int4Weight.from_float(torch.randn(n, k, dtype=dtype), group).to(device)
    x = torch.randn(2, m, k, dtype=dtype, device=device)
    bias = torch.randn(n, dtype=dtype, device=device) if with_bias else None
    with sparqle.use_backend(backend):
        if backend == "triton" and dtype == torch.float64:
            with pytest.raises(ValueError, match="backend 'triton' runs sparqle::int4_linear in .*not torch.float64"):
                sparqle.linear(x, qw, bias)
            return
        y = sparqle.linear(x, qw, bias)
    w64, x64 = qw.dequantize().double().cpu(), x.double().cpu()
    b64 = torch.zeros(n, dtype=torch.float64) if bias is None else bias.double().cpu()
    assert_close(y, x64 @ w64.T + b64, x64.abs() @ w64.abs().T + b64.abs(), dtype, "y")


def test_opcheck_dequantize():
    """(int4_linear itself: tests/test_contract.py, with every other contract check.)"""
    qw = Int4Weight.from_float(torch.randn(20, 70), 32)
    torch.library.opcheck(torch.ops.sparqle.int4_dequantize.default,
                          (qw.packed, qw.scales, qw.zeros, qw.group_width, 70))


def test_module_convert_and_adapter_training():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 16))
    x = torch.randn(8, 64)
    reference = model(x)
    sparqle.convert(model, "int4", group_size=32, method="mse")
    assert all(isinstance(model[i], Int4Linear) for i in (0, 2))
    assert "group_size=32" in repr(model[0])
    assert sqnr_db(reference, model(x)) > 15
    # A LoRA-style adapter trains on top of the frozen int4 layer.
    adapter = nn.Linear(64, 48, bias=False)
    nn.init.zeros_(adapter.weight)
    opt = torch.optim.SGD(adapter.parameters(), lr=0.05)
    target = torch.randn(8, 48)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = ((model[0](x) + adapter(x) - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert not any(t.requires_grad for t in model[0].buffers())


@pytest.mark.parametrize("k", [64, 77, 256])
def test_a_state_dict_of_the_k_order_packing_loads_repacked(k):
    """A state_dict saved before the interleaved tiles (settings without ``packing``,
    ``packed`` [N, ceil(K / 2)] in K order) loads into Int4Linear through load_state_dict
    and from_state_dict (sparqle.load's path): repacked into the same bytes a conversion
    gives today, the same outputs; the upgraded state names the layout."""
    from sparqle.formats.int4 import PACKING, deinterleave
    torch.manual_seed(k)
    layer = Int4Linear.from_linear(nn.Linear(k, 24), group_size=32)
    legacy = {key: t.clone() if isinstance(t, torch.Tensor) else t for key, t in layer.state_dict().items()}
    legacy["packed"] = deinterleave(layer.packed)[:, :-(-k // 2)].clone()
    legacy["_extra_state"] = {key: v for key, v in layer.settings().items() if key != "packing"}
    if k % 2:  # the earlier packing padded an odd K with the zero point
        assert torch.equal(legacy["packed"][:, -1] >> 4, layer.zeros[:, -1].to(torch.uint8))
    x = torch.randn(5, k)
    fresh = Int4Linear.from_linear(nn.Linear(k, 24), group_size=32)
    fresh.load_state_dict(legacy)
    built = Int4Linear.from_state_dict(legacy)
    for loaded in (fresh, built):
        assert torch.equal(loaded.packed, layer.packed) and loaded.settings()["packing"] == PACKING
        torch.testing.assert_close(loaded(x), layer(x), rtol=0, atol=0)
    assert "packing" not in legacy["_extra_state"]          # from_state_dict left its argument as it was


class TestBadInput:
    def test_from_float(self):
        with pytest.raises(ValueError, match="group_size must be one of"):
            Int4Weight.from_float(torch.randn(4, 64), 48)
        with pytest.raises(ValueError, match="w must be 2-D"):
            Int4Weight.from_float(torch.randn(4, 4, 4), 32)
        with pytest.raises(TypeError, match="w must be a floating-point tensor"):
            Int4Weight.from_float(torch.ones(4, 4, dtype=torch.int32), 32)
        with pytest.raises(ValueError, match="method must be one of"):
            Int4Weight.from_float(torch.randn(4, 64), 32, method="gptq")
        w = torch.randn(4, 64)
        w[2, 3] = float("inf")
        with pytest.raises(ValueError, match="w holds NaN or Inf"):
            Int4Weight.from_float(w, 32)

    def test_constructor(self):
        packed, s = torch.zeros(4, 64, dtype=torch.uint8), torch.ones(4, 2)
        with pytest.raises(TypeError, match="packed must be uint8"):
            Int4Weight(packed.int(), s, s, (4, 64), 32)
        with pytest.raises(ValueError, match=r"packed must have shape \(4, 128\)"):
            Int4Weight(packed, torch.ones(4, 5), torch.ones(4, 5), (4, 129), 32)
        with pytest.raises(ValueError, match=r"scales must have shape \(4, 1\)"):
            Int4Weight(packed, s, s, (4, 64), 64)
        with pytest.raises(TypeError, match="scales and zeros must share one float dtype"):
            Int4Weight(packed, s, s.double(), (4, 64), 32)
        with pytest.raises(ValueError, match="packed is on meta"):
            Int4Weight(packed.to("meta"), s, s, (4, 64), 32)

    def test_linear(self):
        qw = Int4Weight.from_float(torch.randn(8, 64), 32)
        with pytest.raises(TypeError, match="x has dtype torch.float16"):
            sparqle.linear(torch.randn(2, 64, dtype=torch.float16), qw)
        with pytest.raises(ValueError, match="x must have w.shape"):
            sparqle.linear(torch.randn(2, 63), qw)
        with pytest.raises(ValueError, match="x is on meta"):
            sparqle.linear(torch.randn(2, 64, device="meta"), qw)
        with pytest.raises(TypeError, match="linear must be an nn.Linear"):
            Int4Linear.from_linear(nn.Conv1d(2, 2, 1))


TRITON_DEVICES = [d for d, b in device_backends() if b == "triton"]


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_dispatch_by_m(device):
    """Both paths (split-K small M, tiled) meet the oracle on each side of SPLIT_K_MAX_M and far
    above it: the weight is dequantized inside the GEMM at every M (no cuBLAS round trip)."""
    from sparqle.kernels.dispatch import SPLIT_K_MAX_M
    qw = Int4Weight.from_float(torch.randn(24, 100, dtype=torch.float32), 32).to(device)
    bias = torch.randn(24, device=device)
    for m in (3, SPLIT_K_MAX_M, SPLIT_K_MAX_M + 1, 57, 130):
        x = torch.randn(m, 100, device=device)
        with sparqle.use_backend("triton"):
            y = sparqle.linear(x, qw, bias)
        w64, x64 = qw.dequantize().double().cpu(), x.double().cpu()
        assert_close(y, x64 @ w64.T + bias.double().cpu(),
                     x64.abs() @ w64.abs().T + bias.abs().double().cpu(), torch.float32, f"y (M={m})")


# Configs whose K step spans several groups (BLOCK_K > GROUP: the scales of each group loaded
# once and broadcast), and a split-K whose slices end inside a group and past K.
WIDE_STEP_CONFIGS = {
    "small_m": triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 128, "SPLIT_K": 3}),
    "tiled": triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 1}),
}


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("group", GROUP_SIZES)
@pytest.mark.parametrize("k", [1, 77, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_triton_reads_the_format_layout_at_every_group_and_k(monkeypatch, device, group, k, dtype):
    """The kernel reads Int4Weight's own tensors (packed [N, 64 ceil(K / 128)] in
    interleaved tiles, scales and zeros [N, ceil(K / group)]) at every group size, odd K
    and K off the group and the K step, with K steps inside one group, over several groups,
    and split-K slices: y matches the float64 oracle of the dequantized weight."""
    import sparqle.kernels.triton.int4_linear as kernel
    for small_m, tiled in ((kernel._small_m, kernel._tiled), (kernel._small_m_fp32, kernel._tiled_fp32)):
        monkeypatch.setattr(small_m, "configs", [WIDE_STEP_CONFIGS["small_m"]])
        monkeypatch.setattr(tiled, "configs", [WIDE_STEP_CONFIGS["tiled"]])
    g = torch.Generator().manual_seed(k * 7 + group)
    qw = Int4Weight.from_float(torch.randn(20, k, generator=g).to(dtype), group).to(device)
    w64 = qw.dequantize().double().cpu()
    for m in (2, 19):
        x = torch.randn(m, k, generator=g).to(dtype).to(device)
        with sparqle.use_backend("triton"):
            y = sparqle.linear(x, qw)
        x64 = x.double().cpu()
        assert_close(y, x64 @ w64.T, x64.abs() @ w64.abs().T, dtype, f"y (M={m})")


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("block_k", [32, 64, 128, 256])
def test_triton_reads_the_interleaved_tiles_at_every_step_width(monkeypatch, device, block_k):
    """A K step is a quarter or a half of a 64-byte tile of ``packed`` (BLOCK_K 32, 64: each
    quad lane's bytes gathered from inside the tile), one tile, or two (256): y matches the
    float64 oracle, with K inside the first tile, past one and past two."""
    import sparqle.kernels.triton.int4_linear as kernel
    for autotuned in (kernel._small_m, kernel._tiled):
        monkeypatch.setattr(autotuned, "configs",
                            [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": block_k, "SPLIT_K": 1})])
    g = torch.Generator().manual_seed(block_k)
    for k in (100, 200, 300):
        qw = Int4Weight.from_float(torch.randn(17, k, generator=g).half(), 32).to(device)
        w64 = qw.dequantize().double().cpu()
        x = torch.randn(3, k, generator=g).half().to(device)
        with sparqle.use_backend("triton"):
            y = sparqle.linear(x, qw)
        x64 = x.double().cpu()
        assert_close(y, x64 @ w64.T, x64.abs() @ w64.abs().T, torch.float16, f"y (K={k})")


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_reads_packed_at_any_byte_offset(device):
    """The kernel reads ``packed`` as int32 words: a ``packed`` that starts at an odd byte
    (a view into a larger buffer) gives the same y as an aligned one. The guard is for a
    GPU, where a misaligned word load faults (the launcher copies such a tensor); the
    interpreter reads any address, so there it checks the values only."""
    g = torch.Generator().manual_seed(3)
    qw = Int4Weight.from_float(torch.randn(9, 200, generator=g).half(), 32).to(device)
    buffer = torch.zeros(qw.packed.numel() + 1, dtype=torch.uint8, device=device)
    buffer[1:] = qw.packed.flatten()
    shifted = Int4Weight(buffer[1:].view(qw.packed.shape), qw.scales, qw.zeros, qw.shape, qw.group_size)
    assert shifted.packed.data_ptr() % 4 == (qw.packed.data_ptr() + 1) % 4
    x = torch.randn(3, 200, generator=g).half().to(device)
    with sparqle.use_backend("triton"):
        assert torch.equal(sparqle.linear(x, shifted), sparqle.linear(x, qw))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_magic_number_decoding_is_exact(dtype):
    """The kernel's int -> float trick: q | MAGIC_BITS read as ``dtype`` is MAGIC + q for every
    code, and (MAGIC + q) - (MAGIC + zero) = q - zero exactly, so the only rounding left is the
    product with the scale (the one sparqle.formats.int4.dequantize makes)."""
    from sparqle.kernels.triton.int4_linear import MAGIC
    _, magic, bits = MAGIC[dtype]
    ints = torch.int16 if dtype.itemsize == 2 else torch.int32
    q = torch.arange(16, dtype=ints)
    decoded = (q | bits).view(dtype)
    assert torch.equal(decoded, magic + q.to(dtype))
    zeros = torch.arange(16).to(dtype)
    assert torch.equal(decoded[:, None] - (zeros[None, :] + magic),
                       (q[:, None] - zeros[None, :].to(ints)).to(dtype))
