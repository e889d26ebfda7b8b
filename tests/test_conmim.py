"""ConMIM: unit masks, the shared crop, the patch-dictionary loss by hand (own-index labels, masked
positions only), the [mask] token, no gradient into the slow model, and the EMA math."""
import math

import pytest
import torch
from conftest import cosine
import torchvision.transforms as T

import conmim
from vit import ViT


def small_conmim(**kw):
    torch.manual_seed(0)
    return conmim.ConMIM(ViT(img_size=32, patch_size=4, dim=32, depth=1, heads=2),
                         **{**dict(mlp_dim=32, proj_dim=16), **kw})


def test_unit_mask_counts_and_cells():
    mask = conmim.unit_mask(6, (8, 8), 2, 0.75)
    assert mask.shape == (6, 64)
    cells = mask.view(6, 4, 2, 4, 2)
    assert torch.equal(cells.amin(dim=(2, 4)), cells.amax(dim=(2, 4)))   # whole 2x2 cells
    assert torch.equal(mask.sum(1), torch.full((6,), 64.0 - 4 * int(16 * 0.25)))
    assert not all(torch.equal(mask[0], m) for m in mask[1:])           # per-image masks
    assert torch.equal(conmim.unit_mask(2, (8, 8), 1, 0.75).sum(1), torch.full((2,), 48.0))


def test_both_views_share_one_crop():
    views = conmim.SharedCropViews(32)
    img = T.functional.to_pil_image(torch.rand(3, 48, 48))
    args = conmim.Args(img_size=32)
    for seed in range(5):
        torch.manual_seed(seed)
        crop, params = views(img)                # one crop at the image's resolution; the colour is drawn here
        assert crop.dtype == torch.uint8 and crop.shape[0] == 3 and crop.shape[1] <= 48 and params.shape == (13,)
        off = torch.zeros(1, 13)                 # without the photometric part the two views are identical
        online, strong = conmim.device_views(([crop], off), args)
        assert online.shape == (1, 3, 32, 32) and torch.equal(online, strong)
        online, strong = conmim.device_views(([crop], params[None]), args)
        assert torch.equal(online, conmim.normalize(conmim.resample([crop], 32).float() / 255))


def test_the_crop_of_the_flipped_image_is_the_official_flip_then_crop():
    img = T.functional.to_pil_image(torch.rand(3, 40, 56))
    for seed in range(20):                       # the official order: RandomHorizontalFlip, then RandomResizedCrop
        torch.manual_seed(seed)                  # the draws of RandomHorizontalFlip, then of RandomResizedCrop
        flip = torch.rand(1) < 0.5
        i, j, h, w = T.RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3))
        expected = T.functional.pil_to_tensor((T.functional.hflip(img) if flip else img).crop((j, i, j + w, i + h)))
        torch.manual_seed(seed)
        crop, _ = conmim.SharedCropViews(32)(img)
        assert torch.equal(crop, expected)


def test_loss_equals_hand_computation_at_masked_positions_only():
    torch.manual_seed(0)
    q, k, tau = torch.randn(1, 3, 2), torch.randn(1, 3, 2), 0.1
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    losses = []
    for j in (0, 2):  # masked positions; the dictionary is the 3 patches of the same image, positive = key j
        logits = [cosine(q[0, j].tolist(), k[0, i].tolist()) / tau for i in range(3)]
        losses.append(-logits[j] + math.log(sum(math.exp(l) for l in logits)))
    assert conmim.conmim_loss(q, k, mask, tau).item() == pytest.approx(sum(losses) / 2, rel=1e-5)
    q2 = q.clone()
    q2[0, 1] = torch.randn(2)  # a visible position: no effect on the loss
    assert conmim.conmim_loss(q2, k, mask, tau).item() == pytest.approx(conmim.conmim_loss(q, k, mask, tau).item())


def test_positive_key_is_the_same_position_of_the_same_image():
    keys = torch.eye(4).expand(2, 4, 4)                  # 2 images, 4 patches with orthogonal features
    mask = torch.ones(2, 4)
    assert conmim.conmim_loss(keys, keys, mask, tau=0.05).item() < 1e-6
    assert conmim.conmim_loss(keys.roll(1, dims=1), keys, mask, tau=0.05).item() > 10
    # the other image's patches are not in the dictionary: swapping images changes nothing here
    assert conmim.conmim_loss(keys.flip(0), keys, mask, tau=0.05).item() < 1e-6


def test_masked_pixels_are_invisible_and_gradients_stay_out_of_the_slow_model():
    model = small_conmim()
    imgs, strong = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    mask = conmim.unit_mask(4, (8, 8), 2, 0.75)
    loss, _ = model(imgs, strong, mask)
    # change the pixels of one masked patch: the online model never sees them
    b, j = 0, int(mask[0].nonzero()[0])
    r, c = divmod(j, 8)
    changed = imgs.clone()
    changed[b, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4] += 5.0
    assert model(changed, strong, mask)[0].item() == pytest.approx(loss.item(), abs=1e-6)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.slow_parameters())
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.encoder.parameters() if p.requires_grad)


def test_ema_math_and_schedule():
    model = small_conmim()
    with torch.no_grad():
        for p in model.encoder.parameters():
            if p.requires_grad:
                p.add_(1.0)
    online = [p.clone() for p in list(model.encoder.parameters()) + list(model.projector.parameters())]
    model.momentum_update(1.0)
    assert not all(torch.equal(t, o) for t, o in zip(model.slow_parameters(), online))
    model.momentum_update(0.0)
    assert all(torch.equal(t, o) for t, o in zip(model.slow_parameters(), online))
    assert conmim.momentum_at(0.0, 0.996) == pytest.approx(0.996) and conmim.momentum_at(1.0, 0.996) == 1.0
