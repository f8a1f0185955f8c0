"""sparqle.nn.SparseLinear and sparqle.convert."""
import io

import pytest
import torch
from torch import nn

import sparqle
from sparqle.nn import SparseLinear


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
    assert "density=0.2500" in repr(layer)


def test_training_updates_values_and_keeps_the_pattern():
    layer = SparseLinear.from_linear(nn.Linear(16, 8), sparsity=0.5)
    pattern = layer.weight.to_dense() != 0
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    before = layer.values.detach().clone()
    x, target = torch.randn(32, 16), torch.randn(32, 8)
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


def test_convert_replaces_plain_linears_only():
    model = Block()
    sparqle.convert(model, "csr", sparsity=0.9)
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
        SparseLinear.from_linear(nn.Linear(3, 3), 0.5, format="bell")
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        SparseLinear.from_linear(nn.Conv1d(3, 3, 1), 0.5)


def test_state_dict_round_trip_with_weights_only_load():
    torch.manual_seed(1)
    model = sparqle.convert(Block(), "csr", sparsity=0.8)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    torch.manual_seed(2)
    other = sparqle.convert(Block(), "csr", sparsity=0.8)
    other.load_state_dict(state)
    x = torch.randn(2, 3, 24)
    torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)


def test_module_dtype_and_compile():
    layer = SparseLinear.from_linear(nn.Linear(12, 10), sparsity=0.6).double()
    assert layer.values.dtype == torch.float64 and layer.crow_indices.dtype == torch.int32
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    expected = layer(x)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    got = compiled(x)
    got.sum().backward()
    torch.testing.assert_close(got, expected)
    assert x.grad is not None and layer.values.grad is not None
