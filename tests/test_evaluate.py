"""evaluate.py: the weighted kNN vote by hand, the linear probe, which weights get loaded, the few-shot
regression and its subsets, NMI / ARI by hand, k-means, layer decay, mixup / cutmix, t-SNE's optional
packages, published weights files, and fine-tuning with its resume."""
import argparse
import json
import math
import os
import sys

import pytest
import torch

import evaluate
from vit import ViT


def test_knn_vote_is_weighted_by_exp_similarity_over_T():
    # class 0: one neighbour very close to the query; class 1: two neighbours further away.
    train_f = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8], [-1.0, 0.0]])
    train_y = torch.tensor([0, 1, 1, 2])
    query = torch.tensor([[1.0, 0.0]])
    # k = 3 neighbours: similarities 1.0 (class 0), 0.6 and 0.6 (class 1).
    # T = 0.1: class 0 scores e^10 = 22026, class 1 scores 2 e^6 = 807 -> class 0 (a plain majority says 1)
    assert evaluate.knn_predict(train_f, train_y, query, k=3, T=0.1).tolist() == [0]
    # T = 10: e^0.1 = 1.105 against 2 e^0.06 = 2.124 -> class 1
    assert math.exp(0.1) < 2 * math.exp(0.06)
    assert evaluate.knn_predict(train_f, train_y, query, k=3, T=10.0).tolist() == [1]
    # features are L2-normalised first: scaling a training vector changes nothing
    assert evaluate.knn_predict(train_f * torch.tensor([[5.0], [1], [1], [1]]), train_y, query, k=3, T=0.1).tolist() == [0]
    # k = 1 is nearest-neighbour classification
    queries = torch.tensor([[0.7, 0.7], [-0.9, 0.1], [0.5, -0.9]])
    assert evaluate.knn_predict(train_f, train_y, queries, k=1, T=0.07).tolist() == [1, 2, 1]


def test_linear_probe_separates_separable_classes():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 16, generator=g) * 3
    y = torch.arange(1000) % 5
    x = centers[y] + torch.randn(1000, 16, generator=g) * 0.5 + 100.0  # a large offset: BN removes it
    acc = evaluate.linear_probe(x[:800], y[:800], x[800:], y[800:], epochs=20, batch_size=128)
    assert acc > 95.0
    # labels unrelated to the features: chance level
    shuffled = y[torch.randperm(1000, generator=g)]
    assert evaluate.linear_probe(x[:800], shuffled[:800], x[800:], shuffled[800:], epochs=20, batch_size=128) < 40.0


def test_load_encoder_picks_weights_and_random_init(tmp_path):
    vit = ViT(img_size=32, patch_size=4, dim=32, depth=1, heads=2)
    target = ViT(**vit.config)
    path = tmp_path / "c.pt"
    torch.save({"method": "msn", "step": 7, "encoder": vit.state_dict(), "target_encoder": target.state_dict(),
                "encoder_config": vit.config, "default_encoder": "target"}, path)
    enc, info = evaluate.load_encoder(str(path))  # the method's default: target
    assert info["encoder"] == "target" and torch.equal(enc.cls_token, target.cls_token)
    enc, info = evaluate.load_encoder(str(path), "online")
    assert torch.equal(enc.cls_token, vit.cls_token)
    enc, info = evaluate.load_encoder(str(path), "online", random_init=True, seed=3)
    assert info["random_init"] and not torch.equal(enc.cls_token, vit.cls_token)
    with pytest.raises(evaluate.DataError):
        evaluate.load_encoder(str(path), "teacher")


# ---------------------------------------------------------------- label efficiency, clustering, fine-tuning
def test_logistic_regression_separates_and_stops_at_the_optimum():
    g = torch.Generator().manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=1) * 3
    y = torch.arange(200) % 4
    x = centers[y] + 0.3 * torch.randn(200, 8, generator=g)
    W = evaluate.logistic_regression(x, y, 4, lam=1e-4)
    assert ((x @ W).argmax(dim=1) == y).all()
    # with a real penalty the optimum is where the gradient vanishes: X^T (P - Y) / n + lam W = 0
    lam = 0.1
    W = evaluate.logistic_regression(x, y, 4, lam=lam)
    grad = x.T @ (torch.softmax(x @ W, dim=1) - torch.nn.functional.one_hot(y, 4).float()) / len(x) + lam * W
    assert grad.abs().max() < 1e-4


def test_nmi_and_ari_equal_hand_computations():
    a, b = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 2])
    # H(a) = ln 2, H(b) = 1.5 ln 2, I(a; b) = ln 2 -> NMI = ln 2 / (1.25 ln 2) = 0.8
    assert evaluate.nmi(a, b) == pytest.approx(0.8)
    # sum C(n_ij, 2) = 1, A = 2, B = 1, E = A B / C(4, 2) = 1/3 -> ARI = (1 - 1/3) / (1.5 - 1/3) = 4/7
    assert evaluate.ari(a, b) == pytest.approx(4 / 7)
    perm = torch.tensor([2, 2, 0, 0, 1, 1])  # the same partition under other names
    truth = torch.tensor([0, 0, 1, 1, 2, 2])
    assert evaluate.nmi(perm, truth) == pytest.approx(1.0) and evaluate.ari(perm, truth) == pytest.approx(1.0)


def test_kmeans_recovers_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[5.0, 0.0], [0.0, 5.0], [-5.0, -5.0]])
    y = torch.arange(300) % 3
    x = centers[y] + torch.randn(300, 2, generator=g)
    clusters = evaluate.kmeans(x, 3, restarts=3, seed=0)
    assert evaluate.nmi(clusters, y) == pytest.approx(1.0) and evaluate.ari(clusters, y) == pytest.approx(1.0)


def test_subsets_hold_n_images_per_class_and_are_reproducible(tmp_path):
    labels = torch.arange(500) % 10
    for per_class in (1, 2, 5):
        idx = evaluate.saved_subset(str(tmp_path), f"{per_class}shot-0", labels, per_class=per_class, seed=0)
        assert torch.bincount(labels[idx], minlength=10).tolist() == [per_class] * 10
        assert len(set(idx.tolist())) == len(idx)
        assert torch.equal(idx, evaluate.class_subset(labels, per_class=per_class, seed=0))  # same seed, same draw
    assert not torch.equal(evaluate.class_subset(labels, 5, seed=0), evaluate.class_subset(labels, 5, seed=1))
    idx = evaluate.saved_subset(str(tmp_path), "10pct-0", labels, fraction=0.1, seed=0)
    assert torch.bincount(labels[idx]).tolist() == [5] * 10
    saved = json.loads((tmp_path / "10pct-0.json").read_text())
    saved["indices"][0] += 1  # edit the file: it is what gets used
    (tmp_path / "10pct-0.json").write_text(json.dumps(saved | {"labels": labels[saved["indices"]].tolist()}))
    assert evaluate.saved_subset(str(tmp_path), "10pct-0", labels, fraction=0.1)[0] == idx[0] + 1
    with pytest.raises(evaluate.DataError, match="does not match"):
        evaluate.saved_subset(str(tmp_path), "10pct-0", torch.arange(400) % 10, fraction=0.1)


def test_layer_decay_gives_each_block_its_lr():
    model = evaluate.Classifier(ViT(img_size=32, patch_size=4, dim=32, depth=3, heads=2), num_classes=10)
    groups = evaluate.layer_decay_groups(model, weight_decay=0.05, decay=0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    # L = 3: layer 0 (embeddings) 0.5^4, block i 0.5^(4 - i), head and fc_norm 1
    expected = {"encoder.patch_embed.proj.weight": 0.0625, "encoder.cls_token": 0.0625,
                "encoder.blocks.0.attn.qkv.weight": 0.125, "encoder.blocks.1.mlp.fc1.bias": 0.25,
                "encoder.blocks.2.norm1.weight": 0.5, "fc_norm.weight": 1.0, "head.weight": 1.0}
    for name, s in expected.items():
        assert scale[id(names[name])] == pytest.approx(s), name
    assert wd[id(names["head.weight"])] == 0.05 and wd[id(names["head.bias"])] == 0.0
    assert wd[id(names["encoder.cls_token"])] == 0.0
    assert id(names["encoder.norm.weight"]) not in scale  # unused with mean pooling
    assert len(scale) == sum(p.requires_grad for p in model.parameters())


def test_mixup_and_cutmix_targets_match_the_pixels():
    torch.manual_seed(0)
    x, y = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 3, 4, 5])
    mixed, targets, lam = evaluate.mix_batch(x, y, 10, mixup=0.8, cutmix=0.0, smoothing=0.1)
    assert torch.allclose(mixed, lam * x + (1 - lam) * x.flip(0))
    assert torch.allclose(targets.sum(dim=1), torch.ones(6))
    assert targets[0, 0].item() == pytest.approx(lam * 0.91 + (1 - lam) * 0.01)  # smoothed, then mixed
    for _ in range(5):
        mixed, targets, lam = evaluate.mix_batch(x, y, 10, mixup=0.0, cutmix=1.0, smoothing=0.0)
        kept = (mixed == x).all(dim=1).float().mean(dim=(1, 2))  # share of pixels still from the image itself
        assert torch.allclose(kept, torch.full((6,), lam)) and targets[0, 0].item() == pytest.approx(lam)
    _, targets, lam = evaluate.mix_batch(x, y, 10, mixup=0.0, cutmix=0.0, smoothing=0.0)
    assert lam == 1.0 and torch.equal(targets, torch.nn.functional.one_hot(y, 10).float())


def test_tsne_is_skipped_cleanly_without_its_packages(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn now raises ImportError
    out = evaluate.tsne_plot(torch.randn(50, 8), torch.arange(50) % 5, str(tmp_path / "t.png"), "t")
    assert out.startswith("skipped") and "pip install scikit-learn matplotlib" in out
    assert not (tmp_path / "t.png").exists()


def test_weights_files_load_with_their_prefixes(tmp_path):
    torch.manual_seed(0)
    vit, momentum = ViT(img_size=32, patch_size=4, dim=192, depth=2, heads=3), ViT(img_size=32, patch_size=4, dim=192, depth=2, heads=3)
    imgs = torch.randn(2, 3, 32, 32)
    mae_style = {"model": {**vit.state_dict(), "decoder_embed.weight": torch.zeros(1), "mask_token": torch.zeros(1)},
                 "args": argparse.Namespace(model="vit_base")}
    moco_style = {"state_dict": {**{f"module.base_encoder.{k}": v for k, v in vit.state_dict().items()},
                                 **{f"module.momentum_encoder.{k}": v for k, v in momentum.state_dict().items()},
                                 "module.base_encoder.head.weight": torch.zeros(3)}}
    for name, state in (("mae.pth", mae_style), ("moco.pth", moco_style)):
        torch.save(state, tmp_path / name)
        enc, info = evaluate.load_weights_file(str(tmp_path / name), img_size=32)
        assert info["encoder_config"]["heads"] == 3 and info["encoder_config"]["depth"] == 2
        enc.eval()
        assert torch.allclose(enc(imgs), vit.eval()(imgs), atol=1e-6)
    enc, info = evaluate.load_weights_file(str(tmp_path / "moco.pth"), which="target", img_size=32)
    assert torch.equal(enc.cls_token, momentum.cls_token)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(evaluate.DataError, match="cls_token"):
        evaluate.load_weights_file(str(tmp_path / "bad.pth"))


def test_finetune_smoke_run_and_its_resume_continue_the_same_run(tmp_path):
    vit = ViT(img_size=32, patch_size=4, dim=32, depth=2, heads=2)
    ckpt = tmp_path / "c.pt"
    torch.save({"method": "mae", "step": 1, "encoder": vit.state_dict(), "encoder_config": vit.config}, ckpt)
    common = dict(data="fake", device="cpu", num_workers=0, protocols="finetune", finetune_epochs=2,
                  finetune_batch_size=32, max_train_images=128, finetune_blr=1e-2, finetune_warmup_epochs=1)
    full = evaluate.evaluate(evaluate.Args(ckpt=str(ckpt), out=str(tmp_path / "full.json"), **common))
    assert 0 <= full["finetune_top1"] <= 100
    finished = torch.load(tmp_path / "eval-online-cls-fake-128xall-finetune.pt", weights_only=True)
    assert finished["step"] == 8
    os.remove(tmp_path / "eval-online-cls-fake-128xall-finetune.pt")
    part = evaluate.evaluate(evaluate.Args(ckpt=str(ckpt), stop_after=3, **common))
    assert part["finetune_top1"] is None
    assert torch.load(tmp_path / "eval-online-cls-fake-128xall-finetune.pt", weights_only=True)["step"] == 3
    resumed = evaluate.evaluate(evaluate.Args(ckpt=str(ckpt), resume=True, **common))
    again = torch.load(tmp_path / "eval-online-cls-fake-128xall-finetune.pt", weights_only=True)
    assert again["step"] == 8
    for k, v in finished["model"].items():
        assert torch.equal(again["model"][k], v), k  # bit-exact on the CPU
    assert resumed["finetune_top1"] == full["finetune_top1"]


def test_cli_protocol_all_side_by_side(tmp_path, cli):
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        vit = ViT(img_size=32, patch_size=4, dim=32, depth=1, heads=2)
        (tmp_path / name).mkdir()
        torch.save({"method": "mae" if name == "a" else "moco", "step": 5, "encoder": vit.state_dict(),
                    "encoder_config": vit.config}, tmp_path / name / "checkpoint.pt")
    out = cli("evaluate.py", "--ckpt", str(tmp_path / "a"), str(tmp_path / "b"), "--with-random-init",
              "--protocols", "all", "--data", "fake", "--device", "cpu", "--num-workers", "0", "--linear-epochs", "3",
              "--finetune-epochs", "1", "--finetune-batch-size", "64", "--max-train-images", "256",
              "--subsets-dir", str(tmp_path / "subsets"), "--out", str(tmp_path / "all.json"),
              "--corruptions", "contrast").stdout
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert len(table) == 4  # header + 3 encoders
    for column in ("kNN top-1", "linear top-1", "1-shot", "5-shot", "1%", "10%", "k-means NMI", "ARI", "fine-tune"):
        assert column in table[0], column
    assert "random init" in table[3] and "| mae |" in table[1] and "| moco |" in table[2]
    rows = json.loads((tmp_path / "all.json").read_text())
    assert len(rows) == 3 and (tmp_path / "all.md").read_text().count("\n") == 5
    assert all(len(r["fewshot_1shot"]["runs"]) == 3 and 0 <= r["kmeans_nmi"] <= 1 for r in rows)
    assert len(os.listdir(tmp_path / "subsets" / "fake-256")) == 15  # 5 settings x 3 subsets, shared by all rows
    assert rows[0]["tsne"].startswith(("skipped", str(tmp_path)))


def test_tsne_writes_a_png_when_its_packages_are_there(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 3
    feats = torch.eye(3)[labels] * 5 + torch.randn(60, 3, generator=g)
    out = evaluate.tsne_plot(feats, labels, str(tmp_path / "t.png"), "toy", points=60)
    assert out == str(tmp_path / "t.png")
    from PIL import Image
    with Image.open(out) as im:
        assert im.format == "PNG"


def test_feature_extraction_reports_progress_and_keeps_order(capsys):
    vit = ViT(img_size=32, patch_size=4, dim=32, depth=1, heads=2)
    images = torch.randn(10, 3, 32, 32)
    dataset = [(img, i) for i, img in enumerate(images)]
    feats, labels = evaluate.extract_features(vit, dataset, "cls", torch.device("cpu"), False, 4, 0, "train",
                                              progress_every=0.0)
    assert labels.tolist() == list(range(10))
    assert torch.allclose(feats, vit.eval()(images, pool="cls"), atol=1e-5)
    lines = capsys.readouterr().out.splitlines()  # after batches 1 and 2; the last batch ends the pass
    assert len(lines) == 2 and lines[0].startswith("features train: 4/10 images |") and "ETA 0:00:" in lines[0]
    assert lines[1].startswith("features train: 8/10 images")
