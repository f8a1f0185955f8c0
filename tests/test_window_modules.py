"""sparqle.nn.WindowAttention and SparseWindowBlock against timm's Swin (the faithful copy
in bench/swin_reference.py, run in float64 as the oracle): the swapped attention, the
converted model's logits, keep_ratio = 1 equal to the dense block, kept windows equal to
the dense block's and the others untouched, gradients, state_dict, and bad input."""
import copy

import pytest
import torch

import sparqle
from sparqle.nn import SparseWindowBlock, WindowAttention

from sparqle.bench import swin_reference as swin

from ._modules import load_saved
from .test_window_partition import pixel_map

# (H, W, window, shift): N = 49 shifted and not, and H, W not multiples of the window
BLOCKS = [(14, 14, 7, 3), (14, 14, 7, 0), (9, 10, 4, 2)]


def close(actual, expected64, what):
    """fp32 against the float64 reference."""
    assert torch.isfinite(actual).all(), what
    torch.testing.assert_close(actual.detach().double().cpu(), expected64.detach().double().cpu(),
                               rtol=1e-4, atol=2e-5, msg=what)


def reference_block(h, w, ws, shift, dim=16, heads=2):
    block = swin.SwinTransformerBlock(dim, (h, w), heads, ws, shift).eval()
    with torch.no_grad():  # non-trivial norms, so that padding after norm1 matters
        for norm in (block.norm1, block.norm2):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_()
    return block


def test_window_attention_matches_timm(device_backend):
    device, backend = device_backend
    ref = swin.WindowAttention(32, 2, (7, 7))
    mask = swin.SwinTransformerBlock(32, (14, 14), 2, 7, 3).attn_mask.to(device)
    x = torch.randn(8, 49, 32, device=device)
    ours = WindowAttention.from_module(copy.deepcopy(ref).to(device))
    ref64 = copy.deepcopy(ref).double()
    for m in (mask, None):
        with sparqle.use_backend(backend):
            out = ours(x, m)
        close(out, ref64(x.double().cpu(), None if m is None else m.double().cpu()), "out")
    with sparqle.use_backend(backend):
        ours(x, mask).square().sum().backward()
    ref64(x.double().cpu(), mask.double().cpu()).square().sum().backward()
    close(ours.relative_position_bias_table.grad, ref64.relative_position_bias_table.grad, "table grad")
    close(ours.qkv.weight.grad, ref64.qkv.weight.grad, "qkv grad")
    assert "relative_position_index" not in ours.state_dict()  # non-persistent, as in timm


def test_score_table_kept_per_layer(device_backend):
    """WindowAttention makes its score table (bias plus mask, padded) once per bias and mask:
    the same tensor on the next call, a new one once the bias table is updated in place (an
    optimizer step), and the output and the bias table's gradient follow the new bias."""
    device, backend = device_backend
    ref = swin.WindowAttention(16, 2, (7, 7))
    mask = swin.SwinTransformerBlock(16, (14, 14), 2, 7, 3).attn_mask.to(device)
    ours = WindowAttention.from_module(copy.deepcopy(ref).to(device))
    x = torch.randn(8, 49, 16, device=device)
    first = ours.score_table(mask, x)
    assert ours.score_table(mask, x) is first and first.shape == (4, 2, 64, 64)
    assert ours.score_table(None, x).shape == (1, 2, 64, 64)
    assert ours.score_table(mask, x) is first  # the unmasked table is kept beside it
    with torch.no_grad():
        ours.relative_position_bias_table.add_(0.5)
    second = ours.score_table(mask, x)
    assert second is not first and torch.equal(second[:, :, :49, :49], first[:, :, :49, :49] + 0.5)
    with sparqle.use_backend(backend):
        out = ours(x, mask)
        out.square().sum().backward()
    ref64 = copy.deepcopy(ref).double()
    with torch.no_grad():
        ref64.relative_position_bias_table.add_(0.5)
    expected = ref64(x.double().cpu(), mask.double().cpu())
    expected.square().sum().backward()
    close(out, expected, "out")
    close(ours.relative_position_bias_table.grad, ref64.relative_position_bias_table.grad, "table grad")
    ours.double()  # the same Parameter objects, their versions unchanged: the dtype tells
    third = ours.score_table(mask, x.double())
    assert third.dtype == torch.float64 and torch.equal(third, sparqle.window.score_table(
        ours.relative_position_bias(), mask.double(), x.double()))
    ours.half()
    assert ours.score_table(mask, x.half()) is not second


def test_inference_mode_then_training(device_backend):
    """In inference mode the block's shift mask and its attention's score table are made as
    plain tensors, so that both are kept across calls (inference tensors are not) and a later
    training call can save them for its backward."""
    device, backend = device_backend
    block = reference_block(14, 14, 7, 3)
    sparse = SparseWindowBlock.from_block(copy.deepcopy(block).to(device), 0.5)
    x = torch.randn(2, 14, 14, 16, device=device)
    with sparqle.use_backend(backend):
        with torch.inference_mode():
            served = sparse(x)
            (mask,) = sparse._masks.values()
            table = sparse.attn.score_table(mask, x)
            assert sparse.attn.score_table(mask, x) is table
        assert not mask.is_inference() and not table.is_inference()
        out = sparse(x)
        out.square().sum().backward()
    close(out, served, "out")
    assert sparse.attn.relative_position_bias_table.grad is not None


@pytest.mark.parametrize("layout", BLOCKS, ids=str)
def test_keep_all_equals_dense_block(device_backend, layout):
    device, backend = device_backend
    block = reference_block(*layout)
    x = torch.randn(2, layout[0], layout[1], 16, device=device)
    sparse = SparseWindowBlock.from_block(copy.deepcopy(block).to(device), 1.0)
    with sparqle.use_backend(backend):
        out = sparse(x)
        out.square().sum().backward()
    ref64 = copy.deepcopy(block).double()
    ref64(x.double().cpu()).square().sum().backward()
    close(out, ref64(x.double().cpu()), "out")
    close(sparse.attn.relative_position_bias_table.grad, ref64.attn.relative_position_bias_table.grad, "table grad")
    close(sparse.mlp.fc1.weight.grad, ref64.mlp.fc1.weight.grad, "mlp grad")


@pytest.mark.parametrize("layout", BLOCKS, ids=str)
@pytest.mark.parametrize("keep_ratio", [0.5, 0.01])
def test_kept_windows_equal_dense_and_others_pass_through(device_backend, layout, keep_ratio):
    device, backend = device_backend
    h, w, ws, shift = layout
    block = reference_block(*layout)
    x = torch.randn(2, h, w, 16, device=device)
    with sparqle.use_backend(backend):
        out = SparseWindowBlock.from_block(copy.deepcopy(block).to(device), keep_ratio)(x)
    dense = copy.deepcopy(block).double()(x.double().cpu())
    # The score, written out: per window of the rolled map, the L2 norm over its real
    # tokens of each token's mean |x| over channels.
    pixels = pixel_map(h, w, (ws, ws), (shift, shift))
    nw = -(-h // ws) * -(-w // ws)
    keep = max(1, round(keep_ratio * nw))
    expected = x.double().cpu().clone()
    for i in range(2):
        mean_abs = x[i].double().cpu().abs().mean(-1)
        score = torch.zeros(nw, dtype=torch.float64)
        for (win, _), (y, xx) in pixels.items():
            score[win] += mean_abs[y, xx] ** 2
        kept = set(score.topk(keep).indices.tolist())
        for (win, _), (y, xx) in pixels.items():
            if win in kept:
                expected[i, y, xx] = dense[i, y, xx]
    close(out, expected, "out")


def test_flat_tokens_input(device_backend):
    """[B, H*W, C] (the original Swin code's layout) with the block's input_resolution."""
    device, backend = device_backend
    sparse = SparseWindowBlock.from_block(reference_block(9, 10, 4, 2).to(device), 0.5)
    x = torch.randn(2, 9, 10, 16, device=device)
    with sparqle.use_backend(backend):
        assert torch.equal(sparse(x.reshape(2, 90, 16)), sparse(x).reshape(2, 90, 16))


def test_convert_model_gives_the_same_logits():
    model = swin.TinySwin().eval()
    images = torch.randn(2, 3, 28, 28)
    reference = copy.deepcopy(model).double()(images.double())
    keys = set(model.state_dict())
    converted = sparqle.convert(copy.deepcopy(model), "window_attention")
    assert sum(isinstance(m, WindowAttention) for m in converted.modules()) == 4
    assert set(converted.state_dict()) == keys
    close(converted(images), reference, "logits")
    other = load_saved(converted, sparqle.convert(swin.TinySwin().eval(), "window_attention"))
    assert torch.equal(other(images), converted(images))

    dense_equal = sparqle.convert(copy.deepcopy(model), "sparse_windows", keep_ratio=[1.0, 1.0])
    assert sum(isinstance(m, SparseWindowBlock) for m in dense_equal.modules()) == 4
    close(dense_equal(images), reference, "logits, keep_ratio 1")
    pruned = sparqle.convert(copy.deepcopy(model), "sparse_windows", keep_ratio=[0.5, 0.25])
    ratios = [m.keep_ratio for m in pruned.modules() if isinstance(m, SparseWindowBlock)]
    assert ratios == [0.5, 0.5, 0.25, 0.25]
    assert pruned(images).shape == (2, 10)


def test_modules_compile_fullgraph():
    block = reference_block(9, 10, 4, 2)
    x = torch.randn(2, 9, 10, 16, requires_grad=True)
    sparse = SparseWindowBlock.from_block(copy.deepcopy(block), 0.5)
    attn = WindowAttention.from_module(copy.deepcopy(block.attn))
    windows = torch.randn(2 * 9, 16, 16)
    expected_block, expected_attn = sparse(x), attn(windows, block.attn_mask.repeat(2, 1, 1))
    torch._dynamo.reset()
    got_block = torch.compile(sparse, fullgraph=True, backend="aot_eager")(x)
    got_attn = torch.compile(attn, fullgraph=True, backend="aot_eager")(windows, block.attn_mask.repeat(2, 1, 1))
    got_block.sum().backward()
    torch.testing.assert_close(got_block, expected_block)
    torch.testing.assert_close(got_attn, expected_attn)
    assert x.grad is not None and sparse.attn.relative_position_bias_table.grad is not None


class TestBadInput:
    def test_modules(self):
        with pytest.raises(TypeError, match="m must be a Swin WindowAttention"):
            WindowAttention.from_module(torch.nn.Linear(4, 4))
        with pytest.raises(TypeError, match="block must be a SwinTransformerBlock"):
            SparseWindowBlock.from_block(torch.nn.Linear(4, 4), 0.5)
        block = reference_block(14, 14, 7, 3)
        for bad, error in ((0.0, ValueError), (1.5, ValueError), ("half", TypeError)):
            with pytest.raises(error, match="keep_ratio must be"):
                SparseWindowBlock.from_block(block, bad)
        with pytest.raises(ValueError, match="x must be"):
            SparseWindowBlock.from_block(block, 0.5)(torch.randn(2, 3))

    def test_convert(self):
        with pytest.raises(ValueError, match="keep_ratio has 1 entries but the model has 2"):
            sparqle.convert(swin.TinySwin(), "sparse_windows", keep_ratio=[0.5])
        with pytest.raises(ValueError, match="fmt must be one of"):
            sparqle.convert(swin.TinySwin(), "windows")

    def test_attention_dropout_in_training(self):
        ref = swin.WindowAttention(16, 2, (4, 4))
        ref.attn_drop.p = 0.1
        attn = WindowAttention.from_module(ref)
        with pytest.raises(RuntimeError, match="attention dropout"):
            attn(torch.randn(2, 16, 16))
        assert attn.eval()(torch.randn(2, 16, 16)).shape == (2, 16, 16)
