"""Issue #14: no silent wrong result, no lost run, one clear line for every mistake. One test (or
more) per numbered item of the issue, each reproducing the bad input or the fault on the CPU."""
import errno
import json
import os
import shutil
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
            num_workers=0, vis_every=0)
TINY_CLI = ["--device", "cpu", "--model-dims", "32,1,2", "--decoder-dim", "32", "--decoder-depth", "1",
            "--decoder-heads", "2", "--batch-size", "4", "--num-workers", "0", "--vis-every", "0"]


def images(folder, n, size=32, start=0):
    os.makedirs(folder, exist_ok=True)
    for i in range(start, start + n):
        Image.new("RGB", (size, size), ((i * 37) % 255, 80, 160)).save(os.path.join(folder, f"{i:03d}.png"))


def run(*argv, env=None):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def one_line_error(proc, pattern):
    import re
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and re.search(pattern, last), last
    return last


def read_log(run_dir):
    """The training steps' log lines (the kNN monitor's lines left out)."""
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if "train/loss" in r]


# ---------------------------------------------------------------- silent wrong results
def test_1_val_labels_are_matched_to_train_classes_by_name(tmp_path, capsys):
    for name in ("apple", "bird", "cat"):
        images(tmp_path / "d" / "train" / name, 2)
    for name in ("bird", "cat"):  # val lacks "apple": its own sorted list would call bird 0 and cat 1
        images(tmp_path / "d" / "val" / name, 2)
    train, val = evaluate.labelled_splits(str(tmp_path / "d"), 32)
    assert [label for _, label in val.samples] == [1, 1, 2, 2]
    assert val.classes == train.classes
    assert "no images of 1 of the 3 training classes (apple)" in capsys.readouterr().out
    images(tmp_path / "d" / "val" / "dog", 1)  # a class train never saw: an error, not a wrong score
    with pytest.raises(evaluate.DataError, match="dog.*cannot be matched"):
        evaluate.labelled_splits(str(tmp_path / "d"), 32)


def test_2_nan_weights_are_refused_by_evaluate(tmp_path):
    ckpt = mae.train(mae.Args(data="fake", steps=1, out_dir=str(tmp_path), run_name="m", **TINY))
    state = torch.load(ckpt, weights_only=True)
    state["encoder"]["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    one_line_error(run("evaluate.py", "--ckpt", str(tmp_path / "nan.pt"), "--data", "fake", "--device", "cpu",
                       "--num-workers", "0"), r"nan\.pt: the online weights hold NaN or inf .*diverged")


def test_3_recipe_auto_looks_at_several_images(tmp_path, capsys):
    folder = tmp_path / "photos" / "train" / "things"
    images(folder, 6, size=96, start=1)
    Image.new("RGB", (1, 1)).save(folder / "000.png")  # a 1x1 image sorted first
    args = mae.Args(data=str(tmp_path / "photos"), device="cuda")  # on the CPU, auto is always the cpu recipe
    assert mae.apply_recipe(args) == "imagenet" and args.img_size == 224
    out = capsys.readouterr().out
    assert "7 images looked at, short sides 1 to 96 px, median 96 px -> imagenet" in out


def test_4_16_bit_png_is_scaled_not_clipped(tmp_path):
    os.makedirs(tmp_path / "deep" / "c")
    Image.new("I;16", (8, 8), 30000).save(tmp_path / "deep" / "c" / "a.png")
    img, _ = mae.ImageFiles(str(tmp_path / "deep"))[0]
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (117, 117, 117)  # 30000 / 256, not 255


def test_5_resume_says_which_flags_it_ignores_and_that_the_data_changed(tmp_path, capsys):
    images(tmp_path / "d" / "c", 12)
    ckpt = mae.train(mae.Args(data=str(tmp_path / "d"), recipe="cifar10", steps=4, stop_after=2,
                              out_dir=str(tmp_path), run_name="r", **TINY))
    capsys.readouterr()
    os.remove(tmp_path / "d" / "c" / "000.png")
    mae.train(mae.Args(resume=ckpt, device="cpu", num_workers=0, steps=99, blr=0.5, stop_after=1))
    out = capsys.readouterr().out
    assert "ignored: --steps, --blr" in out
    assert "now has 11 images, the run started with 12" in out
    assert torch.load(ckpt, weights_only=True)["step"] == 3  # the run's own 4 steps, not 99


def test_6_a_symlink_loop_does_not_multiply_the_images(tmp_path):
    images(tmp_path / "d" / "c", 4)
    os.symlink(tmp_path / "d" / "c", tmp_path / "d" / "c" / "loop")
    os.symlink(tmp_path / "d", tmp_path / "d" / "c" / "up")
    samples, classes = mae.find_images(str(tmp_path / "d"))
    assert len(samples) == 4 and classes == ["c"]


# ---------------------------------------------------------------- lost work or lost results
def test_7_run_folders_are_created_exclusively(tmp_path, monkeypatch):
    args = dict(data="fake", steps=1, out_dir=str(tmp_path), **TINY)
    first = mae.train(mae.Args(run_name="same", **args))
    before = open(first, "rb").read()
    with pytest.raises(mae.DataError, match="already exists: continue that run with --resume"):
        mae.train(mae.Args(run_name="same", **args))
    assert open(first, "rb").read() == before and len(read_log(os.path.dirname(first))) == 1
    monkeypatch.setattr(mae.time, "strftime", lambda fmt: "20260101-000000")  # two runs in the same second
    a, b = mae.train(mae.Args(**args)), mae.train(mae.Args(**args))
    assert os.path.dirname(a) != os.path.dirname(b) and os.path.dirname(b).endswith("-2")


def test_8_non_finite_weights_never_replace_a_good_checkpoint(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    good = {"step": 3, "model": {"w": torch.ones(2)}}
    mae.save_checkpoint(path, good)
    with pytest.raises(mae.DataError, match="NaN or inf at step 4.*last good checkpoint .* is kept"):
        mae.save_checkpoint(path, {"step": 4, "model": {"w": torch.tensor([1.0, float("nan")])}})
    assert torch.load(path, weights_only=True)["step"] == 3 and not os.path.exists(path + ".tmp")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    path = mae.train(mae.Args(data="fake", steps=150, out_dir=str(out), run_name="whole", **TINY))
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_9_a_signal_to_the_process_group_saves_the_current_step_and_resumes_exactly(tmp_path, signum, uninterrupted):
    """What Slurm and systemd do (SIGTERM to every process of the job), Ctrl-C (SIGINT) and a closed
    terminal (SIGHUP), with 2 data workers: the run ends with exit 0 and a checkpoint at the step it
    had reached, and resuming it gives the uninterrupted run bit for bit."""
    argv = [sys.executable, "mae.py", "--data", "fake", *TINY_CLI[:-4], "--num-workers", "2", "--steps", "150",
            "--log-every", "1", "--out-dir", str(tmp_path), "--run-name", "sig"]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    for line in proc.stdout:  # wait until a few steps have run with the workers up
        if line.startswith("step       3/"):
            break
    os.killpg(proc.pid, signum)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    assert "Traceback" not in out and f"{signal.Signals(signum).name}: saving a checkpoint" in out
    stopped = int(out.split("stopped at step ")[1].split("/")[0])
    ckpt = torch.load(tmp_path / "sig" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == stopped and 3 <= stopped < 150
    assert read_log(tmp_path / "sig")[-1]["step"] == stopped  # the last step done is the one saved
    resumed = torch.load(mae.train(mae.Args(resume=str(tmp_path / "sig"), device="cpu", num_workers=0)),
                         weights_only=True)
    assert resumed["step"] == 150
    for k in uninterrupted["model"]:
        assert torch.equal(uninterrupted["model"][k], resumed["model"][k]), k


def test_10_an_unreadable_image_mid_run_saves_and_names_the_file(tmp_path):
    images(tmp_path / "d" / "a", 8)
    images(tmp_path / "d" / "b", 7)
    (tmp_path / "d" / "b" / "zzz.png").write_bytes(b"not an image at all")
    proc = run("mae.py", "--data", str(tmp_path / "d"), "--recipe", "cifar10", *TINY_CLI, "--steps", "8",
               "--log-every", "1", "--out-dir", str(tmp_path), "--run-name", "bad")
    last = one_line_error(proc, r"cannot read image .*zzz\.png.*saved a checkpoint at step \d+: replace or remove "
                                r"that file, then continue with --resume")
    step = int(last.split("checkpoint at step ")[1].split(":")[0])
    assert torch.load(tmp_path / "bad" / "checkpoint.pt", weights_only=True)["step"] == step < 8
    os.remove(tmp_path / "d" / "b" / "zzz.png")  # as the message says: remove it and continue
    resumed = run("mae.py", "--resume", str(tmp_path / "bad"), "--device", "cpu", "--num-workers", "0")
    assert resumed.returncode == 0 and "now has 15 images, the run started with 16" in resumed.stdout


def test_11_evaluate_creates_out_folders_keeps_earlier_results_and_finished_finetuning(tmp_path):
    ckpt = mae.train(mae.Args(data="fake", steps=1, out_dir=str(tmp_path), run_name="m", **TINY))
    base = ["evaluate.py", "--ckpt", ckpt, "--data", "fake", "--device", "cpu", "--num-workers", "0"]
    out = tmp_path / "new" / "folder" / "result.json"
    assert run(*base, "--protocols", "knn", "--out", str(out)).returncode == 0
    assert "knn_top1" in json.loads(out.read_text())
    assert run(*base, "--protocols", "linear", "--linear-epochs", "2", "--out", str(out)).returncode == 0
    both = json.loads(out.read_text())
    assert "knn_top1" in both and "linear_top1" in both  # the first run's result is kept
    ft = ["--protocols", "finetune", "--finetune-epochs", "1", "--finetune-batch-size", "100", "--max-train-images", "200"]
    assert run(*base, *ft).returncode == 0
    finished = (tmp_path / "m" / "eval-online-cls-fake-200xall-finetune.pt").read_bytes()
    one_line_error(run(*base, *ft), r"already holds a fine-tuning run .*--resume")
    assert (tmp_path / "m" / "eval-online-cls-fake-200xall-finetune.pt").read_bytes() == finished


def test_12_resumed_log_has_each_step_once(tmp_path):
    args = dict(data="fake", steps=6, log_every=1, out_dir=str(tmp_path), run_name="log", **TINY)
    ckpt = mae.train(mae.Args(stop_after=2, **args))
    shutil.copy(ckpt, tmp_path / "at2.pt")
    mae.train(mae.Args(resume=ckpt, device="cpu", num_workers=0, log_every=1, stop_after=2))  # logs steps 3-4
    shutil.copy(tmp_path / "at2.pt", ckpt)  # killed after logging 3-4 but before saving them
    mae.train(mae.Args(resume=ckpt, device="cpu", num_workers=0, log_every=1))
    assert [r["step"] for r in read_log(tmp_path / "log")] == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------- one clear line for every mistake
@pytest.mark.parametrize("flags, message", [
    (["--patch-size", "0"], "--patch-size must be more than 0, not 0"),
    (["--model-dims", "64,2"], "--model-dims '64,2' is not a ViT size: .* or width,depth,heads"),
    (["--model-dims", "64x2x4"], "--model-dims '64x2x4' is not a ViT size: .* or width,depth,heads"),
    (["--model-dims", "64,2,3"], "width 64 must be divisible by the 3 heads"),
    (["--batch-size", "0"], "--batch-size must be more than 0, not 0"),
    (["--batch-size", "-16"], "--batch-size must be more than 0, not -16"),
    (["--epochs", "0"], "--epochs must be more than 0, not 0"),
    (["--device", "gpu"], "unknown --device 'gpu'"),
    (["--steps", "-5"], "--steps must be 0 or more, not -5"),
])
def test_13_bad_flag_values_are_refused(tmp_path, flags, message):
    argv = {**TINY, "data": "fake", "out_dir": str(tmp_path)}
    for flag, value in zip(flags[::2], flags[1::2]):
        field = mae.Args.__dataclass_fields__[flag[2:].replace("-", "_")]
        argv[field.name] = value if field.type in (str, "str") else int(value)
    with pytest.raises(mae.DataError, match=message.replace("(", r"\(")):
        mae.train(mae.Args(**argv))
    assert not os.path.exists(tmp_path) or not os.listdir(tmp_path)  # refused before any run folder


def test_13_bad_flag_value_from_the_command_line(tmp_path):
    one_line_error(run("mae.py", "--data", "fake", *TINY_CLI, "--model-dims", "64x2x4", "--out-dir", str(tmp_path)),
                   "--model-dims '64x2x4' is not a ViT size")


def test_14_a_file_of_random_bytes_is_named_in_one_line(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(4096))
    for argv in (["mae.py", "--resume", str(junk), "--device", "cpu"],
                 ["evaluate.py", "--ckpt", str(junk), "--data", "fake", "--device", "cpu"],
                 ["evaluate.py", "--weights", str(junk), "--data", "fake", "--device", "cpu"]):
        one_line_error(run(*argv), r"junk\.pt: not a PyTorch (checkpoint|file), or a truncated or damaged one")


def test_15_out_dir_problems_and_a_full_disk(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    args = dict(data="fake", steps=2, run_name="r", **TINY)
    with pytest.raises(mae.DataError, match="--out-dir .*afile' is a file, not a folder"):
        mae.train(mae.Args(out_dir=str(tmp_path / "afile"), **args))

    def refuse(path, *a, **k):  # what a read-only or unwritable folder answers (tests may run as root)
        raise PermissionError(errno.EACCES, "Permission denied", path)
    with monkeypatch.context() as m:
        m.setattr(mae.os, "mkdir", refuse)
        with pytest.raises(mae.DataError, match="cannot create run folder .*: Permission denied"):
            mae.train(mae.Args(out_dir=str(tmp_path / "ro"), **args))

    path = str(tmp_path / "checkpoint.pt")
    mae.save_checkpoint(path, {"step": 1, "model": {"w": torch.ones(2)}})
    real_save = torch.save

    def fill_disk(obj, f, *a, **k):  # writes part of the file, then the disk is full
        with open(f, "wb") as out:
            out.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(mae.torch, "save", fill_disk)
    with pytest.raises(mae.DataError, match="cannot write checkpoint .*No space left on device \\(disk full\\?\\); "
                                            "the previous checkpoint is kept"):
        mae.save_checkpoint(path, {"step": 2, "model": {"w": torch.ones(2)}})
    monkeypatch.setattr(mae.torch, "save", real_save)
    assert torch.load(path, weights_only=True)["step"] == 1 and not os.path.exists(path + ".tmp")


def test_16_hidden_files_are_skipped(tmp_path):
    images(tmp_path / "d" / "c", 8)
    (tmp_path / "d" / "c" / "._000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS resource fork
    (tmp_path / "d" / ".DS_Store").write_bytes(b"junk")
    images(tmp_path / "d" / ".cache", 2)
    samples, classes = mae.find_images(str(tmp_path / "d"))
    assert classes == ["c"] and len(samples) == 8
    mae.train(mae.Args(data=str(tmp_path / "d"), steps=2, out_dir=str(tmp_path), run_name="h", **TINY))


def test_17_data_pointing_at_a_file(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    one_line_error(run("mae.py", "--data", str(tmp_path / "a.jpg"), *TINY_CLI, "--steps", "1"),
                   r"--data '.*a\.jpg' is a file; it takes a folder of images")
