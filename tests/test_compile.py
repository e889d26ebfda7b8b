"""The GPU defaults, torch.compile and bf16 autocast, exercised on the CPU: `--compile --amp` asks for
them on any device. torch.compile uses the aot_eager backend here (Dynamo capture and AOTAutograd's
forward + backward graphs, run with eager kernels), so no C++ compiler is needed; what it checks is
what usually breaks: a graph break, a recompilation on the second step, a dtype clash under autocast.
(With the default inductor backend, on a machine with a C++ compiler, every method also compiles to
one graph; that takes 1 to 2 minutes per method on 2 cores, so it is not part of the suite.)"""
import functools
import importlib
import json

import pytest
import torch
from torch._dynamo.utils import counters

import evaluate
from test_cli import docstring_command

METHODS = ["mae", "simsiam", "moco", "msn", "cmae", "conmim", "grafting"]


@pytest.fixture
def aot_eager(monkeypatch):
    """torch.compile with the aot_eager backend and fresh Dynamo counters."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


def train_losses(module, argv, out_dir, name):
    module.train(module.parse_args([*argv, "--out-dir", str(out_dir), "--run-name", name]))
    return [r["train/loss"] for r in map(json.loads, open(out_dir / name / "log.jsonl")) if "train/loss" in r]


@pytest.mark.parametrize("method", METHODS)
def test_compiled_bf16_training_is_one_graph_and_matches_eager_fp32(tmp_path, aot_eager, method):
    module = importlib.import_module(method)
    argv = docstring_command(module, f"{method}.py --data fake")[1:]  # the docstring's smoke run, 3 steps
    argv[argv.index("--steps") + 1] = "3"
    if method == "grafting":  # the multi-task mode from scratch runs both losses and needs no MAE checkpoint
        i = argv.index("--mae-ckpt")
        argv[i:i + 2] = ["--mode", "mtl", "--model-dims", "64,3,4", "--decoder-dim", "32", "--decoder-depth", "1"]
    argv += ["--num-workers", "0", "--log-every", "1", "--knn-every", "0"]  # the monitor is tested on its own

    eager = train_losses(module, [*argv, "--no-compile", "--no-amp"], tmp_path, "eager")
    assert not aot_eager["stats"]  # --no-compile really compiles nothing
    compiled = train_losses(module, [*argv, "--compile", "--amp"], tmp_path, "compiled")
    assert aot_eager["stats"]["unique_graphs"] == 1  # the whole training forward in one graph, kept for step 2 and 3
    assert not aot_eager["graph_break"]
    assert compiled == pytest.approx(eager, rel=4e-3, abs=5e-3)  # bf16 rounding only (8-bit mantissa: 2^-8 = 0.4%)
    state = torch.load(tmp_path / "compiled" / "checkpoint.pt", weights_only=True)
    assert state["args"]["compile"] and state["args"]["amp"]
    assert not any("_orig_mod" in k for k in state["model"])  # saved from the uncompiled module


def test_compiled_fp32_training_is_bit_exact_with_eager(tmp_path, aot_eager):
    import mae
    argv = docstring_command(mae, "--data fake")[1:] + ["--num-workers", "0", "--log-every", "1"]
    argv[argv.index("--steps") + 1] = "3"
    eager = train_losses(mae, [*argv, "--no-compile", "--no-amp"], tmp_path, "eager")
    compiled = train_losses(mae, [*argv, "--compile", "--no-amp"], tmp_path, "compiled")
    assert compiled == eager  # same kernels, same random masks: compilation changes nothing


def test_compiled_bf16_finetuning(tmp_path, aot_eager):
    from vit import ViT
    vit = ViT(img_size=32, patch_size=4, dim=32, depth=2, heads=2)
    torch.save({"method": "mae", "step": 1, "encoder": vit.state_dict(), "encoder_config": vit.config}, tmp_path / "c.pt")
    common = dict(ckpt=str(tmp_path / "c.pt"), data="fake", device="cpu", num_workers=0, protocols="finetune",
                  finetune_epochs=1, finetune_batch_size=32, max_train_images=128, finetune_warmup_epochs=0)
    result = evaluate.evaluate(evaluate.Args(compile=True, amp=True, **common))
    assert 0 <= result["finetune_top1"] <= 100
    assert aot_eager["stats"]["unique_graphs"] >= 1 and not aot_eager["graph_break"]
