"""
vit.py: the one Vision Transformer that every method file shares.

A plain pre-norm ViT (Dosovitskiy et al., 2021, arXiv:2010.11929) with MAE's initialisation and
MAE's fixed 2-D sin-cos position table (He et al., 2022, arXiv:2111.06377). Parameter names match
timm's VisionTransformer, so a state dict moves between timm, the official MAE / MoCo v3 / MSN
encoders and this file without renaming.

The interface the method files use (and nothing else):

    vit = ViT(img_size=32, patch_size=4, dim=192, depth=12, heads=3)   # or ViT.from_name("tiny" or "192,12,3", ...)
    vit.config                  dict of constructor arguments: ViT(**vit.config) rebuilds it
    vit.num_patches, vit.grid   N = h*w patches on an (h, w) grid at img_size
    vit.patchify(imgs)          (B, 3, H, W) -> (B, N, p*p*3), channel order (p1 p2 c) as in MAE
    vit.unpatchify(patches)     inverse of patchify
    vit.embed(imgs)             (B, N, D) patch tokens with their positions added; any H, W that
                                the patch divides (the table is interpolated for other grids)
    vit.forward_tokens(x)       prepend CLS, run the blocks and the final norm on any subset of
                                patch tokens (the visible ones, for MAE): (B, n, D) -> (B, 1+n, D)
    vit(imgs, pool=...)         features: "cls" (B, D), "mean" of patch tokens (B, D), "all" (B, 1+N, D)
    vit.attention(imgs)         the last block's attention weights (B, heads, 1+N, 1+N), for pictures
    vit.interpolate_pos_embed(h, w)   the (1, 1+h*w, D) position table resized to another grid
    knn_predict(train_f, train_y, test_f, k, T)   the weighted kNN vote on features (nearest(): its neighbours)

Attention runs through F.scaled_dot_product_attention, so the GPU uses flash attention.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

# name -> (width D, depth, heads); MLP ratio 4 everywhere (REFERENCE §0.1)
SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}


def sincos_pos_embed(dim, grid_h, grid_w):
    """Fixed 2-D sin-cos table, (1 + h*w, dim) with a zero CLS row, in MAE's channel order:
    [sin(col*w_k), cos(col*w_k), sin(row*w_k), cos(row*w_k)],  w_k = 10000^(-k/(dim/4)),
    k = 0..dim/4-1 (MAE util/pos_embed.py; the column coordinate fills the first half)."""
    assert dim % 4 == 0, f"width {dim} must be divisible by 4 for the 2-D sin-cos table"
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (D/4,)
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                                torch.arange(grid_w, dtype=torch.float64), indexing="ij")
    col = cols.reshape(-1, 1) * omega  # (h*w, D/4), raster order: row outer, column inner
    row = rows.reshape(-1, 1) * omega
    table = torch.cat([col.sin(), col.cos(), row.sin(), row.cos()], dim=1)  # (h*w, D)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table]).float()  # (1 + h*w, D)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> D, a linear map of each flattened patch (as a strided conv)."""

    def __init__(self, patch_size, dim, in_chans=3):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, imgs):
        return rearrange(self.proj(imgs), "b d h w -> b (h w) d")  # (B, N, D), raster order


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        assert dim % heads == 0, f"width {dim} must be divisible by heads {heads}"
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v, flash on GPU
        return self.proj(rearrange(x, "b h n d -> b n (h d)"))

    def weights(self, x):
        """The attention weights forward() applies to x, softmax(q k^T / sqrt(d)): (B, heads, n, n), each row summing
        to 1 (for pictures; forward itself keeps the fused kernel, which never forms them)."""
        q, k, _ = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        return (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(dim=-1)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample (used when fine-tuning)."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Block(nn.Module):
    """Pre-norm block: x + Attn(LN(x)), then x + MLP(LN(x)); LayerNorm eps 1e-6 as in all seven repos."""

    def __init__(self, dim, heads, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    def __init__(self, img_size=224, patch_size=16, dim=768, depth=12, heads=12, mlp_ratio=4.0,
                 in_chans=3, pos_embed="sincos", drop_path=0.0):
        super().__init__()
        if img_size % patch_size != 0:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        if pos_embed not in ("sincos", "learnable"):
            raise ValueError(f"pos_embed must be 'sincos' or 'learnable', not {pos_embed!r}")
        self.config = dict(img_size=img_size, patch_size=patch_size, dim=dim, depth=depth, heads=heads,
                           mlp_ratio=mlp_ratio, in_chans=in_chans, pos_embed=pos_embed)
        self.patch_size, self.dim = patch_size, dim
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid[0] * self.grid[1]

        self.patch_embed = PatchEmbed(patch_size, dim, in_chans)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        # the CLS slot of the table is used too (zero for sin-cos), so the shape matches timm's
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, dim),
                                      requires_grad=(pos_embed == "learnable"))
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # rising linearly from 0
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio, r) for r in rates])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.init_weights()

    @classmethod
    def from_name(cls, name, **kwargs):
        """ViT.from_name("small", img_size=224, patch_size=16): a size from SIZES, or a custom one
        written "width,depth,heads" (e.g. "64,2,4" for smoke runs)."""
        parts = str(name).split(",")
        if name in SIZES:
            dim, depth, heads = SIZES[name]
        elif len(parts) == 3 and all(p.strip().isdigit() and int(p) > 0 for p in parts):
            dim, depth, heads = (int(p) for p in parts)
            if dim % heads or dim % 4:
                raise ValueError(f"{name}: the width {dim} must be divisible by the {heads} heads and by 4 "
                                 "(for the sin-cos position table)")
        else:
            raise ValueError(f"{name!r} is not a ViT size: one of {sorted(SIZES)}, or width,depth,heads, three "
                             "whole numbers above 0 (e.g. 64,2,4)")
        return cls(dim=dim, depth=depth, heads=heads, **kwargs)

    def init_weights(self):
        """MAE's scheme (models_mae.py initialize_weights, REFERENCE §0.4): xavier-uniform Linear and
        patch projection weights, zero Linear biases, LayerNorm (1, 0), CLS ~ N(0, 0.02); sin-cos table
        fixed, or trunc-normal(0.02) if learnable. As in MAE, the patch projection's bias keeps
        PyTorch's Conv2d default, U(+-1/sqrt(3 p^2))."""
        if self.pos_embed.requires_grad:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        else:
            self.pos_embed.data.copy_(sincos_pos_embed(self.dim, *self.grid).unsqueeze(0))
        nn.init.normal_(self.cls_token, std=0.02)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear on the flattened patch
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------ pixels <-> patches
    def patchify(self, imgs):
        """(B, C, H, W) -> (B, N, p*p*C), each patch flattened as (row-in-patch, col-in-patch, C)."""
        p = self.patch_size
        return rearrange(imgs, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p)

    def unpatchify(self, patches, grid=None):
        """(B, N, p*p*C) -> (B, C, H, W); grid (h, w) defaults to the model's own."""
        h, w = grid or self.grid
        p = self.patch_size
        return rearrange(patches, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=h, w=w, p1=p, p2=p)

    # ------------------------------------------------------------ tokens
    def interpolate_pos_embed(self, grid_h, grid_w):
        """The position table resized (bicubic) to another grid, CLS slot kept: (1, 1 + h*w, D).
        For MSN's focal views; the same grid returns the table itself."""
        if (grid_h, grid_w) == self.grid:
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        patch_pos = rearrange(patch_pos, "1 (h w) d -> 1 d h w", h=self.grid[0], w=self.grid[1])
        patch_pos = F.interpolate(patch_pos, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        return torch.cat([cls_pos, rearrange(patch_pos, "1 d h w -> 1 (h w) d")], dim=1)

    def embed(self, imgs):
        """Patch tokens with their positions added: (B, C, H, W) -> (B, N, D). No CLS yet."""
        H, W = imgs.shape[-2:]
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not divisible by patch_size {p}")
        pos = self.interpolate_pos_embed(H // p, W // p)
        return self.patch_embed(imgs) + pos[:, 1:]

    def forward_tokens(self, x, norm=True):
        """Prepend CLS (with its position slot), run every block and the final LayerNorm on the
        given patch tokens, any subset of them: (B, n, D) -> (B, 1 + n, D)."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x) if norm else x

    @torch.no_grad()
    def attention(self, imgs, block=-1):
        """A block's attention weights (the last by default) on full images, (B, heads, 1 + N, 1 + N); row 0 is the CLS
        token's. The images go through forward() as in training; the block's input is kept to recompute them."""
        attn, inputs = self.blocks[block].attn, []
        hook = attn.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
        try:
            self(imgs)
        finally:
            hook.remove()
        return attn.weights(inputs[0])

    def forward(self, imgs, pool="cls", norm=True):
        """Features of full images: pool "cls" -> (B, D), "mean" of patch tokens -> (B, D),
        "all" -> (B, 1 + N, D). norm=False skips the final LayerNorm (MSN's and CMAE's read-outs)."""
        x = self.forward_tokens(self.embed(imgs), norm=norm)
        if pool == "cls":
            return x[:, 0]
        if pool == "mean":
            return x[:, 1:].mean(dim=1)
        if pool == "all":
            return x
        raise ValueError(f"pool must be 'cls', 'mean' or 'all', not {pool!r}")


def count_params(module):
    """The number of parameters of a module (the start-up line of every run prints it)."""
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------- the kNN vote on a ViT's features
# (the kNN monitor of every method file and evaluate.py's kNN and retrieval protocols)
@torch.no_grad()
def nearest(train_f, test_f, k, chunk=512):
    """The k training features most cosine-similar to each test feature: (similarities, indices), (N_test, k) each."""
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    parts = [(test_f[start:start + chunk] @ train_f.T).topk(min(k, len(train_f)), dim=1)  # (n, N_train) -> (n, k)
             for start in range(0, len(test_f), chunk)]
    return torch.cat([s for s, _ in parts]), torch.cat([i for _, i in parts])


def knn_predict(train_f, train_y, test_f, k=20, T=0.07, num_classes=None):
    """Weighted kNN (Wu et al. 2018; DINO eval_knn): among the k training features most cosine-similar
    to a test feature, class c scores sum_{i in top-k, y_i = c} exp(s_i / T); predict the argmax.
    Returns (N_test,) predicted labels."""
    top_s, top_i = nearest(train_f, test_f, k)
    votes = torch.zeros(len(test_f), num_classes or int(train_y.max()) + 1)
    votes.scatter_add_(1, train_y[top_i], (top_s / T).exp())  # class score = sum of exp(s/T)
    return votes.argmax(dim=1)


if __name__ == "__main__":
    for name in SIZES:
        vit = ViT.from_name(name)
        print(f"ViT-{name}/16 at 224: {count_params(vit) / 1e6:.1f} M parameters")
