"""sparqle.window_partition / window_merge on every (device, backend): exactly Swin's
roll -> pad -> partition (and its gather by ``index``), and the inverse scatter, checked
against a per-pixel map written here; gradients of both; opcheck, compile, bad input."""
import pytest
import torch
import torch.nn.functional as F

import sparqle

from .conftest import device_backends

# (B, H, W, C, window, shift)
LAYOUTS = [
    (2, 14, 14, 5, (7, 7), (0, 0)),   # N = 49, unshifted
    (2, 14, 14, 5, (7, 7), (3, 3)),   # N = 49, shifted
    (1, 10, 9, 3, (4, 3), (2, 1)),    # H, W not multiples of the window
    (2, 5, 11, 70, (9, 9), (4, 0)),   # N = 81 > one token block, C > one channel block
    (1, 1, 1, 1, (1, 1), (0, 0)),
]


def swin_partition(x, ws, shift):
    """float64 Swin: roll by -shift, pad bottom/right, cut into [B, nW, N, C] windows."""
    b, h, w, c = x.shape
    x = torch.roll(x.double().cpu(), shifts=(-shift[0], -shift[1]), dims=(1, 2))
    x = F.pad(x, (0, 0, 0, -w % ws[1], 0, -h % ws[0]))
    hp, wp = x.shape[1:3]
    x = x.view(b, hp // ws[0], ws[0], wp // ws[1], ws[1], c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, -1, ws[0] * ws[1], c)


def pixel_map(h, w, ws, shift):
    """{(window, token): (y, x)} for every real token: the pixel of x it holds."""
    nww = -(-w // ws[1])
    out = {}
    for win in range(-(-h // ws[0]) * nww):
        for t in range(ws[0] * ws[1]):
            py, px = win // nww * ws[0] + t // ws[1], win % nww * ws[1] + t % ws[1]
            if py < h and px < w:
                out[win, t] = ((py + shift[0]) % h, (px + shift[1]) % w)
    return out


def merge_oracle(windows, x, ws, shift, index):
    b, h, w, c = x.shape
    out = x.detach().double().cpu().clone()
    per_image = windows.shape[0] // b
    windows = windows.detach().double().cpu().view(b, per_image, -1, c)
    for (win, t), (y, xx) in pixel_map(h, w, ws, shift).items():
        for i in range(b):
            slots = (index[i].tolist() if index is not None else list(range(per_image)))
            if win in slots:
                out[i, y, xx] = windows[i, slots.index(win), t]
    return out


def random_index(b, nw, k, device):
    return torch.stack([torch.randperm(nw)[:k] for _ in range(b)]).to(device)


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_partition_and_merge_match_oracle(device_backend, layout, dtype):
    device, backend = device_backend
    b, h, w, c, ws, shift = layout
    nw = -(-h // ws[0]) * -(-w // ws[1])
    x = torch.randn(b, h, w, c, dtype=dtype, device=device)
    index = random_index(b, nw, max(1, nw // 2), device)
    with sparqle.use_backend(backend):
        windows = sparqle.window_partition(x, ws, shift)
        gathered = sparqle.window_partition(x, ws, shift, index)
        merged = sparqle.window_merge(windows, torch.full_like(x, float("nan")), ws, shift)
        new = torch.randn_like(gathered)
        scattered = sparqle.window_merge(new, x, ws, shift, index)
    expected = swin_partition(x, ws, shift)
    assert windows.dtype == dtype and windows.shape == (b * nw, ws[0] * ws[1], c)
    assert torch.equal(windows.cpu().double(), expected.reshape(-1, ws[0] * ws[1], c))
    assert torch.equal(gathered.cpu().double(),
                       expected[torch.arange(b)[:, None], index.cpu()].reshape(gathered.shape))
    assert torch.equal(merged, x)  # every pixel is written back: nothing of the NaN input is left
    assert torch.equal(scattered.cpu().double(), merge_oracle(new, x, ws, shift, index.cpu()))


def test_strided_input(device_backend):
    device, backend = device_backend
    x = torch.randn(2, 6, 9, 8, device=device).transpose(1, 2)  # [2, 9, 6, 8], not contiguous
    with sparqle.use_backend(backend):
        windows = sparqle.window_partition(x, (4, 4), (1, 2))
    assert torch.equal(windows.cpu().double(), swin_partition(x, (4, 4), (1, 2)).reshape(-1, 16, 8))


def test_gradients(device_backend):
    """Partition's gradient scatters back (padding dropped); merge's splits the output
    gradient between the windows and the untouched pixels of x."""
    device, backend = device_backend
    b, h, w, c, ws, shift = 2, 10, 9, 3, (4, 3), (2, 1)
    x = torch.randn(b, h, w, c, device=device, requires_grad=True)
    index = random_index(b, 9, 4, device)
    with sparqle.use_backend(backend):
        windows = sparqle.window_partition(x, ws, shift, index)
        dw = torch.randn_like(windows)
        (gx,) = torch.autograd.grad(windows, x, dw)
        new = torch.randn_like(windows, requires_grad=True)
        out = sparqle.window_merge(new, x, ws, shift, index)
        dout = torch.randn_like(out)
        g_new, g_x = torch.autograd.grad(out, (new, x), dout)
    x64 = x.detach().double().cpu().requires_grad_(True)
    ref = swin_partition(x64, ws, shift)[torch.arange(b)[:, None], index.cpu()].reshape(windows.shape)
    (expected,) = torch.autograd.grad(ref, x64, dw.double().cpu())
    assert torch.equal(gx.cpu().double(), expected)
    covered = merge_oracle(torch.ones_like(new), torch.zeros_like(x), ws, shift, index.cpu()) == 1
    assert torch.equal(g_x.cpu().double(), torch.where(covered, 0.0, dout.double().cpu()))
    expected_new = swin_partition(dout, ws, shift)[torch.arange(b)[:, None], index.cpu()].reshape(new.shape)
    assert torch.equal(g_new.cpu().double(), expected_new)


@pytest.mark.parametrize("device", sorted({d for d, _ in device_backends()}))
def test_gradcheck_float64(device):
    x = torch.randn(1, 5, 4, 2, dtype=torch.float64, device=device, requires_grad=True)
    windows = torch.randn(2, 9, 2, dtype=torch.float64, device=device, requires_grad=True)
    index = torch.tensor([[3, 0]], device=device)
    with sparqle.use_backend("torch"):
        assert torch.autograd.gradcheck(lambda x: sparqle.window_partition(x, 3, 1, index), (x,))
        assert torch.autograd.gradcheck(lambda w, x: sparqle.window_merge(w, x, 3, (1, 2), index), (windows, x))


def test_opcheck_and_compile():
    x = torch.randn(2, 10, 9, 3, requires_grad=True)
    index = torch.tensor([[0, 5], [8, 2]])
    for idx in (index, None):
        torch.library.opcheck(torch.ops.sparqle.window_partition.default, (x, 4, 3, 2, 1, idx))
        windows = torch.ops.sparqle.window_partition(x.detach(), 4, 3, 2, 1, idx).requires_grad_(True)
        torch.library.opcheck(torch.ops.sparqle.window_merge.default, (windows, x, 4, 3, 2, 1, idx))

    def f(x):
        windows = sparqle.window_partition(x, (4, 3), (2, 1), index)
        return sparqle.window_merge(windows * 2, x, (4, 3), (2, 1), index)

    expected = f(x)
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    got.sum().backward()
    torch.testing.assert_close(got, expected)
    assert x.grad is not None


class TestBadInput:
    def test_layout(self):
        x = torch.randn(2, 8, 8, 4)
        with pytest.raises(ValueError, match="x must be 4-D"):
            sparqle.window_partition(torch.randn(8, 8, 4), 4)
        with pytest.raises(TypeError, match="x must be floating point"):
            sparqle.window_partition(x.long(), 4)
        with pytest.raises(ValueError, match="shift must satisfy"):
            sparqle.window_partition(x, 4, 4)
        with pytest.raises(ValueError, match="window_size must be positive"):
            sparqle.window_partition(x, (0, 4))
        with pytest.raises(TypeError, match="window_size must be an int or a pair"):
            sparqle.window_partition(x, (4, 4, 4))

    def test_index(self):
        x = torch.randn(2, 8, 8, 4)
        with pytest.raises(ValueError, match=r"index holds values outside \[0, 4\)"):
            sparqle.window_partition(x, 4, index=torch.tensor([[0, 4], [1, 2]]))
        with pytest.raises(ValueError, match="index must have x.shape"):
            sparqle.window_partition(x, 4, index=torch.tensor([[0, 1]]))
        with pytest.raises(TypeError, match="index must hold integers"):
            sparqle.window_partition(x, 4, index=torch.zeros(2, 2))
        with pytest.raises(ValueError, match="index names a window twice"):
            sparqle.window_partition(x, 4, index=torch.tensor([[1, 1], [0, 2]]))

    def test_merge(self):
        x = torch.randn(2, 8, 8, 4)
        with pytest.raises(ValueError, match=r"windows must have shape \(8, 16, 4\)"):
            sparqle.window_merge(torch.randn(8, 16, 3), x, 4)
        with pytest.raises(TypeError, match="windows has dtype"):
            sparqle.window_merge(torch.randn(8, 16, 4, dtype=torch.float64), x, 4)
