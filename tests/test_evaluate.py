"""evaluate.py: the weighted kNN vote by hand, the linear probe, and which weights get loaded."""
import math

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
