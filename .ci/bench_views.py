"""Per-core speed of the CPU side of every method's views: ours (`train_transform(args)`, what a data
worker runs) against the official recipe's torchvision / PIL transforms, on the same photographs,
side by side in one process on one thread, JPEG decoding included; then the cost per image of our
device side (`device_views`), measured on the CPU as an upper bound.

    python .ci/bench_views.py --data data/imagenet-sample --images 100 --rounds 3

The official pipelines are written out here from each official repository's transform code
(MAE main_pretrain.py, MoCo v3 main_moco.py and moco/loader.py, SimSiam main_simsiam.py, MSN
src/data_manager.py, CMAE's ShiftPixel pipeline, ConMIM datasets.py, grafting = MoCo v3's). Each
round times ours and the official one after the other on the same images; the table gives the
median over rounds. Prints a Markdown table and writes its JSON next to it with --out.
"""
import argparse
import importlib
import json
import os
import random
import statistics
import sys
import time

import torch
import torchvision.transforms as T
from PIL import Image, ImageFilter, ImageOps

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)
NORMALIZE = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
BICUBIC = T.InterpolationMode.BICUBIC


class PILBlur:
    """The official GaussianBlur of MoCo v3 / SimSiam / MSN / ConMIM: PIL's filter, radius ~ U(0.1, 2)."""

    def __init__(self, p):
        self.p = p

    def __call__(self, img):
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0))) if random.random() < self.p else img


class PILSolarize:
    def __init__(self, p):
        self.p = p

    def __call__(self, img):
        return ImageOps.solarize(img) if random.random() < self.p else img


def colour(jitter, blur_p, solarize_p=0.0):
    return [T.RandomApply([T.ColorJitter(*jitter)], p=0.8), T.RandomGrayscale(p=0.2), PILBlur(blur_p),
            PILSolarize(solarize_p)]


def official(method):
    """The official CPU pipeline of one image: a function PIL image -> list of normalised tensors."""
    finish = [T.ToTensor(), NORMALIZE]
    if method == "mae":
        t = T.Compose([T.RandomResizedCrop(224, scale=(0.2, 1.0), interpolation=BICUBIC), T.RandomHorizontalFlip(), *finish])
        return lambda img: [t(img)]
    if method in ("moco", "grafting"):
        v1 = T.Compose([T.RandomResizedCrop(224, scale=(0.08, 1.0)), *colour((0.4, 0.4, 0.2, 0.1), 1.0),
                        T.RandomHorizontalFlip(), *finish])
        v2 = T.Compose([T.RandomResizedCrop(224, scale=(0.08, 1.0)), *colour((0.4, 0.4, 0.2, 0.1), 0.1, 0.2),
                        T.RandomHorizontalFlip(), *finish])
        return lambda img: [v1(img), v2(img)]
    if method == "simsiam":
        v = T.Compose([T.RandomResizedCrop(224, scale=(0.2, 1.0)), *colour((0.4, 0.4, 0.4, 0.1), 0.5),
                       T.RandomHorizontalFlip(), *finish])
        return lambda img: [v(img), v(img)]
    if method == "msn":
        full = T.Compose([T.RandomResizedCrop(224, scale=(0.3, 1.0)), T.RandomHorizontalFlip(),
                          *colour((0.4, 0.4, 0.4, 0.1), 0.5), *finish])
        focal = T.Compose([T.RandomResizedCrop(96, scale=(0.05, 0.3)), T.RandomHorizontalFlip(),
                           *colour((0.4, 0.4, 0.4, 0.1), 0.5), *finish])
        return lambda img: [full(img), full(img)] + [focal(img) for _ in range(10)]
    if method == "cmae":
        base = T.Compose([T.RandomResizedCrop(256, scale=(0.2, 1.0), interpolation=BICUBIC), T.RandomHorizontalFlip()])
        target_colour, fin = T.Compose(colour((0.4, 0.4, 0.4, 0.1), 0.5)), T.Compose(finish)

        def cmae_views(img):
            b = base(img)
            dy, dx = random.randint(0, 31), random.randint(0, 31)
            return [fin(b.crop((0, 0, 224, 224))), fin(target_colour(b.crop((dx, dy, dx + 224, dy + 224))))]
        return cmae_views
    if method == "conmim":
        geometry = T.Compose([T.RandomHorizontalFlip(), T.RandomResizedCrop(224, scale=(0.08, 1.0), interpolation=BICUBIC)])
        strong, fin = T.Compose(colour((0.4, 0.4, 0.2, 0.1), 0.1, 0.2)), T.Compose(finish)

        def conmim_views(img):
            crop = geometry(img)
            return [fin(crop), fin(strong(crop))]
        return conmim_views
    raise ValueError(method)


def ours(method):
    module = importlib.import_module(method)
    args = module.Args(recipe="imagenet")
    module.apply_recipe(args)  # the ImageNet recipe: 224 px (MSN: 96-px focal views)
    return module, args, module.train_transform(args)


def pil_loader(path):
    """torchvision's ImageFolder loader, which every official pipeline reads with."""
    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


def images_per_second(read, fn, paths):
    t = time.perf_counter()
    for path in paths:
        fn(read(path))  # decoding included, as a data worker does it
    return len(paths) / (time.perf_counter() - t)


def device_ms_per_image(module, args, transform, paths, batch=32):
    """Our device side on this CPU (one thread): colour and normalisation of a collated batch."""
    items = []
    for path in (paths * batch)[:batch]:
        items.append(transform(module.read_image(path)))
    collated = module.collate(items)
    module.device_views(collated, args)  # warm-up
    t = time.perf_counter()
    module.device_views(collated, args)
    return 1000 * (time.perf_counter() - t) / batch


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/imagenet-sample", help="a folder of photographs (ImageNet layout)")
    parser.add_argument("--images", type=int, default=100, help="images per timing")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; the median is reported")
    parser.add_argument("--methods", default="mae,moco,simsiam,msn,cmae,conmim,grafting")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    a = parser.parse_args()
    import mae
    paths = [p for p, _ in mae.find_images(os.path.join(a.data, "train") if os.path.isdir(os.path.join(a.data, "train")) else a.data)[0]]
    paths = paths[:a.images]
    for path in paths:  # read every file once, so that neither pipeline pays for a cold disk cache
        open(path, "rb").read()
    rows = []
    print(f"torch {torch.__version__}, 1 thread, {len(paths)} images from {a.data}, {a.rounds} rounds")
    for method in a.methods.split(","):
        module, args, transform = ours(method)
        reference = official(method)
        mine, theirs = [], []
        for r in range(a.rounds):
            random.seed(r)
            torch.manual_seed(r)
            mine.append(images_per_second(module.read_image, transform, paths))
            theirs.append(images_per_second(pil_loader, reference, paths))
        row = {"method": method, "ours_img_per_s": statistics.median(mine), "official_img_per_s": statistics.median(theirs),
               "ratio": statistics.median(m / t for m, t in zip(mine, theirs)),
               "device_ms_per_img_cpu": device_ms_per_image(module, args, transform, paths)}
        rows.append(row)
        print(f"{method}: ours {row['ours_img_per_s']:.0f} img/s, official {row['official_img_per_s']:.0f} img/s, "
              f"ratio {row['ratio']:.2f}, device side on this CPU {row['device_ms_per_img_cpu']:.1f} ms/img", flush=True)
    print("\n| method | views | ours, CPU side, img/s per core | official, img/s per core | ratio | our device side on the CPU, ms per image |")
    print("| --- | --- | --- | --- | --- | --- |")
    views = {"mae": "1 x 224", "moco": "2 x 224", "grafting": "2 x 224", "simsiam": "2 x 224",
             "msn": "2 x 224 + 10 x 96", "cmae": "2 x 224 (shifted)", "conmim": "2 x 224 (one crop)"}
    for row in rows:
        print(f"| {row['method']} | {views[row['method']]} | {row['ours_img_per_s']:.0f} | {row['official_img_per_s']:.0f} | "
              f"**{row['ratio']:.2f}x** | {row['device_ms_per_img_cpu']:.1f} |")
    # the device-side resample of CMAE and ConMIM against PIL's resize, on crops of these photographs
    import cmae
    diffs = []
    for k, path in enumerate(paths[:20]):
        img = cmae.read_image(path)
        torch.manual_seed(k)
        i, j, h, w = T.RandomResizedCrop.get_params(img, (0.2, 1.0), (3 / 4, 4 / 3))
        crop = img.crop((j, i, j + w, i + h))
        d = (cmae.resample([T.functional.pil_to_tensor(crop)], 224)[0].float()
             - T.functional.pil_to_tensor(crop.resize((224, 224), resample=3)).float()).abs()
        diffs.append((d.mean().item(), d.max().item()))
    print(f"\nresample() against PIL's bicubic resize, {len(diffs)} crops to 224 px: mean |difference| "
          f"{statistics.mean(m for m, _ in diffs):.2f} grey levels, largest {max(x for _, x in diffs):.0f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"torch": torch.__version__, "images": len(paths), "rounds": a.rounds, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
