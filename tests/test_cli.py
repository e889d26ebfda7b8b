"""The command lines as a user meets them: the docstring's smoke run, evaluate.py on its checkpoint,
--help, and one-line errors for bad input."""
import importlib
import json
import os
import re
import shlex

import pytest
import torch

import evaluate
import mae

ERROR_CASES_ENV = dict(os.environ, PYTHONWARNINGS="ignore")


def docstring_command(module, marker):
    """The run command printed in a method file's docstring (so the test keeps the docs honest)."""
    line = next(l for l in module.__doc__.splitlines() if marker in l)
    return shlex.split(line.split("#")[0].strip())[1:]  # drop "python"


@pytest.mark.parametrize("method", ["mae", "simsiam", "moco", "cmae", "conmim", "msn"])
def test_docstring_smoke_run_then_evaluate(tmp_path, cli, method):
    module = importlib.import_module(method)
    argv = docstring_command(module, "--data fake")
    assert argv[0] == f"{method}.py" and "--device" in argv
    cli(*argv, "--out-dir", str(tmp_path), "--run-name", "smoke", "--num-workers", "0")
    ckpt = tmp_path / "smoke" / "checkpoint.pt"
    assert ckpt.exists() and (tmp_path / "smoke" / "log.jsonl").exists()
    if method in ("mae", "cmae"):  # the pixel decoders draw reconstructions
        assert any(f.startswith("reconstruction_step") for f in os.listdir(tmp_path / "smoke"))
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == int(argv[argv.index("--steps") + 1]) and state["method"] == method

    # one evaluate.py command line: the trained encoder and the untrained baseline side by side
    out = cli("evaluate.py", "--ckpt", str(ckpt), "--data", "fake", "--device", "cpu", "--num-workers", "0",
              "--linear-epochs", "5", "--with-random-init", "--out", str(tmp_path / "both.json")).stdout
    assert "kNN top-1" in out and "random init" in out
    which = state["default_encoder"]
    result = json.loads((tmp_path / "smoke" / f"eval-{which}-cls-fake.json").read_text())
    assert 0 <= result["knn_top1"] <= 100 and 0 <= result["linear_top1"] <= 100
    assert result["method"] == method and result["step"] == state["step"] and not result["random_init"]
    baseline = json.loads((tmp_path / "smoke" / f"eval-{which}-cls-fake-random.json").read_text())
    assert baseline["random_init"] and baseline["method"] == method
    if "target_encoder" in state:  # the other encoder, and another read-out, in-process (the command line is above)
        evaluate.evaluate(evaluate.parse_args(["--ckpt", str(tmp_path / "smoke"), "--data", "fake", "--device", "cpu",
                                               "--num-workers", "0", "--encoder", "target", "--protocols", "knn",
                                               "--pool", "mean"]))
        assert json.loads((tmp_path / "smoke" / "eval-target-mean-fake.json").read_text())["encoder"] == "target"


def help_text(module, capsys):
    with pytest.raises(SystemExit) as done:
        module.parse_args(["--help"])
    assert done.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


def test_help_teaches(capsys):
    out = help_text(mae, capsys)
    for text in ("--mask-ratio", "paper: 0.75", "--blr", "batch-size / 256", "--resume", "--images", "--data"):
        assert text in out, text
    assert "off on CPU; the first steps are slow while it compiles) (default: auto)" in out  # --compile
    assert "(default: from the recipe)" in out and "(default: 0.75)" in out
    assert "--ckpt" in help_text(evaluate, capsys)


def one_line_error(proc, expected):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and re.search(expected, last), last


def make_images(folder, n, mode="RGB", size=32):
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        Image.new(mode, (size, size), color=(i * 10) % 255 if mode == "L" else ((i * 10) % 255, 50, 100)).save(
            os.path.join(folder, f"{i:03d}.png"))


TINY = ["--device", "cpu", "--model-dims", "32,1,2", "--decoder-dim", "32", "--decoder-depth", "1",
        "--decoder-heads", "2", "--batch-size", "4", "--steps", "2", "--num-workers", "0", "--vis-every", "0"]


@pytest.mark.parametrize("workers", ["0", "1"])
def test_bad_data_gives_one_line_errors(tmp_path, cli, workers):
    out = ["--out-dir", str(tmp_path / "runs")]
    if workers == "0":  # the folder checks come before any DataLoader worker exists: once is enough
        one_line_error(cli("mae.py", "--data", str(tmp_path / "missing"), *TINY, *out, expect_ok=False), "does not exist")
        os.makedirs(tmp_path / "empty")
        one_line_error(cli("mae.py", "--data", str(tmp_path / "empty"), *TINY, *out, expect_ok=False), "no images")
    broken = tmp_path / "broken" / "cls"  # an image that fails to decode, in the main process and in a worker
    make_images(broken, 3)
    (broken / "999.png").write_bytes(b"this is not a png")
    one_line_error(cli("mae.py", "--data", str(tmp_path / "broken"), *TINY, *out, "--batch-size", "4", "--steps", "1",
                       "--num-workers", workers, expect_ok=False), r"cannot read image .*999\.png")


def test_grayscale_and_flat_folders_train(tmp_path, cli):
    make_images(tmp_path / "gray", 8, mode="L")  # a flat folder of grayscale images
    cli("mae.py", "--data", str(tmp_path / "gray"), *TINY, "--out-dir", str(tmp_path / "runs"), "--run-name", "g")
    assert (tmp_path / "runs" / "g" / "checkpoint.pt").exists()


def test_evaluate_rejects_foreign_checkpoints(tmp_path, cli):
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    base = ["--data", "fake", "--device", "cpu", "--num-workers", "0"]
    # the command line: one line on stderr, no traceback
    one_line_error(cli("evaluate.py", "--ckpt", str(tmp_path / "other.pt"), *base, expect_ok=False), "not written by")

    def refused(*argv, match):  # the other cases in-process: the same DataError that main() prints as one line
        with pytest.raises(evaluate.DataError, match=match) as error:
            evaluate.evaluate(evaluate.parse_args([*argv, *base]))
        assert "\n" not in str(error.value)

    refused("--ckpt", str(tmp_path / "nothing.pt"), match="does not exist")
    mae.train(mae.parse_args(["--data", "fake", *TINY, "--out-dir", str(tmp_path), "--run-name", "m"]))
    ckpt = str(tmp_path / "m" / "checkpoint.pt")
    refused("--ckpt", ckpt, "--encoder", "target", match="no target encoder")
    state = torch.load(ckpt, weights_only=True)
    state["encoder_config"]["dim"] = 64  # weights from another model shape
    torch.save(state, tmp_path / "mismatch.pt")
    refused("--ckpt", str(tmp_path / "mismatch.pt"), match="do not fit")
    # mae.py --resume refuses a checkpoint of another method
    state["method"] = "moco"
    torch.save(state, tmp_path / "moco.pt")
    with pytest.raises(mae.DataError, match="not a mae.py checkpoint"):
        mae.train(mae.parse_args(["--resume", str(tmp_path / "moco.pt"), "--device", "cpu"]))


def test_ctrl_c_to_the_whole_process_group_saves_a_checkpoint(tmp_path):
    """Ctrl-C reaches the main process and its DataLoader workers at once: the run must finish its
    step, save, and exit cleanly, rather than die with its workers."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT
    argv = [sys.executable, "mae.py", "--data", "fake", *TINY[:-8], "--steps", "100000", "--num-workers", "2",
            "--log-every", "1", "--vis-every", "0", "--out-dir", str(tmp_path), "--run-name", "sig"]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    for line in proc.stdout:  # wait until a few steps have run with the workers up
        if line.startswith("step       3/"):
            break
    os.killpg(proc.pid, signal.SIGINT)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    assert "stopped at step" in out
    ckpt = torch.load(tmp_path / "sig" / "checkpoint.pt", weights_only=True)
    assert 3 <= ckpt["step"] < 100000


@pytest.mark.parametrize("method", ["mae", "moco"])
def test_benchmark_reports_speed_and_mfu(cli, method):
    extra = ["--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2"] if method == "mae" else ["--mlp-dim", "64"]
    out = cli(".ci/benchmark.py", method, "--device", "cpu", "--model-dims", "32,1,2", "--batch-size", "8",
              "--steps", "2", "--peak-tflops", "1", "--no-compile", *extra).stdout  # fp32 and bf16, eager
    result = json.loads(out.strip().splitlines()[-1])
    assert result["img_per_s"] > 0 and result["gflop_per_img"] > 0 and 0 < result["mfu"] < 1
    assert "img/s" in out and "MFU" in out
