"""A faithful minimal copy of timm 1.0.31's Swin pieces (timm.models.swin_transformer:
WindowAttention on its eager path, SwinTransformerBlock with x [B, H, W, C], its shift mask
and PatchMerging): the dense baseline of bench_sparse_windows and the reference model of
tests/test_window_modules.py, because timm does not import without torchvision (which does
not install beside the CPU torch this project pins). Attribute names and forward maths are
timm's; drop-path and dropout are identities (eval)."""
import torch
import torch.nn.functional as F
from torch import nn


def window_partition(x, ws):
    b, h, w, c = x.shape
    x = x.view(b, h // ws[0], ws[0], w // ws[1], ws[1], c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws[0], ws[1], c)


def window_reverse(windows, ws, h, w):
    c = windows.shape[-1]
    x = windows.view(-1, h // ws[0], w // ws[1], ws[0], ws[1], c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, h, w, c)


def get_relative_position_index(win_h, win_w):
    coords = torch.stack(torch.meshgrid(torch.arange(win_h), torch.arange(win_w), indexing="ij"))
    coords_flatten = torch.flatten(coords, 1)
    relative = (coords_flatten[:, :, None] - coords_flatten[:, None, :]).permute(1, 2, 0).contiguous()
    relative[:, :, 0] += win_h - 1
    relative[:, :, 1] += win_w - 1
    relative[:, :, 0] *= 2 * win_w - 1
    return relative.sum(-1)


class WindowAttention(nn.Module):
    def __init__(self, dim, num_heads, window_size=(7, 7), qkv_bias=True):
        super().__init__()
        self.dim, self.window_size, self.num_heads = dim, window_size, num_heads
        win_h, win_w = window_size
        self.window_area = win_h * win_w
        head_dim = dim // num_heads
        self.scale = head_dim ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * win_h - 1) * (2 * win_w - 1), num_heads) * 0.5)
        self.register_buffer("relative_position_index", get_relative_position_index(win_h, win_w), persistent=False)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)
        self.softmax = nn.Softmax(dim=-1)

    def _get_rel_pos_bias(self):
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(
            self.window_area, self.window_area, -1)
        return bias.permute(2, 0, 1).contiguous().unsqueeze(0)

    def forward(self, x, mask=None):
        b_, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b_, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        attn = attn + self._get_rel_pos_bias()
        if mask is not None:
            num_win = mask.shape[0]
            attn = attn.view(-1, num_win, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, n, n)
        attn = self.attn_drop(self.softmax(attn))
        x = (attn @ v).transpose(1, 2).reshape(b_, n, -1)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SwinTransformerBlock(nn.Module):
    def __init__(self, dim, input_resolution, num_heads, window_size=7, shift_size=0, mlp_ratio=4.0):
        super().__init__()
        self.dim, self.input_resolution = dim, input_resolution
        window_size, shift_size = (window_size, window_size), (shift_size, shift_size)
        # timm's _calc_window_shift (always_partition=False)
        self.window_size = tuple(r if r <= w else w for r, w in zip(input_resolution, window_size))
        self.shift_size = tuple(0 if r <= w else s for r, w, s in zip(input_resolution, self.window_size, shift_size))
        self.window_area = self.window_size[0] * self.window_size[1]
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, self.window_size)
        self.drop_path1 = nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path2 = nn.Identity()
        self.register_buffer("attn_mask", self.get_attn_mask(), persistent=False)

    def get_attn_mask(self):
        if not any(self.shift_size):
            return None
        ws, ss = self.window_size, self.shift_size
        h = -(-self.input_resolution[0] // ws[0]) * ws[0]
        w = -(-self.input_resolution[1] // ws[1]) * ws[1]
        img_mask = torch.zeros((1, h, w, 1))
        cnt = 0
        for hs in ((0, -ws[0]), (-ws[0], -ss[0]), (-ss[0], None)):
            for wsl in ((0, -ws[1]), (-ws[1], -ss[1]), (-ss[1], None)):
                img_mask[:, hs[0]:hs[1], wsl[0]:wsl[1], :] = cnt
                cnt += 1
        mask_windows = window_partition(img_mask, ws).view(-1, self.window_area)
        attn_mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
        return attn_mask.masked_fill(attn_mask != 0, float(-100.0)).masked_fill(attn_mask == 0, float(0.0))

    def _attn(self, x):
        b, h, w, c = x.shape
        has_shift = any(self.shift_size)
        shifted_x = torch.roll(x, shifts=(-self.shift_size[0], -self.shift_size[1]), dims=(1, 2)) if has_shift else x
        pad_h = (self.window_size[0] - h % self.window_size[0]) % self.window_size[0]
        pad_w = (self.window_size[1] - w % self.window_size[1]) % self.window_size[1]
        shifted_x = F.pad(shifted_x, (0, 0, 0, pad_w, 0, pad_h))
        _, hp, wp, _ = shifted_x.shape
        x_windows = window_partition(shifted_x, self.window_size).view(-1, self.window_area, c)
        attn_windows = self.attn(x_windows, mask=self.attn_mask)
        attn_windows = attn_windows.view(-1, self.window_size[0], self.window_size[1], c)
        shifted_x = window_reverse(attn_windows, self.window_size, hp, wp)[:, :h, :w, :].contiguous()
        return torch.roll(shifted_x, shifts=self.shift_size, dims=(1, 2)) if has_shift else shifted_x

    def forward(self, x):
        b, h, w, c = x.shape
        x = x + self.drop_path1(self._attn(self.norm1(x)))
        x = x.reshape(b, -1, c)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x.reshape(b, h, w, c)


class PatchMerging(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        b, h, w, c = x.shape
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    def __init__(self, dim, resolution, depth, num_heads, window_size, downsample):
        super().__init__()
        self.downsample = PatchMerging(dim // 2) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[
            SwinTransformerBlock(dim, resolution, num_heads, window_size, 0 if i % 2 == 0 else window_size // 2)
            for i in range(depth)])

    def forward(self, x):
        return self.blocks(self.downsample(x))


class TinySwin(nn.Module):
    """timm's SwinTransformer layout (patch embed, stages of blocks with PatchMerging, norm,
    pooled head), small: a 2-stage model on 28 x 28 images (a 14 x 14 then 7 x 7 grid)."""

    def __init__(self, embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=7, num_classes=10):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, embed_dim, kernel_size=2, stride=2)
        layers, dim, res = [], embed_dim, 14
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            if i:
                dim, res = dim * 2, res // 2
            layers.append(SwinStage(dim, (res, res), depth, heads, window_size, downsample=i > 0))
        self.layers = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).permute(0, 2, 3, 1)
        x = self.norm(self.layers(x))
        return self.head(x.mean((1, 2)))
