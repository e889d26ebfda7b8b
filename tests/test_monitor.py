"""Issue #24: every method learns on a laptop. `--recipe auto` picks the CPU recipe when the run's device is the
CPU, and every run logs a kNN accuracy (evaluate.py's vote, on fixed subsets) at step 0, after every epoch and
at the end, the same number evaluate.py gives for those images and weights. (The learning itself is measured
in README.md, not here: no learning run inside the tests.)"""
import importlib
import json
import os

import pytest

import evaluate
import mae

METHODS = ["mae", "msn", "cmae", "conmim", "simsiam", "moco", "grafting"]


@pytest.mark.parametrize("method", METHODS)
def test_recipe_auto_on_the_cpu_is_the_cpu_recipe(method, capsys):
    module = importlib.import_module(method)
    args = module.Args(data="fake", device="cpu")
    assert module.apply_recipe(args) == "cpu"
    assert "recipe auto: no GPU -> cpu" in capsys.readouterr().out
    for name, value in module.RECIPES["cpu"].items():  # every field of the CPU recipe is applied
        assert getattr(args, name) == value, name
    assert args.img_size == 32 and args.epochs is None and args.images <= 250_000  # sized in images seen (#31)
    gpu = module.Args(data="fake", device="cuda")  # a GPU keeps the recipe chosen from the images
    assert module.apply_recipe(gpu) == "cifar10"
    explicit = module.Args(data="fake", device="cpu", recipe="cifar10")  # and so does an explicit recipe
    assert module.apply_recipe(explicit) == "cifar10"


def knn_log(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if "knn" in r]


TINY = dict(data="fake", device="cpu", model_dims="32,1,2", decoder_dim=32, decoder_depth=1, decoder_heads=2,
            batch_size=100, epochs=2, warmup_epochs=0.5, num_workers=0, knn_train=300, knn_val=100, vis_every=0)


def test_the_monitor_logs_step_0_every_epoch_and_equals_evaluate(tmp_path, capsys):
    import torch
    ckpt = mae.train(mae.Args(out_dir=str(tmp_path), run_name="m", **TINY))  # 10 steps an epoch
    logged = knn_log(tmp_path / "m")
    assert [r["step"] for r in logged] == [0, 10, 20] and all(0 <= r["knn"] <= 100 for r in logged)
    assert all(r["minutes"] >= 0 for r in logged) and (tmp_path / "m" / "curves.png").is_file()
    capsys.readouterr()
    result = evaluate.evaluate(evaluate.Args(ckpt=ckpt, data="fake", device="cpu", protocols="knn", num_workers=0,
                                             max_train_images=300, max_val_images=100))
    assert result["n_train"] == 300 and result["n_val"] == 100
    assert result["knn_top1"] == pytest.approx(logged[-1]["knn"], abs=1e-4)
    # the checkpoint records what the run cost (issue #23), and evaluate.py prints it beside the accuracy
    cost = torch.load(ckpt, weights_only=True)["efficiency"]
    assert cost["steps"] == 20 and cost["images_seen"] == 2000 and cost["devices"] == 1 and cost["device"] == "CPU"
    assert cost["seconds"] > 0 and cost["device_hours"] == pytest.approx(cost["seconds"] / 3600)
    assert cost["img_per_s"] == pytest.approx(2000 / cost["seconds"]) and cost["peak_memory_gib"] > 0
    assert "training cost: 20 steps, 2,000 images" in capsys.readouterr().out


def test_the_monitor_reads_the_encoder_evaluate_reads_by_default(tmp_path):
    """MSN's default is its target (EMA) encoder: the monitor must score that one, not the online one."""
    import msn
    args = dict(TINY, hidden_dim=32, proj_dim=16, num_prototypes=8, focal_views=1, epochs=1)
    for name in ("decoder_dim", "decoder_depth", "decoder_heads", "vis_every"):
        args.pop(name)
    ckpt = msn.train(msn.Args(out_dir=str(tmp_path), run_name="t", blr=0.5, **args))
    logged = knn_log(tmp_path / "t")[-1]["knn"]
    target = evaluate.evaluate(evaluate.Args(ckpt=ckpt, data="fake", device="cpu", protocols="knn", num_workers=0,
                                             max_train_images=300, max_val_images=100))
    assert target["encoder"] == "target" and target["knn_top1"] == pytest.approx(logged, abs=1e-4)


def test_the_monitor_continues_after_resume_and_can_be_turned_off(tmp_path):
    ckpt = mae.train(mae.Args(out_dir=str(tmp_path), run_name="r", stop_after=15, **TINY))
    assert [r["step"] for r in knn_log(tmp_path / "r")] == [0, 10]
    mae.train(mae.Args(resume=ckpt, device="cpu", num_workers=0))
    assert [r["step"] for r in knn_log(tmp_path / "r")] == [0, 10, 20]
    mae.train(mae.Args(out_dir=str(tmp_path), run_name="off", **dict(TINY, knn_every=0)))
    assert knn_log(tmp_path / "off") == [] and (tmp_path / "off" / "curves.png").is_file()  # the losses (#29)


def test_the_monitor_is_off_without_labels_or_a_val_split(tmp_path, capsys):
    from PIL import Image
    os.makedirs(tmp_path / "flat")
    for i in range(8):
        Image.new("RGB", (32, 32), (i * 30, 0, 0)).save(tmp_path / "flat" / f"{i}.png")
    mae.train(mae.Args(**dict(TINY, data=str(tmp_path / "flat"), batch_size=4, epochs=1, out_dir=str(tmp_path),
                              run_name="u")))
    assert "kNN monitor off:" in capsys.readouterr().out and knn_log(tmp_path / "u") == []
