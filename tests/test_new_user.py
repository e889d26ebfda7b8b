"""Issue #22: what a new user hits. Each test reproduces one report: a closed pipe during Ctrl-C, flags out of
range, a resume with another number of processes or without --log-every, a run folder left without a checkpoint,
a full disk at start, Ctrl-C during start-up, a symbolic link into another class, no empty data folder after a
failed download, --help with each method's paper values, and no ETA from the compile window. (The torchrun run
of every method with pictures on is in tests/test_distributed.py.)"""
import errno
import importlib
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from PIL import Image

import mae

TINY = dict(device="cpu", model_dims="32,1,2", decoder_dim=32, decoder_depth=1, decoder_heads=2, batch_size=4,
            num_workers=0, vis_every=0, knn_every=0)


def steps_logged(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [r["step"] for r in map(json.loads, f) if "train/loss" in r]


def test_ctrl_c_after_the_pipe_closed_still_saves_the_last_step(tmp_path):
    """`python mae.py ... | head -2`, then Ctrl-C to the whole pipeline: head has gone, the next print would raise
    BrokenPipeError; the run must still save the step it reached and exit 0."""
    argv = [sys.executable, "mae.py", "--data", "fake", "--device", "cpu", "--model-dims", "32,1,2", "--decoder-dim",
            "32", "--decoder-depth", "1", "--decoder-heads", "2", "--batch-size", "4", "--num-workers", "0",
            "--steps", "100000", "--log-every", "1", "--knn-every", "0", "--out-dir", str(tmp_path), "--run-name", "p"]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    for line in proc.stdout:  # read until training runs, then close our end of the pipe (what `head` does)
        if line.startswith(b"step       5/"):
            break
    proc.stdout.close()
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) == 0
    ckpt = torch.load(tmp_path / "p" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] >= 5 and steps_logged(tmp_path / "p")[-1] == ckpt["step"]  # the last step done is saved


FLAG_CASES = [
    ("mae", {"mask_ratio": 1.5}, r"--mask-ratio 1.5 is out of range: it must be in \(0, 1\)"),
    ("mae", {"mask_ratio": -0.5}, r"--mask-ratio -0.5 is out of range"),
    ("msn", {"patch_drop": 1.5}, r"--patch-drop 1.5 is out of range: it must be in \[0, 1\)"),
    ("msn", {"num_prototypes": 0}, r"--num-prototypes 0 is out of range: it must be at least 2"),
    ("conmim", {"mask_ratio": 2.0}, r"--mask-ratio 2.0 is out of range"),
    ("moco", {"tau": 0.0}, r"--tau 0.0 is out of range: it must be more than 0 \(a temperature\)"),
    ("cmae", {"mask_unit": 3}, r"--mask-unit 3 is out of range: it must be at least 1 and divide the 8 x 8"),
    ("simsiam", {"optimizer": "lamb"}, r"--optimizer lamb is out of range: it must be 'adamw' or 'sgd'"),
    ("grafting", {"lower_lr_ratio": -1.0, "mode": "mtl"}, r"--lower-lr-ratio -1.0 is out of range"),
]


@pytest.mark.parametrize("method, flags, pattern", FLAG_CASES)
def test_a_method_flag_out_of_range_is_refused_before_any_run_folder(tmp_path, method, flags, pattern):
    module = importlib.import_module(method)
    with pytest.raises(module.DataError, match=pattern) as error:
        module.train(module.Args(data="fake", device="cpu", num_workers=0, out_dir=str(tmp_path / "runs"), **flags))
    assert "\n" not in str(error.value) and not (tmp_path / "runs").exists()  # one line, before a run folder


@pytest.mark.parametrize("method, flags, pattern", [
    ("mae", ["--mask-ratio", "1.5"], r"--mask-ratio 1.5 is out of range: it must be in \(0, 1\)"),
    ("moco", ["--tau", "0"], r"--tau 0.0 is out of range: it must be more than 0 \(a temperature\)"),
])
def test_a_method_flag_out_of_range_from_the_command_line_is_one_line(tmp_path, method, flags, pattern):
    import re
    proc = subprocess.run([sys.executable, f"{method}.py", "--data", "fake", "--device", "cpu", *flags, "--out-dir",
                           str(tmp_path / "runs")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and re.search(pattern, last), last
    assert not (tmp_path / "runs").exists()  # refused before a run folder exists


def test_resume_with_fewer_processes_keeps_the_global_batch(tmp_path, capsys):
    ckpt = mae.train(mae.Args(data="fake", steps=6, stop_after=2, out_dir=str(tmp_path), run_name="r", **TINY))
    state = torch.load(ckpt, weights_only=True)
    state["world_size"] = 2  # as if trained by torchrun with 2 processes of 4 images: a global batch of 8
    torch.save(state, ckpt)
    capsys.readouterr()
    mae.train(mae.Args(resume=ckpt, device="cpu", num_workers=0))
    out = capsys.readouterr().out
    assert "the run trained on 2 process(es); on 1 each takes 8 images, so the global batch stays 8" in out
    assert "batch 8 = 1 x 8" in out
    assert torch.load(ckpt, weights_only=True)["step"] == 6


def test_resume_keeps_the_runs_own_log_every(tmp_path):
    ckpt = mae.train(mae.Args(data="fake", steps=9, stop_after=3, log_every=3, out_dir=str(tmp_path), run_name="l",
                              **TINY))
    mae.train(mae.Args(resume=ckpt, device="cpu", num_workers=0))  # no --log-every: the run's own 3, not 50
    assert steps_logged(tmp_path / "l") == [3, 6, 9]


def test_a_run_folder_without_a_checkpoint_can_be_started_again(tmp_path, capsys):
    """A run killed before its first save leaves a folder with args.json and no checkpoint: the same command says
    to continue it with --resume, and --resume starts it afresh in that folder (no dead end)."""
    args = dict(data="fake", steps=3, out_dir=str(tmp_path), run_name="k", **TINY)
    mae.train(mae.Args(**args))
    os.remove(tmp_path / "k" / "checkpoint.pt")
    with pytest.raises(mae.DataError, match="already exists: continue that run with --resume"):
        mae.train(mae.Args(**args))
    capsys.readouterr()
    ckpt = mae.train(mae.Args(resume=str(tmp_path / "k"), device="cpu", num_workers=0))
    assert "holds no checkpoint (its run stopped before the first save): starting that run afresh" in capsys.readouterr().out
    assert torch.load(ckpt, weights_only=True)["step"] == 3 and os.path.dirname(ckpt) == str(tmp_path / "k")


def test_a_full_disk_at_start_is_one_line_and_leaves_no_folder(tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(mae.shutil, "copyfile", full)  # copying mae.py into the run folder
    with pytest.raises(mae.DataError, match=r"cannot write to run folder .*: No space left on device \(disk full\?\)"):
        mae.train(mae.Args(data="fake", steps=2, out_dir=str(tmp_path), run_name="full", **TINY))
    assert not (tmp_path / "full").exists()


def test_ctrl_c_during_start_up_is_one_line(monkeypatch, capsys):
    def interrupted(*a, **k):  # Ctrl-C while the data set is being read, before the handlers that save
        raise KeyboardInterrupt
    monkeypatch.setattr(mae, "build_dataset", interrupted)
    with pytest.raises(SystemExit) as stop:
        mae.main(lambda: mae.train(mae.Args(data="fake", steps=2, **TINY)))
    assert "interrupted (Ctrl-C)" in str(stop.value.code) and "\n" not in str(stop.value.code)
    sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__  # main() wrapped them


def test_a_symbolic_link_into_another_class_does_not_relabel_its_images(tmp_path):
    for name in ("a", "b"):
        os.makedirs(tmp_path / "d" / name)
        for i in range(3):
            Image.new("RGB", (8, 8)).save(tmp_path / "d" / name / f"{i}.png")
    os.symlink(tmp_path / "d", tmp_path / "d" / "a" / "loop")  # a/loop -> the data root
    os.symlink(tmp_path / "d" / "b", tmp_path / "d" / "a" / "b-too")  # a link to another class
    samples, classes = mae.find_images(str(tmp_path / "d"))
    assert classes == ["a", "b"] and [label for _, label in samples] == [0, 0, 0, 1, 1, 1]


def test_a_failed_download_leaves_no_empty_folder(tmp_path, monkeypatch):
    import torchvision

    def offline(root, **k):
        os.makedirs(root, exist_ok=True)  # torchvision makes the folder before it downloads
        raise RuntimeError("no network")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    monkeypatch.setenv("CIFAR10_ROOT", str(tmp_path / "data" / "cifar10-torchvision"))
    with pytest.raises(mae.DataError, match="could not download CIFAR-10"):
        mae.build_dataset("cifar10")
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("method, flag, paper", [
    ("mae", "epochs", "800 (1600 for the released weights)"), ("mae", "batch-size", "4096"),
    ("moco", "epochs", "300"), ("moco", "weight-decay", "0.1"), ("msn", "batch-size", "1024"),
    ("msn", "warmup-epochs", "15"), ("conmim", "batch-size", "2048"), ("grafting", "epochs", "300 (step 2, after 1600 MAE epochs)"),
    ("simsiam", "blr", "0.05 (SGD)"), ("cmae", "blr", "1.5e-4"),
])
def test_help_gives_each_methods_paper_value(method, flag, paper, capsys):
    module = importlib.import_module(method)
    with pytest.raises(SystemExit):
        module.parse_args(["--help"])
    out = capsys.readouterr().out
    start = out.index(f"\n  --{flag} ")  # this flag's help, up to the next flag's
    assert f"(paper: {paper})" in " ".join(out[start:out.index("\n  --", start + 1)].split())  # argparse wraps lines


def test_no_eta_from_the_compile_window(tmp_path, capsys):
    logger = mae.Logger(str(tmp_path), total_steps=100, batch_size=4, start_step=0, compiling=True)
    logger.log(1, 0, 1.0, 1e-3, {}, 60.0)
    logger.log(2, 0, 1.0, 1e-3, {}, 61.0)
    first, second = capsys.readouterr().out.splitlines()
    assert "ETA --:-- (compiling)" in first and "compiling" not in second and "ETA 0:" in second
