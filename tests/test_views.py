"""The input pipeline (issue #15): the CPU side hands over uint8 crops and per-sample colour
parameters; the device side applies colour jitter, grayscale, blur and solarize to the whole batch.
Checked here: every op equals torchvision's functional op at a fixed parameter, the parameters are
drawn per sample from torchvision's distributions, probabilities hold within sampling error, all
probabilities 0 is the identity, and the data-wait share and .ci/benchmark.py --data-pipeline work."""
import json
import math

import pytest
import torch
import torchvision.transforms.functional as TF

import moco
import msn

torch.manual_seed(0)
IMGS = torch.rand(6, 3, 20, 24)  # float images in [0, 1]
IMGS_U8 = (IMGS * 255).round().to(torch.uint8)


def params(n, **columns):
    """(n, 13) parameters with only the given columns set: jitter order brightness, contrast, saturation, hue."""
    p = torch.zeros(n, 13)
    p[:, 5:9] = torch.arange(4.0)  # the identity order
    p[:, 1:4] = 1.0                # factors 1 = unchanged
    for column, value in columns.items():
        p[:, int(column[1:])] = value
    return p


# ---------------------------------------------------------------- each op against torchvision's
@pytest.mark.parametrize("op_index, factor, reference", [
    (0, 1.3, TF.adjust_brightness), (0, 0.6, TF.adjust_brightness),
    (1, 1.4, TF.adjust_contrast), (1, 0.7, TF.adjust_contrast),
    (2, 1.5, TF.adjust_saturation), (2, 0.0, TF.adjust_saturation),
    (3, 0.1, TF.adjust_hue), (3, -0.07, TF.adjust_hue), (3, 0.5, TF.adjust_hue),
])
def test_each_jitter_op_equals_torchvision(op_index, factor, reference):
    ours = moco.JITTER_OPS[op_index](IMGS, torch.full((6,), factor))
    theirs = torch.stack([reference(img, factor) for img in IMGS])
    assert torch.allclose(ours, theirs, atol=2e-6), (ours - theirs).abs().max()


def test_hue_of_grays_and_pure_colours():
    grays = torch.linspace(0, 1, 5).view(5, 1, 1, 1).expand(5, 3, 2, 2)
    assert torch.allclose(moco.adjust_hue(grays, torch.full((5,), 0.3)), grays)  # no hue to rotate
    red = torch.tensor([1.0, 0, 0]).view(1, 3, 1, 1)
    assert torch.allclose(moco.adjust_hue(red, torch.tensor([1 / 3])), torch.tensor([0, 1.0, 0]).view(1, 3, 1, 1))


@pytest.mark.parametrize("sigma, kernel", [(0.1, 5), (1.0, 5), (2.0, 7), (1.3, 3)])
def test_blur_equals_torchvision(sigma, kernel):
    ours = moco.gaussian_blur(IMGS, torch.full((6,), sigma), kernel)
    theirs = TF.gaussian_blur(IMGS, [kernel, kernel], [sigma, sigma])
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_grayscale_and_solarize_equal_torchvision():
    out = moco.colour_augment(IMGS_U8, params(6, c9=1.0), kernel_size=5)
    assert torch.allclose(out, TF.rgb_to_grayscale(IMGS_U8.float() / 255, 3), atol=1e-6)
    out = moco.colour_augment(IMGS_U8, params(6, c12=1.0), kernel_size=5)
    assert torch.equal(out, TF.solarize(IMGS_U8.float() / 255, 128 / 255))
    # and as the official PIL ImageOps.solarize does it on the 8-bit values: v >= 128 -> 255 - v
    assert torch.equal((out * 255).round().to(torch.uint8), torch.where(IMGS_U8 >= 128, 255 - IMGS_U8, IMGS_U8))


def test_jitter_in_a_drawn_order_equals_torchvision_in_that_order():
    p = params(6, c0=1.0)
    p[:, 1:5] = torch.tensor([1.2, 0.8, 1.3, 0.05])
    p[:, 5:9] = torch.tensor([3.0, 1.0, 0.0, 2.0])  # hue, contrast, brightness, saturation
    ours = moco.colour_augment(IMGS_U8, p, kernel_size=5)
    x = IMGS_U8.float() / 255
    theirs = TF.adjust_saturation(TF.adjust_brightness(TF.adjust_contrast(TF.adjust_hue(x, 0.05), 0.8), 1.2), 1.3)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_every_probability_zero_is_the_identity():
    colour = moco.Colour(jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)
    torch.manual_seed(1)
    p = torch.stack([colour.draw(224) for _ in range(6)])
    assert torch.equal(moco.colour_augment(IMGS_U8, p, kernel_size=5), IMGS_U8.float() / 255)


# ---------------------------------------------------------------- the parameters' distributions
def draws(colour, n=4000, img_size=224):
    torch.manual_seed(0)
    return torch.stack([colour.draw(img_size) for _ in range(n)])


def within_sampling_error(flags, p):
    n = len(flags)
    return abs(flags.mean().item() - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-9


@pytest.mark.parametrize("colour", [moco.Colour(**moco.MOCO_COLOURS[0]), moco.Colour(**moco.MOCO_COLOURS[1]),
                                    moco.Colour(jitter=(0.4, 0.4, 0.4, 0.1), blur_p=0.5)])
def test_probabilities_and_ranges_match_torchvision(colour):
    p = draws(colour)
    assert within_sampling_error(p[:, 0], colour.jitter_p)     # RandomApply(ColorJitter), p 0.8
    assert within_sampling_error(p[:, 9], colour.gray_p)       # RandomGrayscale(0.2)
    assert within_sampling_error(p[:, 10], colour.blur_p)      # RandomApply(GaussianBlur)
    assert within_sampling_error(p[:, 12], colour.solarize_p)  # RandomSolarize
    b, c, s, h = colour.jitter
    for column, (low, high) in zip((1, 2, 3, 4), ((1 - b, 1 + b), (1 - c, 1 + c), (1 - s, 1 + s), (-h, h))):
        values = p[:, column]
        assert low <= values.min() and values.max() <= high
        assert values.min() < low + 0.02 * (high - low) and values.max() > high - 0.02 * (high - low)  # the whole range
        assert abs(values.mean() - (low + high) / 2) < 0.02 * (high - low)  # uniform: centred
    sigma = p[:, 11]
    assert 0.1 <= sigma.min() and sigma.max() <= 2.0 and abs(sigma.mean() - 1.05) < 0.03  # U(0.1, 2.0) at 224
    orders = p[:, 5:9]
    assert torch.equal(orders.sort(dim=1).values, torch.arange(4.0).expand(len(p), 4))  # a permutation each
    assert len({tuple(o.tolist()) for o in orders}) == 24  # all 24 orders occur


def test_parameters_are_per_sample_and_follow_the_sample_seed():
    """Every sample of a batch gets its own parameters (not one per batch), drawn under its own seed:
    the same image at the same (epoch, position) gets the same views in any batch, on any worker."""
    from PIL import Image
    args = moco.Args(img_size=32, crop_min_scale=0.08)
    dataset = moco.Augmented([(Image.new("RGB", (40, 40), (200, 100, 50)), 0)] * 8, moco.train_transform(args))
    batch = torch.utils.data.default_collate([dataset[(i, 1000 + i)][0] for i in range(8)])
    crops, p = batch
    assert crops[0].dtype == torch.uint8 and crops[0].shape == (8, 3, 32, 32) and p.shape == (8, 2, 13)
    assert len({tuple(row.tolist()) for row in p[:, 0]}) == 8  # eight different draws
    again = dataset[(3, 1003)][0]
    assert torch.equal(again[1], p[3]) and torch.equal(again[0][0], crops[0][3])
    out = moco.device_views(batch, args)
    assert len(out) == 2 and out[0].shape == (8, 3, 32, 32) and out[0].dtype == torch.float32


def test_blur_scales_with_the_image():
    p = draws(moco.Colour(blur_p=1.0), n=500, img_size=32)
    assert p[:, 11].max() <= 2.0 * 32 / 224 and moco.blur_kernel_size(32) == 5 and moco.blur_kernel_size(224) == 23


# ---------------------------------------------------------------- seeing whether a run is data-bound
def test_log_reports_the_data_wait_share(tmp_path):
    import mae
    args = mae.Args(data="fake", device="cpu", model_dims="32,1,2", decoder_dim=32, decoder_depth=1, decoder_heads=2,
                    batch_size=4, steps=4, log_every=2, num_workers=0, vis_every=0, out_dir=str(tmp_path), run_name="w")
    mae.train(args)
    records = [r for r in map(json.loads, open(tmp_path / "w" / "log.jsonl")) if "train/loss" in r]
    assert all(0 < r["train/data_wait"] < 1 for r in records)


def test_logger_share_is_the_waited_fraction_of_the_window(tmp_path, capsys, monkeypatch):
    import mae
    clock = iter([0.0, 10.0])
    monkeypatch.setattr(mae.time, "perf_counter", lambda: next(clock))
    logger = mae.Logger(str(tmp_path), total_steps=10, batch_size=4, start_step=0)
    logger.waited = 2.5
    logger.log(5, 0, 1.0, 1e-3, {}, 10.0)
    assert "data wait 25%" in capsys.readouterr().out
    assert json.loads(open(tmp_path / "log.jsonl").read())["train/data_wait"] == 0.25 and logger.waited == 0.0


@pytest.mark.parametrize("workers", ["0", "2"])
def test_benchmark_data_measures_the_loader_and_the_device_side(cli, tmp_path, workers):
    out = cli(".ci/benchmark.py", "msn", "--data-pipeline", "--data", "fake", "--device", "cpu", "--batch-size", "8",
              "--focal-views", "2", "--steps", "3", "--num-workers", workers, "--out-dir", str(tmp_path)).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["loader_img_per_s"] > 0 and result["device_views_img_per_s"] > 0
    assert result["loader_img_per_s_per_worker"] == pytest.approx(result["loader_img_per_s"] / max(int(workers), 1))
    assert "per worker" in out and not list(tmp_path.iterdir())  # no run folder


def test_msn_views_sizes_on_the_device():
    args = msn.Args(img_size=32, patch_size=4, focal_size=16, focal_views=2)
    from PIL import Image
    crops, p = msn.train_transform(args)(Image.new("RGB", (50, 40)))
    assert [c.shape[-1] for c in crops] == [32, 32, 16, 16] and p.shape == (4, 13)


def test_grafting_mtl_views_two_coloured_and_one_plain_all_normalised():
    import grafting
    from PIL import Image
    args = grafting.Args(img_size=32, mode="mtl", crop_min_scale=0.08)
    crops, p = grafting.train_transform(args)(Image.new("RGB", (40, 40), (200, 100, 50)))
    assert len(crops) == 3 and p.shape == (3, 13) and not p[2].any()  # the MIM view draws no colour
    batch = ([c[None] for c in crops], p[None])
    views = grafting.device_views(batch, args)
    assert torch.equal(views[2], grafting.normalize(crops[2][None].float() / 255))  # MAE's view: only normalised
    assert torch.equal(views[0], grafting.normalize(grafting.colour_augment(crops[0][None], p[None, 0], 5)))


def test_collate_keeps_crops_of_different_sizes_as_a_list():
    import mae
    same = [(([torch.zeros(3, 4, 4)], torch.ones(2)), 1), (([torch.ones(3, 4, 4)], torch.ones(2)), 2)]
    (crops, params), labels = mae.collate(same)
    assert crops[0].shape == (2, 3, 4, 4) and params.shape == (2, 2) and torch.equal(labels, torch.tensor([1, 2]))
    mixed = [((torch.zeros(3, 5, 4), torch.ones(2)), 1), ((torch.ones(3, 4, 6), torch.ones(2)), 2)]
    (crops, params), labels = mae.collate(mixed)
    assert isinstance(crops, list) and [c.shape for c in crops] == [(3, 5, 4), (3, 4, 6)] and params.shape == (2, 2)
