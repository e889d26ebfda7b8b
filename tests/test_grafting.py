"""Layer grafting: the lr groups, the MAE weights in both encoders, frozen parts that stay frozen,
the gradient cosine by hand, the MTL loss, and the chain mae.py -> grafting.py -> evaluate.py."""
import json
import math
import os
import sys

import pytest
import torch
from conftest import ROOT
from PIL import Image

import grafting
import mae
from vit import ViT

TINY = dict(model_dims="32,3,2", img_size=32, patch_size=4, proj_dim=16, mlp_dim=32,
            decoder_dim=16, decoder_depth=1, decoder_heads=2)


def fake_mae_checkpoint():
    """What mae.py writes, for a random 32-wide, 3-deep MAE (only the keys grafting reads)."""
    torch.manual_seed(1)
    model = mae.MAE(ViT(img_size=32, patch_size=4, dim=32, depth=3, heads=2), 16, 1, 2)
    return {"method": "mae", "step": 7, "model": model.state_dict(), "encoder": model.encoder.state_dict(),
            "encoder_config": model.encoder.config,
            "args": {"decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2, "norm_pix_loss": True}}


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory):
    """A real mae.py checkpoint from the docstring's smoke command (10 steps on fake data)."""
    out = tmp_path_factory.mktemp("mae")
    args = mae.Args(data="fake", device="cpu", steps=10, batch_size=16, model_dims="64,3,4", decoder_dim=32,
                    decoder_depth=1, decoder_heads=2, num_workers=0, out_dir=str(out), run_name="mae-smoke",
                    vis_every=0)
    return mae.train(args)


def test_every_parameter_sits_in_one_lr_group_with_its_lr():
    model = grafting.build_model(grafting.Args(**TINY))
    groups = grafting.param_groups(model, weight_decay=0.1, n_lower=2, lower_lr_ratio=0.1)
    lr = 1e-3
    for group in groups:  # as train_step sets them
        group["lr"] = lr * group["lr_scale"]
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen))  # no parameter twice
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(seen) == trainable
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    for name, p in names.items():
        if not p.requires_grad:
            assert name.startswith(("encoder.patch_embed", "encoder.pos_embed", "decoder", "momentum_"))
            continue
        slow = name == "encoder.cls_token" or name.startswith(("encoder.blocks.0.", "encoder.blocks.1."))
        assert lr_of[id(p)] == pytest.approx(lr * (0.1 if slow else 1.0)), name
        # official param_groups_lrd_moco(no_weight_decay_list=[]): only 1-D parameters skip decay, CLS does not
        assert wd_of[id(p)] == (0.0 if p.ndim == 1 else 0.1), name
    assert wd_of[id(names["encoder.cls_token"])] == 0.1
    for name in ("encoder.blocks.2.attn.qkv.weight", "encoder.norm.weight", "projector.0.weight", "predictor.0.weight"):
        assert lr_of[id(names[name])] == pytest.approx(lr)


def test_lower_block_count():
    args = grafting.Args()
    assert grafting.lower_block_count(args, 12) == 8 and grafting.lower_block_count(args, 24) == 16
    assert grafting.lower_block_count(grafting.Args(lower_blocks=5), 12) == 5
    with pytest.raises(grafting.DataError, match="outside"):
        grafting.lower_block_count(grafting.Args(lower_blocks=13), 12)


def test_mae_weights_arrive_in_both_encoders_unchanged():
    ckpt = fake_mae_checkpoint()
    args = grafting.Args(proj_dim=16, mlp_dim=32, mae_ckpt="x")
    grafting.adopt_mae_shape(args, ckpt)
    assert (args.model_dims, args.img_size, args.patch_size) == ("32,3,2", 32, 4)
    model = grafting.build_model(args, ckpt)
    for encoder in (model.encoder, model.momentum_encoder):
        state = encoder.state_dict()
        assert state.keys() == ckpt["encoder"].keys()
        assert all(torch.equal(state[k], v) for k, v in ckpt["encoder"].items())
    decoder = {k: v for k, v in ckpt["model"].items() if k.startswith("decoder.")}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in decoder.items()) and decoder


@pytest.mark.parametrize("flag", [dict(model_dims="32,2,2"), dict(model="base"), dict(img_size=64)])
def test_a_mismatched_shape_is_an_error(flag):
    with pytest.raises(grafting.DataError, match="drop the flag"):
        grafting.adopt_mae_shape(grafting.Args(**flag), fake_mae_checkpoint())


def test_block_cosines_equal_a_hand_computation():
    # two "blocks": w1 in R^3 and w2 in R^2, with losses whose gradients are easy by hand
    w1 = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))
    w2 = torch.nn.Parameter(torch.tensor([1.0, 3.0]))
    blocks = [torch.nn.ParameterList([w1]), torch.nn.ParameterList([w2])]
    x, y, u = [1.0, 2.0, -1.0], [0.0, 1.0, 1.0], [2.0, -1.0]
    t = lambda v: torch.tensor(v)
    loss_a = (w1 @ t(x)) ** 2 + w2 @ t(u)  # d/dw1 = 2 (w1.x) x,  d/dw2 = u
    loss_b = w1 @ t(y) + (w2 ** 2).sum()   # d/dw1 = y,            d/dw2 = 2 w2
    w1x = 0.5 * 1 - 1.0 * 2 + 2.0 * -1     # = -3.5
    g_a1, g_b1 = [2 * w1x * v for v in x], y
    g_a2, g_b2 = u, [2.0, 6.0]

    def cos(a, b):
        return sum(p * q for p, q in zip(a, b)) / math.sqrt(sum(p * p for p in a) * sum(q * q for q in b))
    got = grafting.block_cosines(loss_a, loss_b, blocks)
    assert got.tolist() == pytest.approx([cos(g_a1, g_b1), cos(g_a2, g_b2)], rel=1e-6)
    assert got[1].item() == pytest.approx((2 * 2 - 6) / (math.sqrt(5) * math.sqrt(40)))
    # a block that one loss does not reach: zero gradient, C = 0
    w3 = torch.nn.Parameter(torch.ones(2))
    got = grafting.block_cosines((w1 ** 2).sum(), (w3 ** 2).sum(), [torch.nn.ParameterList([w3])])
    assert got.tolist() == [0.0]


def test_mtl_loss_is_the_sum_of_mim_and_cl():
    torch.manual_seed(0)
    model = grafting.build_model(grafting.Args(mode="mtl", **TINY))
    x1, x2, xm = (torch.randn(4, 3, 32, 32) for _ in range(3))
    torch.manual_seed(5)
    total, parts = model(x1, x2, xm)
    torch.manual_seed(5)
    cl, mim = model.contrastive(x1, x2), model.masked_modeling(xm)
    assert total.item() == pytest.approx(cl.item() + mim.item(), rel=1e-6)
    assert parts["cl"].item() == pytest.approx(cl.item()) and parts["mim"].item() == pytest.approx(mim.item())
    loss, parts = model(x1, x2)  # graft mode: the CL loss alone
    assert set(parts) == {"cl"}
    total.backward()  # both losses reach the shared encoder, none reaches the momentum encoder
    assert all(p.grad is not None for p in model.decoder.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.momentum_parameters())


@pytest.mark.parametrize("freeze_lower", [False, True])
def test_frozen_parts_stay_fixed_and_lower_blocks_learn_slowly(mae_run, tmp_path, freeze_lower):
    start = torch.load(mae_run, weights_only=True)["encoder"]
    args = grafting.Args(data="fake", device="cpu", steps=4, batch_size=16, mlp_dim=64, proj_dim=16, blr=1e-2,
                         warmup_epochs=0, momentum=0.5, num_workers=0, out_dir=str(tmp_path), run_name="g",
                         mae_ckpt=mae_run, freeze_lower=freeze_lower)
    ckpt = torch.load(grafting.train(args), weights_only=True)
    online, target = ckpt["encoder"], ckpt["target_encoder"]  # lower blocks: 0 and 1 of 3

    def change(state, prefix):
        keys = [k for k in start if k.startswith(prefix)]
        return sum((state[k] - start[k]).abs().sum().item() for k in keys) / sum(start[k].numel() for k in keys)
    for state in (online, target):
        assert torch.equal(state["patch_embed.proj.weight"], start["patch_embed.proj.weight"])
        assert torch.equal(state["pos_embed"], start["pos_embed"])
        assert change(state, "blocks.2.") > 0
    if freeze_lower:
        for state in (online, target):
            assert change(state, "blocks.0.") == change(state, "blocks.1.") == 0
            assert torch.equal(state["cls_token"], start["cls_token"])
    else:  # AdamW steps scale with the lr: the lower blocks move about 10x less than the top one
        assert 0 < change(online, "blocks.0.") < 0.3 * change(online, "blocks.2.")
        assert 0 < change(online, "blocks.1.") < 0.3 * change(online, "blocks.2.")
    decoder = {k: v for k, v in torch.load(mae_run, weights_only=True)["model"].items() if k.startswith("decoder.")}
    assert all(torch.equal(ckpt["model"][k], v) for k, v in decoder.items())  # kept, not trained


@pytest.mark.slow
def test_cli_chain_mae_grafting_evaluate_and_gradient_analysis(mae_run, tmp_path, cli, capsys):
    out = cli("grafting.py", "--data", "fake", "--device", "cpu", "--steps", "6", "--batch-size", "16",
              "--mlp-dim", "64", "--mae-ckpt", mae_run, "--num-workers", "0", "--out-dir", str(tmp_path),
              "--run-name", "g", "--log-every", "3").stdout
    assert "embeddings + blocks 1-2 at lr x 0.1" in out and "ViT-64,3,4/4" in out
    ckpt = tmp_path / "g" / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    assert state["method"] == "grafting" and state["step"] == 6 and state["default_encoder"] == "online"
    import evaluate  # in-process from here on: the command lines are the same parse_args() and train()
    evaluate.evaluate(evaluate.parse_args(["--ckpt", str(ckpt), "--data", "fake", "--device", "cpu", "--num-workers", "0",
                                           "--linear-epochs", "5"]))
    result = json.loads((tmp_path / "g" / "eval-online-cls-fake.json").read_text())
    assert result["method"] == "grafting" and 0 <= result["knn_top1"] <= 100

    def analyze(samples):
        capsys.readouterr()
        grafting.train(grafting.parse_args(["--analyze-gradients", str(ckpt), "--data", "fake", "--device", "cpu",
                                            "--analyze-samples", samples]))
        return capsys.readouterr().out, json.loads((tmp_path / "g" / "gradient_conflict.json").read_text())
    out, conflict = analyze("20")  # rounded down to one batch of the run's 16
    assert "| block | mean C |" in out and out.count("\n| ") >= 4 and "16 images of fake in batches of 16" in out
    cos = torch.tensor(conflict["cosines"])
    assert cos.shape == (16, 3) and (cos.abs() <= 1 + 1e-5).all() and cos.abs().sum() > 0
    _, more = analyze("32")  # a second batch: each image's contrastive loss still sees only its own batch's keys
    assert torch.allclose(torch.tensor(more["cosines"])[:16], cos, atol=1e-5)
    assert [row["block"] for row in conflict["blocks"]] == [1, 2, 3]
    assert conflict["blocks"][0]["frac_negative"] == pytest.approx((cos[:, 0] < 0).float().mean().item())
    with Image.open(tmp_path / "g" / "gradient_conflict.png") as im:
        assert im.format == "PNG" and im.size[0] >= 200


def test_mtl_mode_runs_from_scratch_and_benchmarks(tmp_path, cli, capsys):
    common = ["--data", "fake", "--device", "cpu", "--batch-size", "8", "--mode", "mtl", "--model-dims", "32,2,2",
              "--mlp-dim", "32", "--decoder-dim", "16", "--decoder-depth", "1", "--decoder-heads", "2"]
    out = cli("grafting.py", *common, "--steps", "3", "--num-workers", "0", "--out-dir", str(tmp_path),
              "--run-name", "mtl", "--log-every", "3").stdout
    assert "from scratch" in out and "| mim " in out and "| cl " in out
    capsys.readouterr()
    sys.path.insert(0, os.path.join(ROOT, ".ci"))
    import benchmark  # the benchmark runs grafting's own train() up to prepare()
    results = benchmark.benchmark(["grafting", *common, "--steps", "2", "--peak-tflops", "1", "--no-compile", "--no-amp"])
    assert results[-1]["img_per_s"] > 0 and json.loads(capsys.readouterr().out.strip().splitlines()[-1])["img_per_s"] > 0


def test_bad_mae_checkpoints_give_one_line_errors(tmp_path, cli, mae_run):
    base = ["grafting.py", "--data", "fake", "--device", "cpu", "--steps", "1", "--num-workers", "0",
            "--out-dir", str(tmp_path)]
    proc = cli(*base, expect_ok=False)
    assert proc.returncode != 0 and proc.stderr.strip() == \
        "error: --mode graft needs --mae-ckpt: a checkpoint.pt written by mae.py (step 1)"

    def refused(*flags):  # the rest in-process: the one-line DataError that main() prints
        with pytest.raises(grafting.DataError) as error:
            grafting.train(grafting.parse_args([*base[1:], *flags]))
        assert "\n" not in str(error.value)
        return str(error.value)

    torch.save({"method": "moco"}, tmp_path / "moco.pt")
    message = refused("--mae-ckpt", str(tmp_path / "moco.pt"))
    assert message.startswith("--mae-ckpt") and "not a mae.py checkpoint" in message
    assert "drop the flag" in refused("--mae-ckpt", mae_run, "--model-dims", "64,2,4")
    assert refused("--mae-ckpt", str(tmp_path / "missing.pt")) == \
        f"MAE checkpoint {str(tmp_path / 'missing.pt')!r} does not exist"
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # refused before any run folder


@pytest.mark.slow
def test_docstring_smoke_chain_runs_as_written(tmp_path, cli):
    """The two smoke commands of the header docstring (mae.py, then grafting.py on its checkpoint),
    run as printed from an empty folder."""
    import shlex
    lines = [l for l in grafting.__doc__.splitlines() if "--data fake" in l]
    assert len(lines) == 2 and "mae.py" in lines[0] and "grafting.py" in lines[1]
    for line in lines:
        argv = shlex.split(line.split("#")[0].strip())[1:]
        cli(os.path.join(os.path.dirname(grafting.__file__), argv[0]), *argv[1:], "--num-workers", "0", cwd=str(tmp_path))
    state = torch.load(tmp_path / "runs" / "mae-smoke" / "checkpoint.pt", weights_only=True)
    assert state["method"] == "mae"
    runs = [d for d in os.listdir(tmp_path / "runs") if d.startswith("grafting-")]
    assert len(runs) == 1 and torch.load(tmp_path / "runs" / runs[0] / "checkpoint.pt", weights_only=True)["step"] == 10
