"""Issue #31: a laptop run learns on any folder of images, in the same minutes. The CPU recipe is sized in images
seen (plan()), not in epochs of one data set; on the CPU, bf16 autocast and torch.compile left at auto are chosen
by timing them (cpu_step_probe()), and the probe leaves the run exactly as it would be without it; JPEG photographs
much larger than the crops are decoded at a fraction of their size (read_image()), never below what a crop needs."""
import functools
import importlib
import json
import math

import pytest
import torch

METHODS = ["mae", "msn", "cmae", "conmim", "simsiam", "moco", "grafting"]


@pytest.mark.parametrize("method", METHODS)
def test_the_cpu_recipe_sees_the_same_images_on_a_data_set_of_any_size(method):
    module = importlib.import_module(method)
    plans = []
    for n in (500, 50_000, 1_281_167):
        args = module.Args(data="fake", device="cpu")
        module.apply_recipe(args)
        batch, budget = args.batch_size, module.RECIPES["cpu"]["images"]
        steps_per_epoch, total, warmup, _ = module.plan(args, n, batch)
        assert steps_per_epoch == n // batch
        assert abs(total * batch - budget) <= batch  # the budget, to within one batch
        assert args.epochs == pytest.approx(budget / (steps_per_epoch * batch))  # many epochs of 500, a few % of 1.28 M
        assert abs(warmup - total / 10) <= 1  # a tenth of the run
        assert abs(round(args.knn_every * steps_per_epoch) - total / 5) <= 1  # the monitor: 5 times, whatever the size
        plans.append(total)
    assert len(set(plans)) == 1


def test_epochs_images_and_steps_override_the_recipe_in_that_order():
    import mae

    def planned(n=50_000, **flags):
        args = mae.Args(data="fake", device="cpu", **flags)
        mae.apply_recipe(args)
        return mae.plan(args, n, args.batch_size)[1], args

    total, args = planned(epochs=2)  # --epochs wins over the CPU recipe's budget
    assert total == 2 * (50_000 // 128) and args.images is None and args.knn_every == 1.0
    total, args = planned(images=25_600, recipe="cifar10")  # --images wins over a recipe sized in epochs
    assert total == 100 and args.epochs == pytest.approx(25_600 / (195 * 256))
    total, _ = planned(epochs=2, images=25_600)  # both given: --epochs
    assert total == 2 * 390
    total, _ = planned(steps=7)  # --steps: the schedule of the budget compressed into 7 steps
    assert total == 7
    with pytest.raises(mae.DataError, match="--images must be more than 0"):
        planned(images=-5)


def fake_clock(module, args, monkeypatch, seconds):
    """The probe's timer, made to report seconds(args) for each timed call (the steps still run)."""
    def timed(fn, n, device):
        for _ in range(n):
            fn()
        return seconds(args)
    monkeypatch.setattr(module, "timed", timed)


def tiny(module, tmp_path, name, **flags):
    base = dict(data="fake", device="cpu", model_dims="32,2,2", patch_size=4, batch_size=8, steps=3, num_workers=0,
                log_every=1, knn_every=0, out_dir=str(tmp_path), run_name=name)  # patch 4 for all (MoCo v3's recipe: 8)
    small = dict(mae=dict(decoder_dim=16, decoder_depth=1, decoder_heads=2, vis_every=0),
                 cmae=dict(decoder_dim=16, decoder_depth=1, decoder_heads=2, vis_every=0, proj_hidden=32, proj_dim=16),
                 msn=dict(hidden_dim=32, proj_dim=16, num_prototypes=16, focal_views=1),
                 conmim=dict(mlp_dim=32, proj_dim=16), simsiam=dict(proj_dim=32, pred_dim=16),
                 moco=dict(mlp_dim=32, proj_dim=16),
                 grafting=dict(mode="mtl", mlp_dim=32, proj_dim=16, decoder_dim=16, decoder_depth=1, decoder_heads=2))
    return module.Args(**{**base, **small[module.METHOD], **flags})


def run(module, args):
    path = module.train(args)
    losses = [r["train/loss"] for r in map(json.loads, open(path.replace("checkpoint.pt", "log.jsonl"))) if "train/loss" in r]
    return losses, torch.load(path, weights_only=True)


@pytest.mark.parametrize("method", METHODS)
def test_the_probe_leaves_the_run_as_it_would_be_without_it(method, tmp_path, monkeypatch, capsys):
    """fp32 timed faster than bf16: the probe runs both (so it steps the model, the optimizer and the RNG), then puts
    everything back; the run is bit for bit the one with --no-amp --no-compile."""
    module = importlib.import_module(method)
    plain_losses, plain = run(module, tiny(module, tmp_path, "plain", amp=False, compile=False))
    args = tiny(module, tmp_path, "probed")
    fake_clock(module, args, monkeypatch, lambda a: 100.0 if a.amp else 60.0)  # 3 steps x 60 s: worth a probe
    probed_losses, probed = run(module, args)
    out = capsys.readouterr().out
    assert "cpu step probe: fp32 60.00 s, bf16 100.00 s per step -> bf16=False compile=False" in out
    assert probed_losses == plain_losses
    assert all(torch.equal(probed["model"][k], v) for k, v in plain["model"].items())
    assert torch.equal(probed["rng"]["torch"], plain["rng"]["torch"])


@pytest.fixture
def aot_eager(monkeypatch):
    """torch.compile with the aot_eager backend (no C++ compiler, seconds), as tests/test_compile.py does."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("method", ["mae", "moco"])
def test_the_probe_takes_bf16_and_compile_only_where_they_were_faster(method, tmp_path, monkeypatch, capsys, aot_eager):
    module = importlib.import_module(method)
    fp32, _ = run(module, tiny(module, tmp_path, "fp32", amp=False, compile=False))

    args = tiny(module, tmp_path, "bf16")  # bf16 faster, the run too short to compile: bf16, eager
    fake_clock(module, args, monkeypatch, lambda a: 50.0 if a.amp else 60.0)
    bf16, ckpt = run(module, args)
    assert "-> bf16=True compile=False (compile: tried for runs of 30 min or more)" in capsys.readouterr().out
    assert ckpt["args"]["amp"] and not ckpt["args"]["compile"]
    assert bf16[0] == pytest.approx(fp32[0], rel=4e-3)  # the same weights: bf16 rounding only (2^-8 = 0.4%)
    assert bf16 == pytest.approx(fp32, rel=0.05)  # after two updates, a little apart

    args = tiny(module, tmp_path, "both", steps=40)  # a long run: compile is tried, and kept when faster
    fake_clock(module, args, monkeypatch, lambda a: 10.0 if a.compile else 50.0 if a.amp else 60.0)
    _, ckpt = run(module, args)
    assert "-> bf16=True compile=True" in capsys.readouterr().out and ckpt["args"]["compile"]

    args = tiny(module, tmp_path, "slow-compile", steps=40)  # tried and slower: back to eager
    fake_clock(module, args, monkeypatch, lambda a: 90.0 if a.compile else 50.0 if a.amp else 60.0)
    _, ckpt = run(module, args)
    assert "compiled 90.00 s per step -> bf16=True compile=False" in capsys.readouterr().out
    assert not ckpt["args"]["compile"]


def test_a_short_run_is_not_probed(tmp_path, capsys):
    import mae
    run(mae, tiny(mae, tmp_path, "short"))
    out = capsys.readouterr().out
    assert "cpu step probe" not in out and "bf16=False compile=False" in out


def test_large_jpegs_are_decoded_smaller_but_never_below_what_the_crops_need(tmp_path):
    import mae
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    photo = (torch.rand(3, 600, 800, generator=g) * 255).to(torch.uint8)
    Image.fromarray(photo.permute(1, 2, 0).numpy()).save(tmp_path / "big.jpg", quality=90)
    Image.fromarray(photo.permute(1, 2, 0).numpy()).save(tmp_path / "big.png")
    args = mae.Args(data="fake", device="cpu")
    mae.apply_recipe(args)
    transform = mae.train_transform(args)
    side = mae.decode_side(transform)
    assert side == pytest.approx(32 / math.sqrt(0.2 * 3 / 4))  # the smallest crop: 20% of the area at 3:4
    img = mae.read_image(str(tmp_path / "big.jpg"), side)
    assert img.size == (100, 75) and math.sqrt(img.width * img.height) >= side  # 1/8 of 800 x 600, in the DCT
    assert mae.read_image(str(tmp_path / "big.jpg")).size == (800, 600)  # without a side: full size
    assert mae.read_image(str(tmp_path / "big.png"), side).size == (800, 600)  # only JPEGs have a draft mode
    crop = transform.transforms[0]
    for _ in range(500):  # every crop the view can take of the smaller image is still at least 32 px
        _, _, h, w = crop.get_params(img, crop.scale, crop.ratio)
        assert min(h, w) >= 32
    for method in METHODS:  # each method's views name their crops; the ImageNet recipes at 224 px need full size
        module = importlib.import_module(method)
        gpu = module.Args(data="fake", device="cpu", recipe="imagenet")
        module.apply_recipe(gpu)
        assert module.decode_side(module.train_transform(gpu)) > math.sqrt(500 * 375)
