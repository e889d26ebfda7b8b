"""MoCo v3: InfoNCE by hand with 2 tau, no gradient into the momentum encoder, the momentum update,
the momentum schedule, and the frozen patch embedding."""
import math

import pytest
import torch
from conftest import cosine

import moco
from vit import ViT


def small_moco():
    torch.manual_seed(0)
    return moco.MoCo(ViT(img_size=32, patch_size=4, dim=32, depth=1, heads=2), proj_dim=16, mlp_dim=32, tau=0.2)


def test_contrastive_loss_equals_hand_computation():
    torch.manual_seed(0)
    q, k, tau = torch.randn(3, 4), torch.randn(3, 4), 0.2
    total = 0.0
    for i in range(3):
        logits = [cosine(q[i].tolist(), k[j].tolist()) / tau for j in range(3)]
        total += -logits[i] + math.log(sum(math.exp(l) for l in logits))  # CE with the own index as label
    expected = 2 * tau * total / 3
    assert moco.contrastive_loss(q, k, tau).item() == pytest.approx(expected, rel=1e-5)
    q1, q2, k1, k2 = (torch.randn(5, 4) for _ in range(4))
    assert moco.moco_loss(q1, q2, k1, k2, tau).item() == pytest.approx(
        moco.contrastive_loss(q1, k2, tau).item() + moco.contrastive_loss(q2, k1, tau).item(), rel=1e-6)


def test_loss_is_small_when_each_query_matches_its_key():
    keys = torch.eye(4)
    assert moco.contrastive_loss(keys * 3, keys, tau=0.05).item() < 1e-6
    assert moco.contrastive_loss(keys, keys.roll(1, dims=0), tau=0.05).item() > 1.0


def test_no_gradient_reaches_the_momentum_encoder():
    model = small_moco()
    loss, (q1, q2, k1, k2) = model(torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32))
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.momentum_parameters())
    assert all(p.grad is not None for p in model.encoder.parameters() if p.requires_grad)
    assert q1.shape == q2.shape == k1.shape == k2.shape == (8, 16) and not k1.requires_grad


def test_momentum_update_math():
    model = small_moco()
    with torch.no_grad():
        for p in model.encoder.parameters():
            if p.requires_grad:
                p.add_(1.0)  # make the trained online weights differ from the momentum copy
    online = [p.clone() for p in list(model.encoder.parameters()) + list(model.projector.parameters())]
    trained = [p.requires_grad for p in list(model.encoder.parameters()) + list(model.projector.parameters())]
    before = [p.clone() for p in model.momentum_parameters()]
    assert len(online) == len(before) and not all(trained)  # the sin-cos table is not trained
    model.momentum_update(1.0)  # m = 1: the momentum encoder stays as it was
    assert all(torch.equal(a, b) for a, b in zip(before, model.momentum_parameters()))
    model.momentum_update(0.9)  # m = 0.9: 0.9 old + 0.1 online
    for t, b, o, tr in zip(model.momentum_parameters(), before, online, trained):
        assert torch.allclose(t, 0.9 * b + 0.1 * o) if tr else torch.equal(t, b)
    model.momentum_update(0.0)  # m = 0: a copy of the online weights
    assert all(torch.equal(t, o) for t, o in zip(model.momentum_parameters(), online))


def test_momentum_schedule():
    assert moco.momentum_at(0.0, 0.99) == pytest.approx(0.99)
    assert moco.momentum_at(0.5, 0.99) == pytest.approx(0.995)
    assert moco.momentum_at(1.0, 0.99) == pytest.approx(1.0)


def test_weight_decay_on_every_trainable_parameter():
    model = small_moco()
    (group,) = moco.param_groups(model, 0.1)
    assert group["weight_decay"] == 0.1
    assert len(group["params"]) == sum(p.requires_grad for p in model.parameters())
    assert any(p.ndim == 1 for p in group["params"])  # norms and biases too, as the official code


@pytest.mark.parametrize("freeze", [True, False])
def test_frozen_patch_embedding_stays_fixed(tmp_path, freeze):
    args = moco.Args(data="fake", device="cpu", model_dims="32,1,2", mlp_dim=32, proj_dim=16, batch_size=16,
                     steps=3, blr=1e-2, warmup_epochs=0, num_workers=0, out_dir=str(tmp_path), run_name="f",
                     freeze_patch_embed=freeze)
    ckpt = torch.load(moco.train(args), weights_only=True)
    moco.apply_recipe(args)
    torch.manual_seed(args.seed)  # the same initialisation as train()
    initial = moco.build_encoder(args).state_dict()
    trained, target = ckpt["encoder"], ckpt["target_encoder"]
    assert not torch.equal(trained["blocks.0.attn.qkv.weight"], initial["blocks.0.attn.qkv.weight"])
    for key in ("patch_embed.proj.weight", "patch_embed.proj.bias"):
        assert torch.equal(trained[key], initial[key]) == freeze
    assert torch.equal(target["patch_embed.proj.weight"], initial["patch_embed.proj.weight"]) == freeze
