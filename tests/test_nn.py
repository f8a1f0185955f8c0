"""sparqle.nn.SparseLinear and sparqle.convert."""
import inspect

import pytest
import torch
from torch import nn

import sparqle
from sparqle.kernels._derived import derived
from sparqle.nn import SparseLinear
from sparqle.nn._load import CheckedLoad

from ._modules import load_saved


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(24, 40)
        self.down = nn.Linear(40, 24, bias=False)
        self.attn = nn.MultiheadAttention(24, 2, batch_first=True)

    def forward(self, x):
        x = self.attn(x, x, x, need_weights=False)[0] + x
        return self.down(torch.relu(self.up(x)))


def test_from_linear_prunes_and_matches_oracle(device_backend):
    device, backend = device_backend
    linear = nn.Linear(33, 20).double().to(device)
    layer = SparseLinear.from_linear(linear, sparsity=0.75)
    assert layer.values.numel() == 33 * 20 - round(0.75 * 33 * 20)
    mask = sparqle.prune.magnitude(linear.weight.detach(), 0.75)
    x = torch.randn(3, 4, 33, dtype=torch.float64, device=device)
    with sparqle.use_backend(backend):
        y = layer(x)
    expected = x @ (linear.weight * mask).T + linear.bias
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    assert "format=csr, density=0.2500" in repr(layer)


def test_from_linear_bell_prunes_blocks_and_matches_oracle(device_backend):
    device, backend = device_backend
    linear = nn.Linear(70, 40).double().to(device)
    layer = SparseLinear.from_linear(linear, sparsity=0.5, format="bell", block_size=16)
    mask = sparqle.prune.magnitude(linear.weight.detach(), 0.5, block=16)
    assert layer.weight.nnz_blocks == 15 - round(0.5 * 15)   # 3 x 5 blocks
    x = torch.randn(2, 5, 70, dtype=torch.float64, device=device)
    with sparqle.use_backend(backend):
        y = layer(x)
    expected = x @ (linear.weight * mask).T + linear.bias
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    assert "format=bell" in repr(layer)


@pytest.mark.parametrize("options", [{}, {"format": "bell", "block_size": 16}])
def test_training_updates_values_and_keeps_the_pattern(options):
    layer = SparseLinear.from_linear(nn.Linear(40, 36), sparsity=0.5, **options)
    pattern = layer.weight.to_dense() != 0
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    before = layer.values.detach().clone()
    x, target = torch.randn(32, 40), torch.randn(32, 36)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = ((layer(x) - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert not torch.equal(layer.values.detach(), before)
    assert ((layer.weight.to_dense() != 0) <= pattern).all()


@pytest.mark.parametrize("fmt,options", [("csr", {"sparsity": 0.9}),
                                         ("bell", {"sparsity": 0.8, "block_size": 16})])
def test_convert_replaces_plain_linears_only(fmt, options):
    model = Block()
    sparqle.convert(model, fmt, **options)
    assert isinstance(model.up, SparseLinear) and isinstance(model.down, SparseLinear)
    assert type(model.attn.out_proj) is not SparseLinear
    assert model(torch.randn(2, 5, 24)).shape == (2, 5, 24)


def test_convert_filter_and_errors():
    model = Block()
    sparqle.convert(model, "csr", sparsity=0.5, filter=lambda name, m: name == "up")
    assert isinstance(model.up, SparseLinear) and type(model.down) is nn.Linear
    with pytest.raises(ValueError, match="fmt must be one of"):
        sparqle.convert(Block(), "bogus")
    with pytest.raises(ValueError, match="sparsity must lie in"):
        sparqle.convert(Block(), "csr", sparsity=1.0)
    with pytest.raises(ValueError, match="model is itself an nn.Linear"):
        sparqle.convert(nn.Linear(3, 3), "csr", sparsity=0.5)
    with pytest.raises(ValueError, match="format must be one of"):
        SparseLinear.from_linear(nn.Linear(3, 3), 0.5, format="coo")
    with pytest.raises(ValueError, match="block_size applies to format='bell' only"):
        SparseLinear.from_linear(nn.Linear(3, 3), 0.5, block_size=16)
    with pytest.raises(ValueError, match="block_size must be one of"):
        SparseLinear.from_linear(nn.Linear(3, 3), 0.5, format="bell", block_size=8)
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        SparseLinear.from_linear(nn.Conv1d(3, 3, 1), 0.5)


@pytest.mark.parametrize("fmt,options", [("csr", {"sparsity": 0.8}),
                                         ("bell", {"sparsity": 0.5, "block_size": 16})])
def test_state_dict_round_trip_with_weights_only_load(fmt, options):
    """Loads into a model pruned from other weights: the pattern's sizes may differ."""
    torch.manual_seed(1)
    model = sparqle.convert(Block(), fmt, **options)
    torch.manual_seed(2)
    other = load_saved(model, sparqle.convert(Block(), fmt, **options))
    x = torch.randn(2, 3, 24)
    torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("options", [{}, {"format": "bell", "block_size": 16}])
def test_module_dtype_and_compile(options):
    layer = SparseLinear.from_linear(nn.Linear(40, 36), sparsity=0.6, **options).double()
    assert layer.values.dtype == torch.float64
    assert all(t.dtype == torch.int32 for t in layer.buffers())
    x = torch.randn(4, 40, dtype=torch.float64, requires_grad=True)
    expected = layer(x)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    got = compiled(x)
    got.sum().backward()
    torch.testing.assert_close(got, expected)
    assert x.grad is not None and layer.values.grad is not None


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
@pytest.mark.parametrize("fmt", ["csr", "bell", "2:4", "int4", "int8", "fp8"])
@pytest.mark.parametrize("shape", [(5, 0), (0, 5)], ids=str)
def test_linear_with_an_empty_weight(fmt, shape):
    """No input features (y = bias, here 0) or no output features, through every format."""
    options = {"csr": {"sparsity": 0.5}, "bell": {"sparsity": 0.5}, "int4": {"group_size": 32}}.get(fmt, {})
    model = sparqle.convert(nn.Sequential(nn.Linear(shape[1], shape[0], bias=False)), fmt, **options)
    y = model(torch.randn(2, 3, shape[1]))
    assert y.shape == (2, 3, shape[0]) and bool((y == 0).all())


def _strided(t):
    """The same values in a non-contiguous tensor (every dim, 1-D included)."""
    if not isinstance(t, torch.Tensor) or t.numel() < 2:
        return t
    return torch.stack([t, t], -1)[..., 0]


_FORMATS = {"csr": lambda w: sparqle.CSR.from_dense(w * (torch.rand_like(w) > 0.5)),
            "bell": lambda w: sparqle.BlockedELL.from_dense(w, block_size=16),
            "2:4": sparqle.SemiStructured.from_dense,
            "int4": lambda w: sparqle.Int4Weight.from_float(w, group_size=32),
            "int8": sparqle.Int8Weight.from_float,
            "fp8": sparqle.FP8Weight.from_float}


@pytest.mark.parametrize("fmt", sorted(_FORMATS))
def test_linear_with_non_contiguous_format_tensors(device_backend, fmt):
    """A format built from strided tensors gives the contiguous format's result on every
    backend (kernels that assume unit strides must not read them as such)."""
    device, backend = device_backend
    w = _FORMATS[fmt](torch.randn(32, 64)).to(device)
    params = [name for name in inspect.signature(type(w).__init__).parameters if name != "self"]
    strided = type(w)(**{name: _strided(getattr(w, name)) for name in params})
    assert any(isinstance(t, torch.Tensor) and not t.is_contiguous() for t in vars(strided).values())
    x = torch.randn(3, 64, device=device)
    with sparqle.use_backend(backend):
        torch.testing.assert_close(sparqle.linear(x, strided), sparqle.linear(x, w), rtol=1e-5, atol=1e-5)


# ---- inference mode ---------------------------------------------------------------

def _inference_tensors(model: nn.Module, converted_only: bool = False):
    """The names of ``model``'s inference tensors (in sparqle's modules only, where
    ``converted_only``)."""
    return [f"{name}.{key}" for name, module in model.named_modules()
            if not converted_only or isinstance(module, CheckedLoad)
            for key, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
            if t.is_inference()]


@pytest.mark.parametrize("fmt,options", [("csr", {"sparsity": 0.5}), ("bell", {"sparsity": 0.5, "block_size": 16}),
                                         ("2:4", {}), ("int4", {"group_size": 32}), ("int8", {}), ("fp8", {}),
                                         ("window_attention", {})])
def test_converted_moved_and_loaded_in_inference_mode_the_model_holds_plain_tensors(fmt, options, tmp_path):
    """What the kernels derive from a weight (the CSR bitmap, cuSPARSELt's copy, the window
    attention's score table) is kept by the weight's version counter, which an inference
    tensor lacks: a model converted, moved or loaded under torch.inference_mode() holds
    plain tensors, so it is made once and not on every forward; the output is unchanged."""
    from sparqle.bench import swin_reference as swin
    torch.manual_seed(0)
    if fmt == "window_attention":
        make, x = (lambda: swin.SwinTransformerBlock(16, (8, 8), 2, 4, shift_size=2)), torch.randn(2, 8, 8, 16)
    else:
        make, x = (lambda: nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))), torch.randn(3, 32)
    with torch.inference_mode():
        model = make()
        assert _inference_tensors(model)                 # what the test is about
        sparqle.convert(model, fmt, **options)
        assert _inference_tensors(model, True) == []
        expected = model(x)
        model.to(torch.float64).to(torch.float32)
        assert _inference_tensors(model, True) == []
        other = {**options, "sparsity": 0.25} if "sparsity" in options else options   # a load that resizes
        loaded = sparqle.convert(make(), fmt, **other)
        loaded.load_state_dict(model.state_dict())
        assert _inference_tensors(loaded, True) == []
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
        sparqle.save(model, tmp_path / "model.safetensors")
        from_file = sparqle.load(make(), tmp_path / "model.safetensors")
        assert _inference_tensors(from_file, True) == []
        torch.testing.assert_close(from_file(x), expected, rtol=0, atol=0)
        weight = next(next(m for m in loaded.modules() if isinstance(m, CheckedLoad)).buffers())
        made = []
        for _ in range(2):
            derived("a tensor derived from a weight", lambda: made.append(1) or weight + 1, weight)
        assert len(made) == 1
