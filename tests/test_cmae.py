"""CMAE: pixel-shifted views stay aligned, unit masking, InfoNCE with 2 tau by hand, the total loss,
no gradient into the target branch, and the EMA math."""
import math

import pytest
import torch
from conftest import cosine
import torchvision.transforms as T
from PIL import Image

import cmae
from vit import ViT


def small_cmae(**kw):
    torch.manual_seed(0)
    encoder = ViT(img_size=32, patch_size=4, dim=32, depth=1, heads=2)
    return cmae.CMAE(encoder, **{**dict(decoder_dim=32, decoder_depth=1, decoder_heads=2, proj_hidden=32,
                                        proj_dim=16), **kw})


def coordinate_image(size):
    """Red = 4 x column, green = 4 x row: every pixel tells where it came from."""
    img = torch.zeros(3, size, size, dtype=torch.uint8)
    img[0] = (torch.arange(size) * 4).view(1, size)
    img[1] = (torch.arange(size) * 4).view(size, 1)
    return T.functional.to_pil_image(img)


def test_pixel_shift_offsets_in_range_and_views_aligned(monkeypatch):
    monkeypatch.setattr(T.RandomResizedCrop, "get_params", lambda img, scale, ratio: (0, 0, 40, 40))  # all of it
    views = cmae.PixelShiftViews(img_size=32, max_shift=7)
    img = coordinate_image(40)                    # 40 = 32 + 7 + 1: the device's resample keeps it as it is
    shifts = set()
    for seed in range(200):
        torch.manual_seed(seed)
        crop, shift, params = views(img)          # the workers' part: the crop, its offsets, the colour draws
        assert crop.dtype == torch.uint8 and params.shape == (2, 13) and not params[0].any()  # online: no colour
        base = cmae.resample([crop], 40)
        assert torch.equal(base[0], crop)          # resampling to its own size changes nothing
        online, target = base[:, :, :32, :32], cmae.shifted_crops(base, shift[None], 32)
        dy, dx = shift.tolist()
        assert 0 <= dy <= 7 and 0 <= dx <= 7
        assert torch.equal(target[0], crop[:, dy:dy + 32, dx:dx + 32])
        assert torch.equal(target[0, :, : 32 - dy, : 32 - dx], online[0, :, dy:, dx:])  # same content, shifted
        shifts.add((dy, dx))
    assert (0, 0) in shifts and max(max(s) for s in shifts) == 7 and len(shifts) > 40


def test_device_views_resample_crops_of_any_size_and_colour_only_the_target():
    args = cmae.Args(img_size=32, max_shift=7)
    crops = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in ((50, 60), (21, 17), (40, 40))]
    shift = torch.tensor([[0, 0], [7, 3], [2, 5]])
    params = torch.zeros(3, 2, 13)
    params[:, 1, 9] = 1.0                          # the target view: grayscale
    online, target = cmae.device_views((crops, shift, params), args)
    assert online.shape == target.shape == (3, 3, 32, 32)
    base = cmae.resample(crops, 40)
    assert torch.equal(online, cmae.normalize(base[:, :, :32, :32].float() / 255))
    gray = target * torch.tensor(cmae.STD).view(3, 1, 1) + torch.tensor(cmae.MEAN).view(3, 1, 1)
    assert torch.allclose(gray[:, 0], gray[:, 1], atol=1e-5) and torch.allclose(gray[:, 1], gray[:, 2], atol=1e-5)


def test_device_resample_is_the_official_pil_bicubic_resize():
    """The official pipelines resize with PIL (bicubic, antialiased); ours on the device agrees with it to a
    fifth of a grey level on average (README "Input pipeline" gives the same on photographs)."""
    torch.manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 12, 9), size=(150, 110), mode="bilinear")[0]
    img = T.functional.to_pil_image((smooth + 0.1 * torch.rand(3, 150, 110)).clamp(0, 1))
    for size in (32, 64, 224):                    # down and up
        ours = cmae.resample([T.functional.pil_to_tensor(img)], size)[0].float()
        pil = T.functional.pil_to_tensor(img.resize((size, size), resample=3)).float()  # 3 = bicubic
        assert (ours - pil).abs().mean() < 0.3 and (ours - pil).abs().max() <= 3


def test_unit_masking_masks_whole_2x2_units():
    model = small_cmae(mask_ratio=0.65, mask_unit=2)
    imgs = torch.randn(4, 3, 32, 32)
    _, pred, mask, terms = model(imgs, imgs)
    units = mask.view(4, 4, 2, 4, 2)  # (B, unit rows, 2, unit cols, 2) over the 8 x 8 patch grid
    assert torch.equal(units.amin(dim=(2, 4)), units.amax(dim=(2, 4)))  # constant inside every unit
    n_keep = int(16 * (1 - 0.65)) * 4                                    # 5 of 16 units = 20 patches
    assert torch.equal(mask.sum(1), torch.full((4,), 64.0 - n_keep))
    _, _, mask1, _ = small_cmae(mask_ratio=0.75, mask_unit=1)(imgs, imgs)
    assert torch.equal(mask1.sum(1), torch.full((4,), 64.0 - int(64 * 0.25)))


def test_infonce_equals_hand_computation_with_two_tau():
    torch.manual_seed(0)
    y, z, tau = torch.randn(3, 4), torch.randn(3, 4), 0.07
    total = 0.0
    for i in range(3):
        logits = [cosine(y[i].tolist(), z[j].tolist()) / tau for j in range(3)]
        total += -logits[i] + math.log(sum(math.exp(l) for l in logits))
    assert cmae.infonce_loss(y, z, tau).item() == pytest.approx(2 * tau * total / 3, rel=1e-5)


def test_total_loss_and_gradients_stay_out_of_the_target():
    model = small_cmae(lambda_c=0.5)
    imgs, shifted = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    loss, _, _, terms = model(imgs, shifted)
    assert loss.item() == pytest.approx(terms["rec"].item() + 0.5 * terms["con"].item(), rel=1e-6)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.target_parameters())
    for part in (model.encoder, model.decoder, model.feature_decoder, model.projector, model.predictor):
        assert all(p.grad is not None for p in part.parameters() if p.requires_grad)


def test_ema_math():
    model = small_cmae()
    with torch.no_grad():
        for p in model.encoder.parameters():
            if p.requires_grad:
                p.add_(1.0)
    online = [p.clone() for p in list(model.encoder.parameters()) + list(model.projector.parameters())]
    trained = [p.requires_grad for p in list(model.encoder.parameters()) + list(model.projector.parameters())]
    before = [p.clone() for p in model.target_parameters()]
    model.momentum_update(1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.target_parameters()))
    model.momentum_update(0.996)
    for t, b, o, tr in zip(model.target_parameters(), before, online, trained):
        assert torch.allclose(t, 0.996 * b + 0.004 * o) if tr else torch.equal(t, b)
    model.momentum_update(0.0)
    assert all(torch.equal(t, o) for t, o in zip(model.target_parameters(), online))
