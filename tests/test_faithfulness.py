"""Places where the files follow the official implementations in a detail the papers leave out
(issue #13): MSN's per-group projection head, its lr warm-up start and head init, CMAE's BatchNorm eps
and weight-decay groups, ConMIM's decay groups and init, grafting's decay of CLS, vit.py's patch bias,
and evaluate.py --weights keeping an official MoCo v3 position table."""
import json
import math

import pytest
import torch
import torch.nn as nn

import cmae
import conmim
import evaluate
import grafting
import msn
import vit as vit_module
from vit import ViT


# ---------------------------------------------------------------- MSN
def small_msn():
    torch.manual_seed(0)
    encoder = ViT(img_size=32, patch_size=4, dim=32, depth=1, heads=2, pos_embed="learnable")
    return msn.MSN(encoder, hidden_dim=32, proj_dim=16, num_prototypes=8)


def test_msn_head_runs_once_per_group_of_same_size_anchors():
    """Official deit.py forward: the head (with BatchNorm) runs on the B random anchors and on the
    10B focal anchors separately, so each group is normalised with its own batch statistics."""
    model = small_msn()
    torch.manual_seed(1)
    B = 8
    target, rand = torch.randn(B, 3, 32, 32), torch.randn(B, 3, 32, 32)
    focal = [torch.randn(B, 3, 16, 16) for _ in range(3)]
    torch.manual_seed(2)  # the patch-drop draw
    z, _ = model(target, rand, *focal)

    torch.manual_seed(2)  # the same draw, by hand
    h_rand = model.encoder.forward_tokens(msn.patch_drop(model.encoder.embed(rand), model.patch_drop))[:, 0]
    h_focal = model.encoder(torch.cat(focal))
    per_group = torch.cat([model.head(h_rand), model.head(h_focal)])
    union = model.head(torch.cat([h_rand, h_focal]))
    assert z.shape == (4 * B, 16)
    assert torch.allclose(z, per_group, atol=1e-5)
    assert not torch.allclose(z, union, atol=1e-3)  # one BatchNorm pass over all 4B anchors is different


def test_msn_head_init_is_trunc_normal_with_zero_biases():
    model = small_msn()
    for m in list(model.head) + list(model.target_head):
        if isinstance(m, nn.Linear):
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
            # official trunc_normal_(std=0.02) cuts at +-2 (absolute), so in effect N(0, 0.02);
            # PyTorch's default here would be U(+-1/sqrt(32)), std 0.10
            assert 0.017 < m.weight.std() < 0.023 and m.weight.abs().max() < 0.12


def test_msn_lr_warms_up_from_a_fifth_of_the_peak_to_the_official_final_lr(tmp_path):
    assert msn.RECIPES["imagenet"]["min_lr"] == pytest.approx(1e-6 * 256 / 1024)  # final_lr at batch 1024
    args = msn.Args(data="fake", device="cpu", model_dims="32,1,2", hidden_dim=32, num_prototypes=8, focal_views=1,
                    batch_size=16, steps=8, warmup_epochs=4, epochs=8, num_workers=0, log_every=1,
                    out_dir=str(tmp_path), run_name="lr", blr=1e-3)
    msn.train(args)
    lrs = [json.loads(line)["train/lr"] for line in open(tmp_path / "lr" / "log.jsonl") if "train/lr" in line]
    peak = 1e-3 * 16 / 256
    warmup = 4  # 4 of 8 epochs, capped at half the run = 4 steps
    # the official scheduler steps before its first use: step 0 trains at the schedule's step 1 (2.2e-4 at lr 1e-3)
    assert lrs[0] == pytest.approx(peak * (0.2 + 0.8 * 1 / warmup))   # start_lr = 0.2 x peak, one step on
    assert lrs[2] == pytest.approx(peak * (0.2 + 0.8 * 3 / warmup))   # linear from there
    assert lrs[3] == pytest.approx(2.5e-7 + (peak - 2.5e-7) * 0.5 * (1 + math.cos(0)))  # the peak
    assert all(lr > 2.5e-7 for lr in lrs)


# ---------------------------------------------------------------- CMAE
def small_cmae():
    torch.manual_seed(0)
    encoder = ViT(img_size=32, patch_size=4, dim=32, depth=1, heads=2)
    return cmae.CMAE(encoder, decoder_dim=32, decoder_depth=1, decoder_heads=2, proj_hidden=32, proj_dim=16)


def test_cmae_heads_use_batchnorm_eps_1e6():
    model = small_cmae()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    assert len(bns) == 3 and all(m.eps == 1e-6 for m in bns)  # projector, predictor, target projector


def test_cmae_weight_decay_groups_follow_the_official_paramwise_cfg():
    model = small_cmae()
    decay, no_decay = cmae.param_groups(model, 0.05)
    wd = {id(p): g["weight_decay"] for g in (decay, no_decay) for p in g["params"]}
    named = dict(model.named_parameters())
    for name in ("encoder.cls_token", "decoder.mask_token", "feature_decoder.mask_token", "encoder.norm.weight",
                 "encoder.blocks.0.norm1.weight", "projector.0.bias", "projector.1.bias"):
        assert wd[id(named[name])] == 0.0, name
    for name in ("projector.1.weight", "predictor.1.weight", "encoder.blocks.0.attn.qkv.weight", "projector.0.weight"):
        assert wd[id(named[name])] == 0.05, name  # the BatchNorm weights (projector.1, predictor.1) are decayed
    assert len(wd) == sum(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------- ConMIM
def test_conmim_decay_groups_min_lr_and_init():
    torch.manual_seed(0)
    model = conmim.ConMIM(ViT(img_size=32, patch_size=4, dim=32, depth=1, heads=2), mlp_dim=64, proj_dim=16)
    decay, no_decay = conmim.param_groups(model, 0.05)
    wd = {id(p): g["weight_decay"] for g in (decay, no_decay) for p in g["params"]}
    assert wd[id(model.encoder.cls_token)] == 0.0          # official no_weight_decay() = {pos_embed, cls_token}
    assert wd[id(model.mask_token)] == 0.05                # the [mask] token is decayed officially
    assert conmim.RECIPES["imagenet"]["min_lr"] == pytest.approx(1e-5 * 256 / 2048)  # 1e-5 at the code's batch
    for m in model.projector:
        if isinstance(m, nn.Linear):
            assert m.weight.abs().max() <= 0.02 + 1e-7     # trunc-normal cut at one std (a=-std, b=std)
    assert model.mask_token.abs().max() <= 0.02 + 1e-7 and model.mask_token.std() > 0.005


# ---------------------------------------------------------------- grafting
def test_grafting_decays_cls_like_the_official_run():
    args = grafting.Args(data="fake", device="cpu", model_dims="32,2,2", img_size=32, patch_size=4, proj_dim=16,
                         mlp_dim=32, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    model = grafting.build_model(args)
    groups = grafting.param_groups(model, weight_decay=0.1, n_lower=1, lower_lr_ratio=0.1)
    wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert wd[id(model.encoder.cls_token)] == 0.1


# ---------------------------------------------------------------- vit.py
def test_patch_projection_bias_keeps_the_conv_default_as_in_mae():
    torch.manual_seed(0)
    v = ViT(img_size=32, patch_size=4, dim=64, depth=1, heads=2)
    bias, bound = v.patch_embed.proj.bias, 1 / math.sqrt(3 * 4 * 4)  # Conv2d default U(+-1/sqrt(fan_in))
    assert bias.abs().max() <= bound and bias.abs().max() > bound / 2 and bias.std() > 0
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in v.modules() if isinstance(m, nn.Linear))


# ---------------------------------------------------------------- MoCo v3's position table in evaluate.py
def moco_v3_sincos(dim, h, w):
    """The official MoCo v3 table (vits.py build_2d_sincos_position_embedding): row coordinate first."""
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    out_r, out_c = rows.flatten()[:, None] * omega, cols.flatten()[:, None] * omega
    table = torch.cat([out_r.sin(), out_r.cos(), out_c.sin(), out_c.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), table])[None]


def test_weights_file_keeps_an_official_moco_v3_position_table(tmp_path):
    torch.manual_seed(0)
    v = ViT(img_size=32, patch_size=4, dim=64, depth=1, heads=2)
    official = moco_v3_sincos(64, 8, 8)
    assert not torch.allclose(official, v.pos_embed)  # the two orders differ ...
    assert torch.allclose(official[0, 1:, :32], vit_module.sincos_pos_embed(64, 8, 8)[1:, 32:], atol=1e-5)  # ... by halves
    state = {f"module.base_encoder.{k}": t for k, t in v.state_dict().items()}
    state["module.base_encoder.pos_embed"] = official
    torch.save({"state_dict": state}, tmp_path / "moco_v3.pth.tar")
    enc, _ = evaluate.load_weights_file(str(tmp_path / "moco_v3.pth.tar"), heads=2, img_size=32)
    assert torch.equal(enc.pos_embed, official)
