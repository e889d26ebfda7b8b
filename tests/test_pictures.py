"""Issue #30: see what an encoder learned. evaluate.py's attention maps and nearest-neighbour retrievals for every
method's default weights, and the kNN monitors of several runs in one figure. (That the attention weights read out
reproduce the block's output is in tests/test_vit.py.)"""
import importlib
import json

import pytest
import torch

import evaluate
from test_laptop import tiny


@pytest.mark.parametrize("method", ["mae", "msn", "cmae", "conmim", "simsiam", "moco", "grafting"])
def test_attention_and_retrieval_pictures_for_each_methods_default_weights(method, tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image
    module = importlib.import_module(method)
    ckpt = module.train(tiny(module, tmp_path, "run", amp=False, compile=False))
    result = evaluate.evaluate(evaluate.Args(ckpt=ckpt, data="fake", device="cpu", protocols="attention,retrieval",
                                             num_workers=0, max_train_images=200, max_val_images=100))
    heads = torch.load(ckpt, weights_only=True)["encoder_config"]["heads"]
    attention, retrieval = result["attention"], result["retrieval"]
    assert result["encoder"] == torch.load(ckpt, weights_only=True)["default_encoder"]
    assert len(attention["entropy_per_head"]) == heads and all(0 < e <= 1 for e in attention["entropy_per_head"])
    for picture, cols in ((attention["picture"], 2 + heads), (retrieval["picture"], 1 + 5)):
        assert picture.startswith(str(tmp_path / "run")) and "fake-200x100" in picture  # next to the checkpoint
        with Image.open(picture) as im:  # 8 rows of images (8 classes), at least 96 px a tile
            assert im.width >= 96 * cols and im.height >= 96 * 8
    assert len(retrieval["queries"]) == 8 and [len(row) for row in retrieval["neighbours"]] == [5] * 8


def test_retrieval_shows_the_knn_protocols_nearest_neighbours(tmp_path, capsys):
    import mae
    ckpt = mae.train(tiny(mae, tmp_path, "run", amp=False, compile=False))
    args = evaluate.Args(ckpt=ckpt, data="fake", device="cpu", protocols="retrieval,knn", num_workers=0)
    result = evaluate.evaluate(args)
    encoder, _ = evaluate.load_encoder(ckpt)
    train, val = evaluate.labelled_splits("fake", 32)
    train_f, train_y = evaluate.extract_features(encoder, evaluate.Augmented(train, evaluate.eval_transform(32)), "cls",
                                                 torch.device("cpu"), False, 64, 0)
    val_f, val_y = evaluate.extract_features(encoder, evaluate.Augmented(val, evaluate.eval_transform(32)), "cls",
                                             torch.device("cpu"), False, 64, 0)
    queries = result["retrieval"]["queries"]
    assert sorted(set(val_y[queries].tolist())) == val_y[queries].tolist() and len(queries) == 8  # 8 classes, spread
    top_s, top_i = evaluate.nearest(train_f, val_f, 20)  # what the kNN protocol votes with (k = 20)
    assert result["retrieval"]["neighbours"] == top_i[queries, :5].tolist()  # the first 5 of the same neighbours
    same = (train_y[top_i[queries, :5]] == val_y[queries, None]).float().mean().item()
    assert result["retrieval"]["same_class_pct"] == pytest.approx(100 * same)
    knn = evaluate.knn_predict(train_f, train_y, val_f, 20, 0.07, 10)
    assert result["knn_top1"] == pytest.approx(100 * (knn == val_y).float().mean().item())
    assert f"retrieval: {100 * same:.1f}% of the 5 nearest training images have the query's class" in capsys.readouterr().out


def test_the_curves_of_several_runs_one_line_each_a_resumed_run_included(tmp_path, capsys):
    import mae
    import moco
    flags = dict(steps=12, knn_every=0.024, knn_train=200, knn_val=50, amp=False, compile=False)  # every 3 of 125 steps
    resumed = mae.train(tiny(mae, tmp_path, "resumed", stop_after=6, **flags))
    mae.train(mae.Args(resume=resumed, device="cpu", num_workers=0))
    other = moco.train(tiny(moco, tmp_path, "other", **flags))
    quiet = mae.train(tiny(mae, tmp_path, "quiet", steps=3))  # no monitor
    out = tmp_path / "cmp.json"
    drawn = evaluate.evaluate(evaluate.Args(ckpt=(resumed, other, quiet), data="fake", device="cpu", protocols="curves",
                                            out=str(out)))
    saved = json.loads((tmp_path / "cmp-curves.json").read_text())  # the numbers the figure was drawn from
    assert sorted(saved["runs"]) == ["mae: resumed", "moco: other"] and saved["without_monitor"] == ["mae: quiet"]
    steps = [round(images / 8) for _, images, _ in saved["runs"]["mae: resumed"]]
    assert steps == [0, 3, 6, 9, 12]  # one line across the resume: step 0, every 3 steps, the end
    minutes = [m for m, _, _ in saved["runs"]["mae: resumed"]]
    assert minutes == sorted(minutes)
    assert [list(p) for p in drawn["runs"]["moco: other"]] == saved["runs"]["moco: other"]
    assert "curves: no kNN monitor in the log of mae: quiet" in capsys.readouterr().out
    if importlib.util.find_spec("matplotlib"):
        assert drawn["picture"] == str(tmp_path / "cmp-curves.png") and (tmp_path / "cmp-curves.png").is_file()
