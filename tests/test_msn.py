"""MSN: patch dropping and focal views, the position table, sharpening, Sinkhorn marginals, the loss
by hand, no gradient into the target encoder, the EMA math, and the ImageNet recipe on 224-px images."""
import math
import os

import pytest
import torch
from conftest import cosine
from PIL import Image

import msn
from vit import ViT


def small_msn(**kw):
    torch.manual_seed(0)
    encoder = ViT(img_size=32, patch_size=4, dim=32, depth=1, heads=2, pos_embed="learnable")
    return msn.MSN(encoder, **{**dict(hidden_dim=32, proj_dim=16, num_prototypes=8), **kw})


def test_patch_drop_keeps_the_right_tokens():
    B, N = 4, 64
    x = torch.arange(N, dtype=torch.float).view(1, N, 1).expand(B, N, 3)   # token value = its index
    kept = msn.patch_drop(x, 0.15)
    assert kept.shape == (B, int(N * 0.85), 3)                             # 54 of 64
    for b in range(B):
        ids = kept[b, :, 0]
        assert torch.equal(ids, ids.sort().values) and len(ids.unique()) == len(ids)  # a subset, in order
        assert torch.equal(kept[b, :, 1], ids)                               # whole tokens move together
    assert not torch.equal(kept[0], kept[1])                                 # per-sample masks


def test_views_and_focal_anchors_use_an_interpolated_position_table():
    args = msn.Args(img_size=32, patch_size=4, focal_size=16, focal_views=10)
    crops, params = msn.train_transform(args)(Image.new("RGB", (40, 40), (120, 30, 200)))
    assert params.shape == (12, 13)
    out = [v[0] for v in msn.device_views(([c[None] for c in crops], params[None]), args)]
    assert len(out) == 12 and out[0].shape == out[1].shape == (3, 32, 32)
    assert all(v.shape == (3, 16, 16) for v in out[2:])
    model = small_msn()
    assert model.encoder.interpolate_pos_embed(8, 8) is model.encoder.pos_embed  # same grid: unchanged
    assert model.encoder.interpolate_pos_embed(4, 4).shape == (1, 17, 32)        # the 4x4 focal grid
    z, z_plus = model(out[0][None].repeat(4, 1, 1, 1), out[1][None].repeat(4, 1, 1, 1),
                      *[v[None].repeat(4, 1, 1, 1) for v in out[2:]])
    assert z.shape == (11 * 4, 16) and z_plus.shape == (4, 16)


def test_sharpening_is_a_softmax_at_tau_times_T():
    torch.manual_seed(0)
    z, q, tau, T = torch.randn(5, 8), torch.randn(6, 8), 0.1, 0.25
    p = msn.msn_predictions(z, q, tau).exp()
    sharpened = p ** (1 / T) / (p ** (1 / T)).sum(dim=1, keepdim=True)      # the official sharpen()
    assert torch.allclose(sharpened, msn.msn_predictions(z, q, tau * T).exp(), atol=1e-5)


def test_sinkhorn_marginals():
    torch.manual_seed(0)
    B, K = 64, 16
    P = torch.softmax(torch.randn(B, K) * 3, dim=1)
    Q = msn.sinkhorn(P)
    assert torch.allclose(Q.sum(dim=1), torch.ones(B), atol=1e-5)            # every sample: 1
    before = (P.sum(dim=0) - B / K).abs().max()
    assert (Q.sum(dim=0) - B / K).abs().max() < 0.2 * before                 # prototypes: close to B/K
    assert torch.allclose(msn.sinkhorn(P, iterations=200).sum(dim=0), torch.full((K,), B / K), atol=1e-3)


def test_loss_equals_hand_computation():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])        # K = 3 prototypes
    z_plus = torch.tensor([[1.0, 1.0]])                              # B = 1 target
    z = torch.tensor([[2.0, 0.0], [0.0, -1.0]])                      # M = 2 anchors
    tau, T, lam = 0.5, 0.5, 0.7
    softmax = lambda s: [math.exp(v) / sum(math.exp(u) for u in s) for v in s]
    p = [softmax([cosine(zm, qk) / tau for qk in q.tolist()]) for zm in z.tolist()]
    p_plus = softmax([cosine(z_plus[0].tolist(), qk) / (tau * T) for qk in q.tolist()])
    ce = sum(-sum(pp * math.log(pk) for pp, pk in zip(p_plus, pm)) for pm in p) / 2
    p_bar = [(p[0][k] + p[1][k]) / 2 for k in range(3)]
    entropy = -sum(v * math.log(v) for v in p_bar)
    loss, ce_out, h_out = msn.msn_loss(z, z_plus, q, tau, T, lam, use_sinkhorn=False)
    assert ce_out.item() == pytest.approx(ce, rel=1e-5) and h_out.item() == pytest.approx(entropy, rel=1e-5)
    assert loss.item() == pytest.approx(ce - lam * entropy, rel=1e-5)


def test_gradients_reach_anchors_and_prototypes_but_not_the_target():
    model = small_msn()
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)] + [torch.randn(4, 3, 16, 16) for _ in range(3)]
    z, z_plus = model(*views)
    loss, _, _ = msn.msn_loss(z, z_plus, model.prototypes)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.target_parameters())
    assert model.prototypes.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.encoder.parameters() if p.requires_grad)
    assert model.encoder.pos_embed.requires_grad and model.encoder.pos_embed.grad.abs().sum() > 0


def test_ema_math():
    model = small_msn()
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    online = [p.clone() for p in list(model.encoder.parameters()) + list(model.head.parameters())]
    before = [p.clone() for p in model.target_parameters()]
    model.momentum_update(1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.target_parameters()))
    model.momentum_update(0.75)
    assert all(torch.allclose(t, 0.75 * b + 0.25 * o) for t, b, o in zip(model.target_parameters(), before, online))
    model.momentum_update(0.0)
    assert all(torch.equal(t, o) for t, o in zip(model.target_parameters(), online))


def test_optimizer_groups_and_weight_decay_schedule(tmp_path):
    model = small_msn()
    groups = msn.param_groups(model, 0.04)
    assert groups[2]["params"] == [model.prototypes] and groups[2]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
    args = msn.Args(data="fake", device="cpu", model_dims="32,1,2", hidden_dim=32, num_prototypes=8, focal_views=2,
                    batch_size=16, steps=4, num_workers=0, out_dir=str(tmp_path), run_name="wd")
    ckpt = torch.load(msn.train(args), weights_only=True)
    wd = ckpt["optimizer"]["param_groups"][0]["weight_decay"]
    h = (4 / 4) / 1.25  # the last step (3 of 0..3) ran at the schedule's step 4 (one ahead, as officially), 1.25x horizon
    assert wd == pytest.approx(0.4 + (0.04 - 0.4) * 0.5 * (1 + math.cos(math.pi * h)))
    assert ckpt["default_encoder"] == "target" and "target_encoder" in ckpt


def test_imagenet_recipe_on_a_folder_of_224px_images(tmp_path, cli):
    folder = tmp_path / "big" / "train" / "things"
    os.makedirs(folder)
    for i in range(4):
        Image.new("RGB", (256, 224), (40 * i, 90, 160)).save(folder / f"{i}.jpg")
    out = cli("msn.py", "--data", str(tmp_path / "big"), "--device", "cpu", "--model-dims", "32,1,2", "--batch-size",
              "4", "--steps", "1", "--focal-views", "2", "--hidden-dim", "32", "--num-prototypes", "8", "--recipe", "imagenet",
              "--num-workers", "0", "--out-dir", str(tmp_path), "--run-name", "run").stdout
    assert "recipe imagenet" in out and "/16 at 224 px" in out
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["encoder_config"]["img_size"] == 224 and ckpt["args"]["focal_size"] == 96
