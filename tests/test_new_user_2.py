"""Issue #29: what a new user hits (2). Each test reproduces one report: a stop before the first step, one Ctrl-C
with the kNN monitor's workers running, the last losses of a stopped run, curves.png without a monitor, two
evaluations on different data, start-up noise around errors and abbreviated flags, --help that starts with the
flags, the pretext protocol's image count and an archive given as --data."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from PIL import Image

import evaluate
import mae

TINY = dict(device="cpu", model_dims="32,1,2", decoder_dim=32, decoder_depth=1, decoder_heads=2, batch_size=4,
            num_workers=0, vis_every=0, knn_every=0)


def log_rows(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_a_stop_before_the_first_step_names_no_checkpoint_that_does_not_exist(tmp_path, monkeypatch, capsys):
    """The signal arrives while the step-0 kNN monitor runs: nothing was trained, so nothing is saved, and the
    message says what --resume will do instead of naming a file that is not there."""
    accuracy = mae.KnnMonitor.accuracy

    def signalled(self, *a):  # Ctrl-C during the monitor of the untrained encoder
        os.kill(os.getpid(), signal.SIGINT)
        return accuracy(self, *a)
    monkeypatch.setattr(mae.KnnMonitor, "accuracy", signalled)
    mae.train(mae.Args(data="fake", out_dir=str(tmp_path), run_name="early", **dict(TINY, knn_every=1, knn_train=100,
                                                                                     knn_val=50)))
    out = capsys.readouterr().out
    assert out.count("SIGINT: saving a checkpoint after this step") == 1
    assert f"stopped before the first step; no checkpoint: --resume {tmp_path / 'early'} starts this run afresh" in out
    assert "checkpoint.pt" not in out and not (tmp_path / "early" / "checkpoint.pt").exists()
    signal.signal(signal.SIGINT, signal.default_int_handler)


def test_one_ctrl_c_prints_one_message_while_the_monitors_workers_decode(tmp_path):
    """The monitor decodes its 2,400 images with data workers, forked after the run's Ctrl-C handler was set: they
    must leave the signal to the main process (before the fix each worker printed the stop message too)."""
    for split, n in (("train", 2400), ("val", 40)):
        for i in range(n):
            os.makedirs(tmp_path / "d" / split / f"c{i % 2}", exist_ok=True)
            Image.new("RGB", (32, 32), (i % 255, 0, 0)).save(tmp_path / "d" / split / f"c{i % 2}" / f"{i}.png")
    argv = [sys.executable, "mae.py", "--data", str(tmp_path / "d"), "--device", "cpu", "--model-dims", "32,1,2",
            "--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2", "--batch-size", "8",
            "--num-workers", "2", "--knn-train", "2400", "--steps", "1000", "--vis-every", "0",
            "--out-dir", str(tmp_path), "--run-name", "w"]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "writing to" in line:  # the monitor starts its workers now
            os.killpg(proc.pid, signal.SIGINT)
            break
    out = "".join(lines) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    assert out.count("SIGINT: saving a checkpoint after this step") == 1, out


def test_a_run_stopped_between_log_lines_logs_its_last_losses(tmp_path, monkeypatch):
    step = mae.train_step
    calls = []

    def stopped_at_step_7(*a, **k):
        calls.append(1)
        if len(calls) == 7:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(*a, **k)
    monkeypatch.setattr(mae, "train_step", stopped_at_step_7)
    mae.train(mae.Args(data="fake", out_dir=str(tmp_path), run_name="s", steps=100, log_every=50, amp=False,
                       compile=False, **TINY))  # (no CPU probe: every train_step call is a step of the run)
    losses = [r for r in log_rows(tmp_path / "s") if "train/loss" in r]
    assert [r["step"] for r in losses] == [7]  # as a --stop-after stop does
    assert torch.load(tmp_path / "s" / "checkpoint.pt", weights_only=True)["step"] == 7
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def test_curves_are_drawn_without_a_monitor_and_after_a_resume(tmp_path):
    pytest.importorskip("matplotlib")
    ckpt = mae.train(mae.Args(data="fake", out_dir=str(tmp_path), run_name="c", steps=12, log_every=4, stop_after=8,
                              **TINY))
    assert (tmp_path / "c" / "curves.png").is_file()
    mae.train(mae.Args(resume=ckpt, device="cpu", num_workers=0))
    drawn = mae.plot_curves(str(tmp_path / "c" / "log.jsonl"))
    assert [round(m, 9) >= 0 for m, _ in drawn["train/loss"]] == [True] * 3 and drawn["knn"] == []
    assert [loss for _, loss in drawn["train/loss"]] == [r["train/loss"] for r in log_rows(tmp_path / "c")]


def test_two_evaluations_on_different_data_keep_both_results(tmp_path, capsys):
    ckpt = mae.train(mae.Args(data="fake", out_dir=str(tmp_path), run_name="e", steps=2, **TINY))
    for split in ("train", "val"):
        for i in range(40):
            os.makedirs(tmp_path / "photos" / split / f"c{i % 2}", exist_ok=True)
            Image.new("RGB", (32, 32), (200 * (i % 2), i, 0)).save(tmp_path / "photos" / split / f"c{i % 2}" / f"{i}.png")
    common = dict(ckpt=ckpt, device="cpu", protocols="knn", num_workers=0)
    fake = evaluate.evaluate(evaluate.Args(data="fake", **common))
    photos = evaluate.evaluate(evaluate.Args(data=str(tmp_path / "photos"), **common))
    subset = evaluate.evaluate(evaluate.Args(data="fake", max_train_images=100, max_val_images=50, **common))
    assert len({fake["json"], photos["json"], subset["json"]}) == 3
    assert json.loads(open(fake["json"]).read())["knn_top1"] == fake["knn_top1"]
    assert json.loads(open(photos["json"]).read())["knn_top1"] == photos["knn_top1"] == 100.0  # two plain colours
    assert json.loads(open(subset["json"]).read())["n_train"] == 100



def test_a_second_protocol_keeps_the_first_when_the_checkpoint_is_named_another_way(tmp_path, monkeypatch, capsys):
    """The same checkpoint as runs/x (relative, through a link) and as an absolute path is one set of results: the kNN
    of the first evaluation stays beside the linear probe of the second (it was replaced, found measuring the README)."""
    ckpt = mae.train(mae.Args(data="fake", out_dir=str(tmp_path / "real"), run_name="e", steps=2, **TINY))
    os.symlink(tmp_path / "real", tmp_path / "runs")
    monkeypatch.chdir(tmp_path)
    common = dict(data="fake", device="cpu", num_workers=0, max_train_images=100, max_val_images=50)
    knn = evaluate.evaluate(evaluate.Args(ckpt=(ckpt,), protocols="knn", **common))
    linear = evaluate.evaluate(evaluate.Args(ckpt=("runs/e",), protocols="linear", linear_epochs=2, **common))
    saved = json.loads(open(linear["json"]).read())
    assert linear["json"].endswith("eval-online-cls-fake-100x50.json") and os.path.samefile(knn["json"], linear["json"])
    assert saved["knn_top1"] == knn["knn_top1"] and saved["linear_top1"] == linear["linear_top1"]
    assert "kept from the earlier evaluation" in capsys.readouterr().out
    other = mae.train(mae.Args(data="fake", out_dir=str(tmp_path), run_name="other", steps=2, **TINY))
    (tmp_path / "other" / "eval-online-cls-fake-100x50.json").write_text(open(linear["json"]).read())
    again = evaluate.evaluate(evaluate.Args(ckpt=(other,), protocols="knn", **common))
    assert "linear_top1" not in json.loads(open(again["json"]).read())  # other weights' results are not mixed in
    assert "held an evaluation of other weights" in capsys.readouterr().out

def cli(*argv):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("argv, message", [
    (["--mask-ratio", "1.5"], "error: --mask-ratio 1.5 is out of range"),
    (["--data", "no/such/folder"], "error: data folder 'no/such/folder' does not exist"),
    (["--mask-raito", "0.5"], "error: unrecognized arguments: --mask-raito 0.5 (--help lists them)"),
    (["--step", "2"], "error: unrecognized arguments: --step 2 (--help lists them)"),
])
def test_a_config_error_is_one_line_on_stderr_and_nothing_before_it(argv, message, tmp_path):
    proc = cli("mae.py", "--device", "cpu", *(["--data", "fake"] if "--data" not in argv else []), *argv,
               "--out-dir", str(tmp_path))
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith(message), proc.stderr
    assert not os.listdir(tmp_path)  # no run folder


def test_an_archive_as_data_says_how_to_unpack_it(tmp_path):
    (tmp_path / "cifar10.tar.gz").write_bytes(b"not really")
    proc = cli("mae.py", "--device", "cpu", "--data", str(tmp_path / "cifar10.tar.gz"))
    assert "is an archive: unpack it first (mkdir -p data && tar -xf" in proc.stderr and proc.stdout == ""


def test_help_starts_with_the_flags_and_ends_with_the_examples():
    out = cli("moco.py", "--help").stdout
    lines = out.splitlines()
    first_flag = next(i for i, line in enumerate(lines) if line.strip().startswith("--data"))
    assert first_flag < 30 and "Paper -> code" not in out  # the docstring is in the file, not in front of the flags
    assert "python moco.py --data fake" in "\n".join(lines[first_flag:])  # the examples after the flags
    assert "--recipe" in out and "cpu" in out.split("--recipe RECIPE", 2)[-1].split("--model")[0]


def test_the_pretext_protocol_reads_at_most_max_val_images(tmp_path, capsys):
    ckpt = mae.train(mae.Args(data="fake", out_dir=str(tmp_path), run_name="p", steps=1, **TINY))
    result = evaluate.evaluate(evaluate.Args(ckpt=ckpt, data="fake", device="cpu", protocols="pretext", num_workers=0,
                                             max_val_images=20))
    assert result["pretext"]["images"] == 20
    assert f"reconstructions: {result['pretext']['picture']}" in capsys.readouterr().out


def test_evaluate_ends_as_the_method_files_do():
    """evaluate.py shares the method files' entry point (issue #28): one line for a bad flag, nothing before it, and
    a Ctrl-C or an error inside ends with one line, not a traceback."""
    proc = cli("evaluate.py", "--ckpt", "x", "--protocol", "knn")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip() == "error: unrecognized arguments: --protocol knn (--help lists them)"
    assert evaluate.main is not mae.main and evaluate.ClosedPipeSafe.__doc__ == mae.ClosedPipeSafe.__doc__

    def interrupted():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit, match="interrupted \\(Ctrl-C\\)"):
        evaluate.main(interrupted)
    import sys
    sys.stdout, sys.stderr = sys.stdout.stream, sys.stderr.stream  # main() wrapped them (ClosedPipeSafe)
