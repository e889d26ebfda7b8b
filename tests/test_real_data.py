"""On the real CIFAR-10 JPEGs, when present (.ci/run sets CIFAR10_JPEG_DIR): a short mae.py run
whose loss falls, then evaluate.py well above chance (10%) on the 10,000 test images."""
import json
import os

import pytest

DATA = os.environ.get("CIFAR10_JPEG_DIR", "")
pytestmark = pytest.mark.skipif(not os.path.isdir(os.path.join(DATA, "train")),
                                reason="set CIFAR10_JPEG_DIR to the extracted CIFAR-10 JPEG folder")


def test_mae_on_real_cifar10_then_evaluate(tmp_path, cli):
    cli("mae.py", "--data", DATA, "--device", "cpu", "--model-dims", "64,2,4", "--decoder-dim", "64",
        "--decoder-depth", "1", "--batch-size", "64", "--steps", "60", "--blr", "2e-3", "--warmup-epochs", "1",
        "--epochs", "10", "--log-every", "10", "--num-workers", "2", "--vis-every", "0", "--knn-every", "0",
        "--out-dir", str(tmp_path), "--run-name", "real")
    log = [r for r in map(json.loads, open(tmp_path / "real" / "log.jsonl")) if "train/loss" in r]
    assert log[-1]["train/loss"] < 0.8 * log[0]["train/loss"], [r["train/loss"] for r in log]
    cli("evaluate.py", "--ckpt", str(tmp_path / "real" / "checkpoint.pt"), "--data", DATA, "--device", "cpu",
        "--protocols", "knn", "--max-train-images", "5000", "--num-workers", "2")
    result = json.loads((tmp_path / "real" / "eval-online-cls-cifar10-5000xall.json").read_text())
    assert result["n_val"] == 10000 and result["knn_top1"] > 20.0
