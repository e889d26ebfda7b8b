"""Issue #23: evaluate.py's protocols as the official code runs them (MSN's few-shot read-out and preprocessing,
MAE's fine-tuning of the position table, MAE's LARS linear probe), and the evaluations seed 004 names that were
missing: the pretext task on held-out images, robustness to corruptions, transfer, and what training cost."""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

import evaluate
from vit import ViT


# ---------------------------------------------------------------- few-shot, as MSN's logistic_eval.py
def test_cyanure_preprocessing_centres_each_row_then_l2_normalises():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 4.0, 10.0]])
    by_hand = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, -2.0, 4.0]])  # each row minus its own mean (2 and 6)
    by_hand = by_hand / by_hand.norm(dim=1, keepdim=True)
    assert torch.allclose(evaluate.cyanure_preprocess(x), by_hand)
    # a row's result is its own: no statistic of the other rows (the old protocol subtracted the set's mean)
    assert torch.allclose(evaluate.cyanure_preprocess(x[1:]), by_hand[1:])


def test_few_shot_preprocesses_labelled_and_test_features_separately():
    g = torch.Generator().manual_seed(0)
    train_f, test_f = torch.randn(40, 8, generator=g), torch.randn(30, 8, generator=g)
    train_y, test_y = torch.arange(40) % 4, torch.arange(30) % 4
    idx = torch.arange(0, 40, 2)
    acc = evaluate.few_shot(train_f, train_y, test_f, test_y, subset_indices=[idx], lam=2.5e-4, iters=100)[0]
    x = train_f[idx] - train_f[idx].mean(dim=1, keepdim=True)
    W = evaluate.logistic_regression(x / x.norm(dim=1, keepdim=True), train_y[idx], 4, 2.5e-4 / len(idx), 100)
    q = test_f - test_f.mean(dim=1, keepdim=True)
    by_hand = 100.0 * ((q / q.norm(dim=1, keepdim=True) @ W).argmax(dim=1) == test_y).float().mean().item()
    assert acc == pytest.approx(by_hand)
    # shifting every test feature by its own constant changes nothing: rows are centred on their own mean
    shifted = test_f + torch.randn(30, 1, generator=g) * 5
    assert evaluate.few_shot(train_f, train_y, shifted, test_y, subset_indices=[idx], iters=100)[0] == pytest.approx(acc)


def test_cls_prenorm_is_the_last_blocks_cls_before_the_final_norm():
    torch.manual_seed(0)
    vit = ViT(img_size=32, patch_size=4, dim=32, depth=2, heads=2).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tokens = vit.embed(x)
        h = torch.cat([(vit.cls_token + vit.pos_embed[:, :1]).expand(3, -1, -1), tokens], dim=1)
        for block in vit.blocks:
            h = block(h)
        ours = evaluate.read_out(vit, x, "cls-prenorm")
        assert torch.allclose(ours, h[:, 0], atol=1e-6)
        assert not torch.allclose(ours, evaluate.read_out(vit, x, "cls"), atol=1e-3)  # the final norm is skipped


def test_msn_subset_lists_pick_the_named_training_images(tmp_path):
    from PIL import Image
    for c in ("n01", "n02"):
        (tmp_path / "d" / "train" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8)).save(tmp_path / "d" / "train" / c / f"{c}_{i}.JPEG")
    for split in ("a", "b"):
        (tmp_path / split).mkdir()
    (tmp_path / "a" / "1imgs_class.txt").write_text("n01_2.JPEG\nn02_0.JPEG\n")
    (tmp_path / "b" / "1imgs_class.txt").write_text("n01_0.JPEG\nn02_1.JPEG\n")
    train = evaluate.ImageFiles(str(tmp_path / "d" / "train"))
    args = evaluate.Args()
    groups = evaluate.msn_subsets([str(tmp_path / "a" / "1imgs_class.txt"), str(tmp_path / "b" / "1imgs_class.txt")],
                                  train, args)
    assert list(groups) == ["1imgs_class"] and [g.tolist() for g in groups["1imgs_class"]] == [[2, 3], [0, 4]]
    (tmp_path / "a" / "bad.txt").write_text("n03_9.JPEG\n")
    with pytest.raises(evaluate.DataError, match="1 of its 1 images are not in the training set"):
        evaluate.msn_subsets([str(tmp_path / "a" / "bad.txt")], train, args)


# ---------------------------------------------------------------- fine-tuning and the linear probe
def test_fine_tuning_trains_the_position_table_of_a_sincos_checkpoint(tmp_path):
    torch.manual_seed(0)
    vit = ViT(img_size=32, patch_size=4, dim=32, depth=1, heads=2)
    assert not vit.pos_embed.requires_grad  # a fixed sin-cos table in pre-training
    ckpt = tmp_path / "c.pt"
    torch.save({"method": "mae", "step": 1, "encoder": vit.state_dict(), "encoder_config": vit.config}, ckpt)
    evaluate.evaluate(evaluate.Args(ckpt=str(ckpt), data="fake", device="cpu", num_workers=0, protocols="finetune",
                                    finetune_epochs=1, finetune_batch_size=32, max_train_images=64,
                                    finetune_warmup_epochs=0))
    tuned = torch.load(tmp_path / "eval-online-cls-fake-64xall-finetune.pt", weights_only=True)["model"]["encoder.pos_embed"]
    assert not torch.allclose(tuned, vit.pos_embed.detach())  # loaded from the checkpoint, then trained (MAE)


def test_one_lars_step_equals_the_update_by_hand():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # |w| = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    w.grad, b.grad = torch.tensor([[0.6, 0.8]]), torch.tensor([0.5])
    opt = evaluate.LARS([w, b], lr=0.1, weight_decay=0.2, momentum=0.9, trust_coefficient=0.001)
    opt.step()
    g = torch.tensor([[0.6, 0.8]]) + 0.2 * torch.tensor([[3.0, 4.0]])  # g + wd w = [1.2, 1.6], |.| = 2
    step = g * (0.001 * 5 / 2)                                           # x trust ratio eta |w| / |g'|
    assert torch.allclose(w.detach(), torch.tensor([[3.0, 4.0]]) - 0.1 * step)
    assert torch.allclose(b.detach(), torch.tensor([1.0 - 0.1 * 0.5]))  # 1-D: plain momentum SGD, no decay
    w.grad, b.grad = torch.zeros(1, 2), torch.zeros(1)
    opt.param_groups[0]["weight_decay"] = 0.0
    before = w.detach().clone()
    opt.step()  # no gradient, no decay: only the momentum buffer moves it, mu = 0.9 mu
    assert torch.allclose(w.detach(), before - 0.1 * 0.9 * step)


def test_official_linear_probe_runs_and_reports_last_and_best(tmp_path):
    torch.manual_seed(0)
    vit = ViT(img_size=32, patch_size=4, dim=32, depth=1, heads=2)
    ckpt = tmp_path / "c.pt"
    torch.save({"method": "mae", "step": 1, "encoder": vit.state_dict(), "encoder_config": vit.config}, ckpt)
    r = evaluate.evaluate(evaluate.Args(ckpt=str(ckpt), data="fake", device="cpu", num_workers=0, protocols="linear",
                                        linear_recipe="official", linear_epochs=2, linear_batch_size=128,
                                        batch_size=64, max_train_images=256))
    assert 0 <= r["linear_top1"] <= r["linear_top1_best_on_val"] <= 100 and r["linear_recipe"].startswith("official")


# ---------------------------------------------------------------- robustness
@pytest.mark.parametrize("name", evaluate.CORRUPTIONS)
def test_a_corruption_at_severity_0_is_the_identity_and_grows_with_severity(name):
    g = torch.Generator().manual_seed(0)
    y, x = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    img = torch.stack([x, y, (x * 7).sin() * 0.4 + 0.5]) * 0.8 + 0.1 * torch.rand(3, 32, 32, generator=g)
    assert torch.equal(evaluate.corrupt(img, name, 0), img)
    distances = []
    for s in range(1, 6):
        torch.manual_seed(0)  # the noise: the same draw at every severity
        out = evaluate.corrupt(img, name, s)
        assert out.shape == img.shape and out.min() >= 0 and out.max() <= 1
        distances.append((out - img).abs().mean().item())
    assert distances[0] > 0 and all(a < b for a, b in zip(distances, distances[1:])), distances


def test_robustness_and_transfer_protocols_report_every_corruption(tmp_path):
    torch.manual_seed(0)
    vit = ViT(img_size=32, patch_size=4, dim=32, depth=1, heads=2)
    ckpt = tmp_path / "c.pt"
    torch.save({"method": "mae", "step": 1, "encoder": vit.state_dict(), "encoder_config": vit.config}, ckpt)
    r = evaluate.evaluate(evaluate.Args(ckpt=str(ckpt), data="fake", device="cpu", num_workers=0, linear_epochs=5,
                                        protocols="robustness", corruptions="contrast,jpeg", transfer_data=("fake",)))
    rob = r["robustness"]
    assert set(rob) >= {"clean", "contrast", "jpeg", "relative_knn", "relative_linear"}
    assert len(rob["jpeg"]["knn"]) == 5 and all(0 <= a <= 100 for a in rob["contrast"]["linear"])
    assert rob["mean_knn"] == pytest.approx(sum(rob["contrast"]["knn"] + rob["jpeg"]["knn"]) / 10)
    assert r["transfer"]["fake"]["knn_top1"] == pytest.approx(rob["clean"]["knn"])  # the same data: the same kNN


# ---------------------------------------------------------------- the pretext task
SMALL = {
    "mae": dict(decoder_dim=32, decoder_depth=1, decoder_heads=2),
    "msn": dict(hidden_dim=32, proj_dim=16, num_prototypes=8, focal_views=1),
    "cmae": dict(decoder_dim=32, decoder_depth=1, decoder_heads=2, proj_hidden=32, proj_dim=16),
    "conmim": dict(mlp_dim=32, proj_dim=16),
    "simsiam": dict(proj_dim=32, pred_dim=8),
    "moco": dict(mlp_dim=32, proj_dim=16),
    "grafting": dict(mode="mtl", mlp_dim=32, proj_dim=16, decoder_dim=32, decoder_depth=1, decoder_heads=2),
}
STEP_ARGS = {"mae": (), "cmae": (), "msn": (0.0,), "conmim": (0.0,), "simsiam": (0.0,), "moco": (1.0,),
             "grafting": (1.0,)}  # moco / grafting: progress 1 makes the momentum 1, so the keys do not move first


@pytest.mark.parametrize("method", list(SMALL))
def test_pretext_loss_equals_the_method_files_training_loss(method):
    """evaluate.py's pretext protocol calls the method's pretext_metrics(): on the same batch, views and masks
    (the same seed) its loss is the loss train_step() computes before it updates the weights."""
    module = importlib.import_module(method)
    args = module.Args(data="fake", device="cpu", model_dims="32,1,2", batch_size=8, num_workers=0, amp=False,
                       **SMALL[method])
    module.apply_recipe(args)
    torch.manual_seed(0)
    model = module.build_model(args)
    data = module.Augmented(module.build_dataset("fake", "val", 32), module.train_transform(args))
    views = module.device_views(module.collate([data[i][0] for i in range(8)]), args)
    torch.manual_seed(1)
    ours = module.pretext_metrics(model, views, args)["loss"]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    if method == "grafting":
        for group in optimizer.param_groups:
            group["lr_scale"] = 1.0
    if method == "msn":
        optimizer.param_groups[0]["scheduled_wd"] = False
    if method == "simsiam":
        optimizer.param_groups[0]["fixed_lr"] = False
    torch.manual_seed(1)
    theirs, _ = module.train_step(model, model, optimizer, views, 0.0, *STEP_ARGS[method], args)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-6)


def test_pretext_protocol_from_a_checkpoint(tmp_path):
    import moco
    ckpt = moco.train(moco.Args(data="fake", device="cpu", model_dims="32,1,2", batch_size=16, steps=2, num_workers=0,
                                knn_every=0, out_dir=str(tmp_path), run_name="m", mlp_dim=32, proj_dim=16))
    r = evaluate.evaluate(evaluate.Args(ckpt=ckpt, data="fake", device="cpu", num_workers=0, protocols="pretext",
                                        pretext_images=48))
    p = r["pretext"]
    assert p["images"] == 48 and p["loss"] > 0 and 0 <= p["positive_first_pct"] <= 100
    again = evaluate.evaluate(evaluate.Args(ckpt=ckpt, data="fake", device="cpu", num_workers=0, protocols="pretext",
                                            pretext_images=48))
    assert again["pretext"]["loss"] == p["loss"]  # fixed views and masks: the same number every time


def test_the_official_linear_probe_crops_as_maes_util_crop():
    """MAE's util/crop.py: one draw of area and aspect, width and height clamped to the image. On a 500 x 375 photograph
    the crops keep about 0.52 of the area on average; torchvision's 10 retries and centre-crop fallback give 0.43."""
    import torchvision.transforms as T
    from PIL import Image
    img, areas = Image.new("RGB", (500, 375)), {}
    torch.manual_seed(0)
    for cls in (evaluate.OneDrawResizedCrop, T.RandomResizedCrop):
        boxes = [cls.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(4000)]
        assert all(0 <= i <= 375 - h and 0 <= j <= 500 - w and h >= 1 and w >= 1 for i, j, h, w in boxes)
        areas[cls] = sum(h * w for _, _, h, w in boxes) / len(boxes) / (500 * 375)
    assert 0.49 < areas[evaluate.OneDrawResizedCrop] < 0.55 and areas[T.RandomResizedCrop] < 0.46
