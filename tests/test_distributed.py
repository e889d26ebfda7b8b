"""Many GPUs (issue #16), checked on the CPU with torchrun and gloo. The property that makes the
distributed code right: 2 ranks with B/2 images each give the same losses and the same weights as
1 process with B images (same samples, views and masks). It fails if a gather of keys, a
BatchNorm over the global batch, or a reduction in the loss is missing. MSN's summed prototype
gradient, the official code's deliberate departure from one large batch, is checked exactly."""
import contextlib
import importlib
import io
import json
import os
import subprocess
import sys
import types

import pytest
import torch
from conftest import ROOT

SMALL = {
    "mae": ["--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2"],
    "moco": ["--mlp-dim", "64", "--proj-dim", "32"],
    "simsiam": ["--proj-dim", "64", "--pred-dim", "16"],
    "msn": ["--hidden-dim", "64", "--proj-dim", "32", "--num-prototypes", "16", "--focal-views", "2"],
    "cmae": ["--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2", "--proj-hidden", "64", "--proj-dim", "32"],
    "conmim": ["--mlp-dim", "64", "--proj-dim", "32"],
    "grafting": ["--mode", "mtl", "--mlp-dim", "64", "--proj-dim", "32", "--decoder-dim", "32", "--decoder-depth", "1",
                 "--decoder-heads", "2"],
}
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def train(method, out_dir, name, nproc, batch, *extra):
    argv = [f"{method}.py", "--data", "fake", "--device", "cpu", "--model-dims", "32,2,2", "--batch-size", str(batch),
            "--steps", "3", "--log-every", "1", "--num-workers", "0", "--blr", "1e-2", "--out-dir", str(out_dir),
            "--run-name", name, *SMALL[method], *extra]
    if "--vis-every" not in extra and method in ("mae", "cmae"):
        argv += ["--vis-every", "1"]  # a picture at the end of the run: every rank must take part (issue #22)
    if nproc == 1:  # in-process (no interpreter start-up), on one thread like each torchrun process (OMP_NUM_THREADS=1)
        module, threads, out = importlib.import_module(method), torch.get_num_threads(), io.StringIO()
        torch.set_num_threads(1)
        try:
            with contextlib.redirect_stdout(out):
                module.train(module.parse_args(argv[1:]))
        finally:
            torch.set_num_threads(threads)
        return types.SimpleNamespace(stdout=out.getvalue())
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    proc = subprocess.run(launcher + argv, cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def result(out_dir, name, kind="train/loss"):
    """The checkpoint and the log lines of one kind: the training steps, or the kNN monitor's ("knn")."""
    ckpt = torch.load(out_dir / name / "checkpoint.pt", weights_only=True)
    with open(out_dir / name / "log.jsonl") as f:
        return ckpt, [r for r in map(json.loads, f) if kind in r]


@pytest.mark.parametrize("method", list(SMALL))
def test_two_ranks_with_half_batches_equal_one_process(tmp_path, method):
    one = train(method, tmp_path, "one", 1, 8)
    two = train(method, tmp_path, "two", 2, 4)
    assert "batch 8 = 2 x 4" in two.stdout and "batch 8 = 1 x 8" in one.stdout
    assert two.stdout.count("step       1/3") == 1 and two.stdout.count("recipe auto") == 1  # only rank 0 speaks
    assert "finished at step 3/3" in two.stdout  # pictures on (mae, cmae) and the kNN monitor: no rank left waiting
    if method in ("mae", "cmae"):
        assert (tmp_path / "two" / "reconstruction_step0000003.png").is_file()
    # the kNN monitor: one answer for the job, the 1-process answer, at step 0 and at the end
    knn_a, knn_b = result(tmp_path, "one", "knn")[1], result(tmp_path, "two", "knn")[1]
    assert [r["step"] for r in knn_a] == [r["step"] for r in knn_b] == [0, 3]
    assert knn_b[0]["knn"] == knn_a[0]["knn"]  # the same weights: each rank's share, gathered, gives the same answer
    assert abs(knn_b[1]["knn"] - knn_a[1]["knn"]) <= 0.5  # after 3 steps: at most one of the 200 images (Adam noise)
    (a, log_a), (b, log_b) = result(tmp_path, "one"), result(tmp_path, "two")
    assert [r["step"] for r in log_a] == [r["step"] for r in log_b] == [1, 2, 3]
    for ra, rb in zip(log_a, log_b):  # the global batch's loss and metrics, step by step
        assert rb["train/loss"] == pytest.approx(ra["train/loss"], rel=1e-4, abs=1e-5)
        assert rb["train/lr"] == pytest.approx(ra["train/lr"])
        for k in ra:
            if k not in ("train/img_per_s", "train/data_wait", "minutes"):
                assert rb[k] == pytest.approx(ra[k], rel=1e-3, abs=1e-4), k
    # The gradients and the weights. Adam's first moment (its running mean of the gradient) must agree
    # up to the rounding of sums taken in another order. A parameter whose true gradient is 0 (a bias
    # just before a BatchNorm, the key bias of attention) gets only rounding noise, which Adam's
    # normalisation turns into lr-sized steps of either sign in both runs: the weights are compared
    # where the gradient is clearly above that noise.
    names = [n for group in a["optimizer_param_names"] for n in group]
    assert names == [n for group in b["optimizer_param_names"] for n in group]
    moments = {n: (a["optimizer"]["state"][i]["exp_avg"], b["optimizer"]["state"][i]["exp_avg"])
               for i, n in enumerate(names)}
    for name, (m_a, m_b) in moments.items():
        # MSN: the official code sums the prototypes' gradient over GPUs (AllReduceSum, outside DDP)
        # instead of averaging it, so their first moment is WORLD = 2 times larger with 2 ranks; Adam's
        # update does not change with the gradient's scale, so the weights still agree.
        ratio = 2.0 if method == "msn" and name == "prototypes" else 1.0
        scale = m_a.abs().max().item()
        assert torch.allclose(m_b, ratio * m_a, rtol=1e-3, atol=1e-4 * scale + 1e-6), name  # 1e-6: the noise floor
        signal = m_a.abs() > max(1e-3 * scale, 1e-5)
        w_a, w_b = a["model"][name], b["model"][name]
        off = ~torch.isclose(w_a[signal], w_b[signal], rtol=1e-3, atol=1e-5)
        # A unit whose gradient was at the noise level at an earlier step (GELU had it switched off) took an
        # Adam step of noise-dependent size then (g / (|g| + eps) with |g| ~ eps), however clear its gradient
        # is now: allow such a straggler, one in a hundred at most, and by no more than the lr steps taken.
        assert off.sum() <= max(1, off.numel() // 100), name
        assert ((w_a - w_b)[signal].abs() <= 2 * sum(r["train/lr"] for r in log_a)).all(), name
    for k, t in a["model"].items():  # buffers: BatchNorm running statistics (they follow the noisy biases a little)
        if k not in moments:
            assert torch.allclose(t.float(), b["model"][k].float(), atol=2e-3), k


def test_distributed_run_resumes_and_evaluates(tmp_path):
    train("moco", tmp_path, "whole", 2, 4)
    train("moco", tmp_path, "part", 2, 4, "--stop-after", "2")
    assert torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)["step"] == 2
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "moco.py", "--resume", str(tmp_path / "part"), "--device", "cpu", "--num-workers", "0",
                           "--log-every", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (a, log_a), (b, log_b) = result(tmp_path, "whole"), result(tmp_path, "part")
    assert b["step"] == 3 and [r["step"] for r in log_b] == [1, 2, 3]
    for k in a["model"]:
        assert torch.allclose(a["model"][k].float(), b["model"][k].float(), atol=1e-6), k
    import evaluate
    scored = evaluate.evaluate(evaluate.parse_args(["--ckpt", str(tmp_path / "part"), "--data", "fake", "--device", "cpu",
                                                    "--num-workers", "0", "--protocols", "knn"]))
    assert scored["step"] == 3 and 0 <= scored["knn_top1"] <= 100


def test_a_failure_on_one_rank_ends_the_job_with_one_line(tmp_path):
    os.makedirs(tmp_path / "taken")
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "mae.py", "--data",
            "fake", "--device", "cpu", "--model-dims", "32,1,2", "--batch-size", "4", "--steps", "2", "--num-workers", "0",
            "--out-dir", str(tmp_path), "--run-name", "taken"]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode != 0
    assert "error: run folder" in proc.stderr and "already exists" in proc.stderr


def test_sampler_splits_each_global_batch_in_rank_order():
    import mae
    one = mae.EpochSampler(20, seed=3, batch_size=8)
    ranks = [mae.EpochSampler(20, seed=3, batch_size=4, rank=r, world=2) for r in range(2)]
    whole = list(one)[:16]  # two whole global batches of 8
    parts = [list(s) for s in ranks]
    assert [len(p) for p in parts] == [8, 8] and all(len(s) == 8 for s in ranks)
    for step in range(2):
        assert parts[0][4 * step:4 * step + 4] + parts[1][4 * step:4 * step + 4] == whole[8 * step:8 * step + 8]
    for s in ranks:
        s.set_epoch(0, skip=8)  # resumed after one global batch
    assert [list(s) for s in ranks] == [parts[0][4:], parts[1][4:]]


def test_an_error_every_rank_meets_is_printed_once(tmp_path):
    """A bad --data fails on every rank before the process group exists: one `error:` line, not one per rank."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "mae.py", "--data",
            str(tmp_path / "missing"), "--device", "cpu", "--num-workers", "0", "--out-dir", str(tmp_path)]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode != 0
    assert proc.stderr.count("error: data folder") == 1, proc.stderr
