"""The shared backbone: shapes, timm parameter names, patchify, the sin-cos table, the interface."""
import math

import pytest
import torch

from vit import SIZES, ViT, count_params, sincos_pos_embed


def tiny(**kw):
    return ViT(**{**dict(img_size=32, patch_size=4, dim=32, depth=2, heads=4), **kw})


def test_named_sizes_and_param_counts():
    assert SIZES["tiny"] == (192, 12, 3) and SIZES["small"] == (384, 12, 6)
    assert SIZES["base"] == (768, 12, 12) and SIZES["large"] == (1024, 24, 16)
    # timm's vit_base_patch16_224 without its classifier has 85.8 M parameters (pos_embed included)
    assert abs(count_params(ViT.from_name("base")) / 1e6 - 85.8) < 0.1
    with pytest.raises(ValueError, match="'huge-ish' is not a ViT size"):
        ViT.from_name("huge-ish")
    assert ViT.from_name("64,2,4").config == ViT(dim=64, depth=2, heads=4).config  # a custom width,depth,heads
    for bad, message in (("64,2", "is not a ViT size"), ("64,0,4", "is not a ViT size"),
                         ("64,2,3", "width 64 must be divisible by the 3 heads")):
        with pytest.raises(ValueError, match=message):
            ViT.from_name(bad)


def test_parameter_names_match_timm():
    names = {n for n, _ in tiny(depth=1).named_parameters()}
    block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
             "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    expected = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    expected |= {f"blocks.0.{b}" for b in block}
    assert names == expected
    vit = tiny()
    assert vit.pos_embed.shape == (1, 1 + 64, 32) and vit.cls_token.shape == (1, 1, 32)
    assert vit.blocks[0].attn.qkv.weight.shape == (96, 32) and vit.blocks[0].mlp.fc1.weight.shape == (128, 32)
    assert vit.blocks[0].norm1.eps == 1e-6 and vit.norm.eps == 1e-6


def test_forward_shapes_and_readouts():
    vit = tiny()
    x = torch.randn(2, 3, 32, 32)
    assert vit(x).shape == (2, 32)
    assert vit(x, pool="mean").shape == (2, 32)
    tokens = vit(x, pool="all")
    assert tokens.shape == (2, 65, 32)
    assert torch.allclose(vit(x, pool="cls"), tokens[:, 0]) and torch.allclose(vit(x, pool="mean"), tokens[:, 1:].mean(1))
    with pytest.raises(ValueError):
        vit(x, pool="max")


def test_indivisible_sizes_give_clear_errors():
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        ViT(img_size=30, patch_size=4, dim=32, depth=1, heads=4)
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        tiny().embed(torch.randn(1, 3, 30, 30))


def test_patchify_round_trip_and_channel_order():
    vit = tiny()
    imgs = torch.randn(2, 3, 32, 32)
    patches = vit.patchify(imgs)
    assert patches.shape == (2, 64, 4 * 4 * 3)
    assert torch.equal(vit.unpatchify(patches), imgs)
    # patch (row 1, col 2) is pixels [4:8, 8:12], flattened as (row-in-patch, col-in-patch, channel), as MAE
    manual = imgs[0, :, 4:8, 8:12].permute(1, 2, 0).reshape(-1)
    assert torch.equal(patches[0, 1 * 8 + 2], manual)


def test_sincos_table_values_in_mae_order():
    table = sincos_pos_embed(8, 2, 3)  # D/4 = 2 frequencies: w = 1 and 1/100
    assert table.shape == (1 + 6, 8)
    assert torch.equal(table[0], torch.zeros(8))  # CLS slot
    row, col = 1, 2
    expected = [math.sin(col), math.sin(col / 100), math.cos(col), math.cos(col / 100),
                math.sin(row), math.sin(row / 100), math.cos(row), math.cos(row / 100)]
    assert torch.allclose(table[1 + row * 3 + col], torch.tensor(expected), atol=1e-6)
    vit = tiny()
    assert not vit.pos_embed.requires_grad
    assert torch.equal(vit.pos_embed[0], sincos_pos_embed(32, 8, 8))


def test_learnable_position_table_and_interpolation():
    vit = tiny(pos_embed="learnable")
    assert vit.pos_embed.requires_grad and vit.pos_embed.std() > 0
    assert vit.interpolate_pos_embed(8, 8) is vit.pos_embed  # same grid: the table itself
    small = vit.interpolate_pos_embed(4, 4)
    assert small.shape == (1, 1 + 16, 32) and torch.equal(small[:, 0], vit.pos_embed[:, 0])
    # a smaller image goes through with the interpolated table
    assert vit(torch.randn(2, 3, 16, 16), pool="all").shape == (2, 17, 32)


def test_forward_tokens_on_a_subset_and_gradients():
    vit = tiny()
    x = vit.embed(torch.randn(2, 3, 32, 32))
    out = vit.forward_tokens(x[:, :10])
    assert out.shape == (2, 11, 32)
    out.sum().backward()
    assert vit.patch_embed.proj.weight.grad is not None and vit.cls_token.grad is not None


def test_mae_initialisation():
    vit = tiny()
    w = vit.blocks[0].attn.qkv.weight  # xavier uniform: bound sqrt(6 / (fan_in + fan_out))
    assert w.abs().max() <= math.sqrt(6 / (32 + 96)) + 1e-6
    assert torch.equal(vit.blocks[0].attn.qkv.bias, torch.zeros(96))
    assert 0.01 < vit.cls_token.std() < 0.04


def test_drop_path_only_in_training():
    vit = tiny(drop_path=0.5)
    assert vit.blocks[0].drop_path.p == 0.0 and vit.blocks[-1].drop_path.p == 0.5
    x = torch.randn(4, 3, 32, 32)
    vit.eval()
    assert torch.equal(vit(x), vit(x))


def test_the_attention_weights_read_out_give_the_blocks_output():
    """vit.attention() reads the weights the fused kernel applies (issue #30): each row sums to 1, and the weights
    times the values, through the output projection, are the attention branch of the last block; added to the
    block's input and followed by its MLP branch they give the block's output."""
    from einops import rearrange
    torch.manual_seed(0)
    vit = tiny().eval()
    imgs = torch.randn(3, 3, 32, 32)
    weights = vit.attention(imgs)
    assert weights.shape == (3, 4, 1 + 64, 1 + 64) and torch.allclose(weights.sum(-1), torch.ones(3, 4, 65))
    inputs, outputs = [], []  # the last block's input and output, from hooks on the block itself
    hooks = [vit.blocks[-1].register_forward_pre_hook(lambda module, args: inputs.append(args[0])),
             vit.blocks[-1].register_forward_hook(lambda module, args, out: outputs.append(out))]
    with torch.no_grad():
        vit(imgs)
    for hook in hooks:
        hook.remove()
    block, x = vit.blocks[-1], inputs[0]
    v = rearrange(block.attn.qkv(block.norm1(x)), "b n (three h d) -> three b h n d", three=3, h=4)[2]
    branch = block.attn.proj(rearrange(weights @ v, "b h n d -> b n (h d)"))
    assert torch.allclose(branch, block.attn(block.norm1(x)), atol=1e-5)
    y = x + branch
    assert torch.allclose(y + block.mlp(block.norm2(y)), outputs[0], atol=1e-5)
