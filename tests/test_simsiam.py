"""SimSiam: the loss by hand, stop-gradient, the collapse monitor, the fixed predictor lr, the SGD recipe."""
import math

import pytest
import torch

import simsiam
from vit import ViT


def tiny_args(tmp_path, name, **kw):
    base = dict(data="fake", device="cpu", model_dims="32,1,2", proj_dim=64, pred_dim=16, batch_size=16,
                num_workers=0, out_dir=str(tmp_path), run_name=name, log_every=2)
    return simsiam.Args(**{**base, **kw})


def test_loss_equals_hand_computation():
    p = torch.randn(8, 32)
    assert simsiam.simsiam_loss(p, p, p, p).item() == pytest.approx(-1.0)  # p equals z: the minimum
    p1, z2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])  # cos = 1/sqrt(2)
    p2, z1 = torch.tensor([[0.0, 2.0]]), torch.tensor([[3.0, 0.0]])  # cos = 0
    assert simsiam.simsiam_loss(p1, p2, z1, z2).item() == pytest.approx(0.5 * -1 / math.sqrt(2) + 0.5 * 0.0)
    assert simsiam.D(torch.tensor([[1.0, 0.0]]), torch.tensor([[-2.0, 0.0]])).item() == pytest.approx(1.0)


def test_stop_gradient_on_z():
    p1, p2, z1, z2 = (torch.randn(4, 8, requires_grad=True) for _ in range(4))
    simsiam.simsiam_loss(p1, p2, z1, z2).backward()
    assert z1.grad is None and z2.grad is None  # sg(z): the target side receives no gradient
    assert p1.grad.abs().sum() > 0 and p2.grad.abs().sum() > 0


def test_gradients_reach_the_encoder_through_the_predictor():
    torch.manual_seed(0)
    model = simsiam.SimSiam(ViT(img_size=32, patch_size=4, dim=32, depth=1, heads=2), proj_dim=64, pred_dim=16)
    loss, z1 = model(torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32))
    loss.backward()
    assert -1 <= loss.item() <= 1 and z1.shape == (8, 64)
    for part in (model.encoder, model.projector, model.predictor):
        assert all(p.grad is not None for p in part.parameters() if p.requires_grad)


def test_collapse_monitor():
    assert simsiam.output_std(torch.ones(512, 128)).item() == pytest.approx(0.0, abs=1e-6)   # collapsed
    assert simsiam.output_std(torch.randn(4096, 128)).item() == pytest.approx(1.0, abs=0.05)  # spread out


def test_collapse_stops_the_run(tmp_path):
    # a threshold above the healthy value of ~1 makes the check fire right after warm-up
    with pytest.raises(simsiam.DataError, match="collapsed at step"):
        simsiam.train(tiny_args(tmp_path, "c", steps=6, collapse_std=5.0, warmup_epochs=0))


def test_predictor_keeps_the_peak_lr_and_groups_cover_every_parameter(tmp_path):
    path = simsiam.train(tiny_args(tmp_path, "lr", steps=4, blr=1e-3))
    ckpt = torch.load(path, weights_only=True)
    peak = 1e-3 * 16 / 256
    groups = ckpt["optimizer"]["param_groups"]
    assert all(g["lr"] == pytest.approx(peak) for g in groups if g["fixed_lr"])
    assert all(g["lr"] < peak for g in groups if not g["fixed_lr"])  # cosine-decayed by the last step
    model = simsiam.SimSiam(ViT(img_size=32, patch_size=4, dim=32, depth=1, heads=2), 64, 16)
    grouped = [p for g in simsiam.param_groups(model, 0.1) for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == sum(p.requires_grad for p in model.parameters())


def test_sgd_is_the_papers_recipe(tmp_path):
    path = simsiam.train(tiny_args(tmp_path, "sgd", steps=2, optimizer="sgd"))
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["args"]["blr"] == 0.05 and ckpt["args"]["weight_decay"] == 1e-4 and ckpt["args"]["warmup_epochs"] == 0
    assert all(g["momentum"] == 0.9 for g in ckpt["optimizer"]["param_groups"])
    assert all(g["weight_decay"] == 1e-4 for g in ckpt["optimizer"]["param_groups"])  # all parameters decayed
