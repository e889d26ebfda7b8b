"""MAE: masking, the decoder's unshuffle, the loss by hand, gradients, learning, and resume."""
import json
import os

import pytest
import torch
import torch.nn as nn

import mae
from vit import ViT


def small_mae(**kw):
    encoder = ViT(img_size=32, patch_size=4, dim=32, depth=2, heads=4)
    return mae.MAE(encoder, **{**dict(decoder_dim=32, decoder_depth=1, decoder_heads=4), **kw})


def test_random_masking_keeps_exactly_the_right_patches():
    torch.manual_seed(0)
    B, N, D, ratio = 5, 64, 8, 0.75
    x = torch.randn(B, N, D)
    x_visible, mask, ids_restore = mae.random_masking(x, ratio)
    n_keep = int(N * (1 - ratio))
    assert x_visible.shape == (B, n_keep, D)
    assert torch.equal(mask.sum(1), torch.full((B,), float(N - n_keep)))      # 48 masked per sample
    assert not all(torch.equal(mask[0], mask[b]) for b in range(1, B))        # a different mask per sample
    for b in range(B):  # the visible tokens are exactly x at the unmasked positions (as a set)
        kept = x[b][mask[b] == 0]
        assert torch.equal(torch.sort(kept, dim=0).values, torch.sort(x_visible[b], dim=0).values)


def test_ids_restore_inverts_the_shuffle():
    noise = torch.rand(3, 16)
    _, mask, ids_restore = mae.random_masking(torch.randn(3, 16, 4), 0.5, noise)
    ids_shuffle = noise.argsort(1)
    assert torch.equal(ids_shuffle.gather(1, ids_restore), torch.arange(16).expand(3, 16))
    # the patches with the smallest noise are the visible ones
    assert torch.equal(mask == 0, noise <= noise.sort(dim=1).values[:, 7:8])


def test_decoder_puts_visible_tokens_back_in_place_and_mask_tokens_elsewhere():
    torch.manual_seed(0)
    D, grid = 8, (4, 4)
    dec = mae.MAEDecoder(D, D, depth=0, heads=2, out_dim=D, grid=grid)
    dec.embed, dec.norm, dec.pred = nn.Identity(), nn.Identity(), nn.Identity()  # expose the unshuffle
    dec.pos_embed.data.zero_()
    x = torch.randn(2, 16, D)
    x_visible, mask, ids_restore = mae.random_masking(x, 0.75)
    latent = torch.cat([torch.zeros(2, 1, D), x_visible], dim=1)                # CLS first
    out = dec(latent, ids_restore)
    assert out.shape == (2, 16, D)
    visible = mask == 0
    assert torch.equal(out[visible], x[visible])
    assert torch.equal(out[~visible], dec.mask_token[0].expand(int((~visible).sum()), D))


def test_mae_loss_equals_hand_computation():
    target = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [10.0, 0.0, 0.0, 2.0]]])  # B=1, N=2 patches of 4 values
    pred = torch.zeros(1, 2, 4)
    mask = torch.tensor([[1.0, 0.0]])  # only the first patch is masked
    # plain pixels: mean of squares of the masked patch only = (1 + 4 + 9 + 16) / 4
    assert mae.mae_loss(pred, target, mask, norm_pix_loss=False).item() == pytest.approx(7.5)
    # norm-pix: (x - 2.5) / sqrt(var + 1e-6), var unbiased = 5/3, so mean of squares = 5 / (4 * (5/3 + 1e-6))
    assert mae.mae_loss(pred, target, mask, norm_pix_loss=True).item() == pytest.approx(5 / (4 * (5 / 3 + 1e-6)), rel=1e-6)
    # averaged over masked patches across the batch
    both = torch.ones(1, 2)
    second = (10**2 + 0 + 0 + 2**2) / 4  # plain pixels of patch 2
    assert mae.mae_loss(pred, target, both, norm_pix_loss=False).item() == pytest.approx((7.5 + second) / 2)


def test_model_forward_and_gradients_reach_the_encoder():
    torch.manual_seed(0)
    model = small_mae()
    imgs = torch.randn(4, 3, 32, 32)
    loss, pred, mask = model(imgs)
    assert pred.shape == (4, 64, 48) and mask.shape == (4, 64) and torch.isfinite(loss)
    loss.backward()
    for name, p in model.encoder.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.encoder.pos_embed.grad is None  # the sin-cos table is fixed
    groups = mae.param_groups(model, 0.05)
    assert all(p.ndim > 1 for p in groups[0]["params"]) and all(p.ndim <= 1 for p in groups[1]["params"])
    assert groups[1]["weight_decay"] == 0.0


def test_lr_schedule_warms_up_then_decays():
    assert mae.lr_at(0, 100, 10, 1.0, 0.0) == 0.0
    assert mae.lr_at(5, 100, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert mae.lr_at(10, 100, 10, 1.0, 0.0) == pytest.approx(1.0)
    assert mae.lr_at(55, 100, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert mae.lr_at(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)


def tiny_args(tmp_path, name, **kw):
    base = dict(data="fake", device="cpu", model_dims="32,2,4", decoder_dim=32, decoder_depth=1, decoder_heads=4,
                batch_size=16, num_workers=0, out_dir=str(tmp_path), run_name=name, log_every=4, vis_every=0)
    return mae.Args(**{**base, **kw})


def read_log(path):
    """The training steps' log lines (the kNN monitor's lines left out)."""
    with open(os.path.join(os.path.dirname(path), "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if "train/loss" in r]


def test_resumed_run_continues_the_same_run(tmp_path):
    """k steps, stop, resume == the uninterrupted run, bit for bit on CPU (also across worker counts)."""
    whole = mae.train(tiny_args(tmp_path, "whole", steps=12, blr=1e-3))
    part = mae.train(tiny_args(tmp_path, "part", steps=12, blr=1e-3, stop_after=5))
    assert torch.load(part, weights_only=True)["step"] == 5
    resumed = mae.train(mae.Args(resume=part, device="cpu", num_workers=2, log_every=4))
    a, b = torch.load(whole, weights_only=True), torch.load(resumed, weights_only=True)
    assert a["step"] == b["step"] == 12
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [r["train/loss"] for r in read_log(whole)][-1] == [r["train/loss"] for r in read_log(resumed)][-1]


def test_checkpoint_contents(tmp_path):
    path = mae.train(tiny_args(tmp_path, "ckpt", steps=2))
    ckpt = torch.load(path, weights_only=True)  # plain types only
    assert ckpt["method"] == "mae" and ckpt["step"] == 2 and ckpt["default_encoder"] == "online"
    assert ckpt["args"]["model_dims"] == "32,2,4" and isinstance(ckpt["args"], dict)
    assert not any("_orig_mod" in k for k in ckpt["model"])
    encoder = ViT(**ckpt["encoder_config"])
    encoder.load_state_dict(ckpt["encoder"])
    assert {"model", "optimizer", "rng", "encoder"} <= set(ckpt)


@pytest.mark.slow
def test_reconstruction_loss_falls_on_structured_data(tmp_path):
    """A few hundred steps on the synthetic structured images: the masked-patch loss falls clearly."""
    path = mae.train(tiny_args(tmp_path, "learn", steps=300, blr=4e-3, warmup_epochs=1, epochs=20, log_every=20,
                               model_dims="64,2,4", decoder_dim=64))
    losses = [r["train/loss"] for r in read_log(path)]
    assert losses[-1] < 0.6 * losses[0], losses


def test_reconstruction_picture_is_written(tmp_path):
    model = small_mae()
    imgs = torch.randn(4, 3, 32, 32)
    path = str(tmp_path / "recon.png")
    mae.save_reconstructions(model, imgs, path)
    from PIL import Image
    with Image.open(path) as im:
        assert im.size[1] > 3 * 32  # three rows: original, masked, reconstruction


def test_non_finite_loss_stops_with_the_step():
    losses = [torch.tensor(1.0), torch.tensor(0.9), torch.tensor(float("nan")), torch.tensor(float("inf"))]
    with pytest.raises(mae.DataError, match="loss is nan at step 12"):
        mae.check_finite(losses, first_step=10)
    assert mae.check_finite(losses[:2], first_step=10) == pytest.approx(0.95)


def test_a_warm_up_longer_than_half_the_run_is_capped_so_the_lr_peaks(tmp_path, capsys):
    # 1 epoch of 62 steps with the recipe's 10-epoch warm-up: uncapped, the lr would climb for 620 steps
    path = mae.train(tiny_args(tmp_path, "warm", epochs=1, warmup_epochs=10, log_every=1, stop_after=40))
    assert "warm-up 31 steps = half the run" in capsys.readouterr().out
    lrs = [r["train/lr"] for r in read_log(path)]
    peak = mae.RECIPES["cpu"]["blr"] * 16 / 256  # --recipe auto on the CPU
    assert lrs[30] == pytest.approx(peak * 30 / 31) and lrs[31] == pytest.approx(peak)  # step 31 is the peak
    assert lrs[39] < lrs[31]  # then the cosine decay
