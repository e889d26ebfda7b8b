"""
evaluate.py: frozen-feature evaluation of any checkpoint that a method file here wrote.

    python evaluate.py --ckpt runs/<run>/checkpoint.pt --data cifar10            # kNN + linear probe
    python evaluate.py --ckpt runs/<run>/checkpoint.pt --data cifar10 --random-init   # the baseline
    python evaluate.py --ckpt runs/<run>/checkpoint.pt --data imagenet/ --pool mean --encoder target

The encoder's shape comes from the checkpoint (its "encoder_config"); --encoder picks the weights
where a method keeps two (online / target, REFERENCE §8; the default is the one the method's
official code evaluates). Features are computed once, from centre crops without augmentation,
for the train split and the val (or test) split of --data. Then:

  kNN     weighted k-NN on L2-normalised features (DINO / InstDisc, REFERENCE §8.2): the k = 20
          nearest training features by cosine similarity s vote for their class with weight
          exp(s / T), T = 0.07; k = 10 and 200 are reported too.
  linear  a linear probe in the MAE style (REFERENCE §8.1): BatchNorm without affine parameters
          (eps 1e-6), then Linear, trained with SGD on the frozen features.

--random-init evaluates an untrained encoder of the same shape: every self-supervised number must
beat it. Results print as a table and are written as JSON next to the checkpoint.

Deviations from the official probes: the linear probe trains on cached centre-crop features (no
random-resized-crop augmentation, SGD with momentum instead of LARS), so it runs in seconds; its
numbers are a consistent yardstick for comparing checkpoints here, not a reproduction of the
papers' 90-epoch augmented probes.
"""
# ---------------------------------------------------------------- imports
import argparse
import ast
import dataclasses
import inspect
import json
import math
import os
import sys
import time
import types
import typing
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T

from vit import ViT


# ---------------------------------------------------------------- config
@dataclass
class Args:
    ckpt: str = ""
    """checkpoint.pt written by mae.py, msn.py, ... (or its run folder)"""
    data: str = "cifar10"
    """'cifar10', 'fake', or a folder with train/ and val/ (or test/) folders of class folders"""
    encoder: str = "default"
    """which weights: 'online', 'target' (EMA / momentum / slow encoder), or 'default' (the method's official choice)"""
    pool: str = "cls"
    """read-out: 'cls' token after the final norm, or 'mean' of the patch tokens (often better for MIM encoders)"""
    random_init: bool = False
    """evaluate a freshly initialised encoder of the checkpoint's shape instead of its weights: the baseline"""
    protocols: str = "knn,linear"
    """comma-separated protocols to run: knn, linear"""
    knn_k: int = 20
    """neighbours that vote in the kNN classifier (also reported: 10 and 200)"""
    knn_t: float = 0.07
    """temperature T of the kNN vote weight exp(s / T)"""
    linear_epochs: int = 100
    """epochs of the linear probe over the cached training features"""
    linear_lr: float = 0.1
    """SGD lr of the linear probe at batch 256 (scaled linearly with --linear-batch-size), cosine-decayed"""
    linear_batch_size: int = 1024
    """mini-batch of the linear probe"""
    batch_size: int = 256
    """images per forward pass when computing features"""
    max_train_images: int = 0
    """use only this many training images (a fixed random subset; 0 = all), for quick checks"""
    seed: int = 0
    """seeds the random-init encoder, the subset and the linear probe"""
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    """'cuda' or 'cpu'"""
    amp: bool = True
    """bf16 autocast for feature extraction (CUDA only)"""
    num_workers: int = min(8, os.cpu_count() or 1)
    """data-loading processes"""
    out: str = ""
    """where to write the JSON results (default: next to the checkpoint, eval-<encoder>-<pool>[-random].json)"""


# ==== SHARED: argument parsing, identical in every method file and in evaluate.py ====
def parse_args(argv=None):
    """Build one --kebab-case flag per Args field; the docstring under each field is its --help."""
    fields = ast.parse(inspect.getsource(Args)).body[0].body
    helps = {a.target.id: b.value.value for a, b in zip(fields, fields[1:])
             if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)}
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Args):
        flag, kind = "--" + f.name.replace("_", "-"), f.type
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # "int | None" -> int
            kind = next(t for t in typing.get_args(kind) if t is not type(None))
        default_text = "from the recipe" if f.default is None else f.default
        help_text = f"{helps.get(f.name, '')} (default: {default_text})".replace("%", "%%")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=f.default, help=help_text)
    return Args(**vars(parser.parse_args(argv)))
# ==== end SHARED ====


# ---------------------------------------------------------------- data
# ==== SHARED: datasets, identical in every method file and in evaluate.py ====
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet statistics, used by every method


class DataError(Exception):
    """A problem to report as one line, without a traceback: bad input (a missing folder, an
    unreadable image, a checkpoint of another method) or a run that diverged or collapsed."""


def find_images(root):
    """(path, label) pairs and class names for a folder of class folders, or a flat folder (label -1)."""
    if not os.path.isdir(root):
        raise DataError(f"data folder {root!r} does not exist")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    samples = []
    for label, name in enumerate(classes):
        for folder, _, files in sorted(os.walk(os.path.join(root, name), followlinks=True)):
            samples += [(os.path.join(folder, f), label) for f in sorted(files) if f.lower().endswith(IMAGE_EXTS)]
    if not classes:  # a flat folder of unlabeled images
        samples = [(os.path.join(root, f), -1) for f in sorted(os.listdir(root)) if f.lower().endswith(IMAGE_EXTS)]
    if not samples:
        raise DataError(f"no images ({', '.join(IMAGE_EXTS)}) found in {root!r}")
    return samples, classes


class ImageFiles(torch.utils.data.Dataset):
    def __init__(self, root):
        self.root = root
        self.samples, self.classes = find_images(root)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        try:
            with open(path, "rb") as f:
                from PIL import Image  # torchvision depends on Pillow
                return Image.open(f).convert("RGB"), label  # grayscale and RGBA become RGB
        except Exception as e:
            raise DataError(f"cannot read image {path}: {e}") from None


class FakeImages(torch.utils.data.Dataset):
    """Synthetic images with structure, for smoke runs and tests: a smooth random colour field plus
    stripes whose orientation and frequency depend on the class (10 classes)."""

    def __init__(self, n, size=32, num_classes=10):
        self.n, self.size, self.classes = n, size, [f"class{c}" for c in range(num_classes)]

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        label = i % len(self.classes)
        field = torch.rand(1, 3, 4, 4, generator=g)
        field = torch.nn.functional.interpolate(field, size=(self.size, self.size), mode="bilinear")[0]
        yy, xx = torch.meshgrid(torch.arange(self.size), torch.arange(self.size), indexing="ij")
        angle = math.pi * (label % 5) / 5
        wave = torch.sin((xx * math.cos(angle) + yy * math.sin(angle)) * (0.3 + 0.3 * (label // 5)))
        img = (0.6 * field + 0.4 * (wave + 1) / 2).clamp(0, 1)
        return T.functional.to_pil_image(img), label


def build_dataset(data, split="train", img_size=32):
    """The unaugmented (PIL image, label) dataset for --data, split 'train' or 'val'."""
    if data == "fake":
        return FakeImages(1000 if split == "train" else 200, size=img_size)
    if data == "cifar10":
        root = os.environ.get("CIFAR10_ROOT", os.path.join("data", "cifar10-torchvision"))
        try:
            ds = torchvision.datasets.CIFAR10(root, train=(split == "train"), download=True)
        except Exception as e:
            raise DataError(f"could not download CIFAR-10 into {root} ({type(e).__name__}: {e}); without a "
                            "network, pass --data PATH to a folder of images, e.g. CIFAR-10 as JPEGs") from None
        return ds
    # a folder: ImageNet layout (train/ and val/ or test/), or itself the training set
    names = ["train"] if split == "train" else ["val", "test"]
    for name in names:
        if os.path.isdir(os.path.join(data, name)):
            return ImageFiles(os.path.join(data, name))
    if split == "train":
        return ImageFiles(data)
    raise DataError(f"{data!r} has no val/ or test/ folder of labelled images to evaluate on")


def peek_image_size(data):
    """(width, height) of the first image, to pick a recipe without listing a whole data set."""
    if data in ("fake", "cifar10"):
        return (32, 32)
    if not os.path.isdir(data):
        raise DataError(f"data folder {data!r} does not exist (--data takes 'cifar10', 'fake' or a folder)")
    for folder, dirs, files in os.walk(data, followlinks=True):
        dirs.sort()
        for f in sorted(files):
            if f.lower().endswith(IMAGE_EXTS):
                from PIL import Image
                try:
                    with Image.open(os.path.join(folder, f)) as im:
                        return im.size
                except Exception as e:
                    raise DataError(f"cannot read image {os.path.join(folder, f)}: {e}") from None
    raise DataError(f"no images ({', '.join(IMAGE_EXTS)}) found in {data!r}")


def eval_transform(img_size):
    """Centre crop, no augmentation: resize to img_size/0.875 then crop (224 -> 256 -> 224) for
    large images; small images (CIFAR) are only resized to img_size."""
    resize = round(img_size / 0.875) if img_size >= 96 else img_size
    return T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(img_size),
                      T.ToTensor(), T.Normalize(MEAN, STD)])


class Augmented(torch.utils.data.Dataset):
    """Applies a transform under a per-sample seed, so every augmentation is a function of
    (run seed, epoch, position in the epoch): the same with any number of workers and after --resume."""

    def __init__(self, base, transform):
        self.base, self.transform = base, transform

    def __len__(self):
        return len(self.base)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, item)
        img, label = self.base[index]
        with torch.random.fork_rng(devices=[]):  # leaves the caller's RNG untouched
            torch.manual_seed(seed)
            return self.transform(img), label


class EpochSampler(torch.utils.data.Sampler):
    """Shuffles with a generator seeded by (seed, epoch) and yields (index, augmentation seed).
    set_epoch(epoch, skip) starts an epoch, skipping the first `skip` samples (those done before a resume)."""

    def __init__(self, n, seed):
        self.n, self.seed, self.epoch, self.skip = n, seed, 0, 0

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip

    def __len__(self):
        return self.n - self.skip

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        seeds = torch.randint(0, 2**62, (self.n,), generator=g).tolist()
        yield from zip(order[self.skip:], seeds[self.skip:])
# ==== end SHARED ====


# ---------------------------------------------------------------- encoder
def load_encoder(path, which="default", random_init=False, seed=0):
    """The ViT a checkpoint describes, with the weights --encoder names (or fresh ones).
    Returns (encoder, info) where info names the method, step and weights used."""
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.pt")
    if not os.path.isfile(path):
        raise DataError(f"checkpoint {path!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DataError(f"cannot load checkpoint {path}: {e}") from None
    if not isinstance(ckpt, dict) or "encoder" not in ckpt or "encoder_config" not in ckpt:
        raise DataError(f"{path} has no 'encoder' and 'encoder_config': it was not written by a method file here")
    which = ckpt.get("default_encoder", "online") if which == "default" else which
    key = {"online": "encoder", "target": "target_encoder"}.get(which)
    if key is None:
        raise DataError(f"--encoder must be 'online', 'target' or 'default', not {which!r}")
    if key not in ckpt:
        raise DataError(f"{path} ({ckpt.get('method')}) keeps no {which} encoder; use --encoder online")
    torch.manual_seed(seed)
    encoder = ViT(**ckpt["encoder_config"])
    if not random_init:
        try:
            encoder.load_state_dict(ckpt[key])
        except RuntimeError as e:
            raise DataError(f"the {which} weights in {path} do not fit its encoder_config: {str(e).splitlines()[0]}") from None
    info = {"checkpoint": path, "method": ckpt.get("method"), "step": ckpt.get("step"),
            "encoder": which, "random_init": random_init, "encoder_config": ckpt["encoder_config"]}
    return encoder, info


@torch.no_grad()
def extract_features(encoder, dataset, pool, device, amp, batch_size, num_workers):
    """Frozen features (N, D) in fp32 on the CPU and labels (N,), in dataset order."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         pin_memory=device.type == "cuda")
    encoder.eval()
    feats, labels = [], []
    for images, y in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            feats.append(encoder(images.to(device, non_blocking=True), pool=pool).float().cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(labels)


# ---------------------------------------------------------------- protocols
@torch.no_grad()
def knn_predict(train_f, train_y, test_f, k=20, T=0.07, num_classes=None, chunk=512):
    """Weighted kNN (Wu et al. 2018; DINO eval_knn): among the k training features most cosine-similar
    to a test feature, class c scores sum_{i in top-k, y_i = c} exp(s_i / T); predict the argmax.
    Returns (N_test,) predicted labels."""
    num_classes = num_classes or int(train_y.max()) + 1
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    preds = []
    for start in range(0, len(test_f), chunk):
        sims = test_f[start:start + chunk] @ train_f.T                      # (n, N_train) cosine similarities
        top_s, top_i = sims.topk(min(k, len(train_f)), dim=1)               # (n, k)
        votes = torch.zeros(len(sims), num_classes)
        votes.scatter_add_(1, train_y[top_i], (top_s / T).exp())            # class score = sum of exp(s/T)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def linear_probe(train_f, train_y, test_f, test_y, epochs=100, lr=0.1, batch_size=1024, seed=0, device="cpu"):
    """MAE-style linear probe on frozen features: BatchNorm1d(affine=False, eps=1e-6) then Linear
    (weight ~ trunc_normal(0.01), bias 0), SGD momentum 0.9, no weight decay, cosine lr per step.
    Returns test top-1 accuracy in %."""
    g = torch.Generator().manual_seed(seed)
    num_classes = int(train_y.max()) + 1
    head = nn.Sequential(nn.BatchNorm1d(train_f.shape[1], affine=False, eps=1e-6),
                         nn.Linear(train_f.shape[1], num_classes)).to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    peak = lr * batch_size / 256
    optimizer = torch.optim.SGD(head.parameters(), lr=peak, momentum=0.9, weight_decay=0.0)
    train_f, train_y = train_f.to(device), train_y.to(device)
    steps_per_epoch = max(1, len(train_f) // batch_size)
    total = epochs * steps_per_epoch
    for step in range(total):
        if step % steps_per_epoch == 0:
            order = torch.randperm(len(train_f), generator=g).to(device)
        idx = order[(step % steps_per_epoch) * batch_size:][:batch_size]
        for group in optimizer.param_groups:
            group["lr"] = peak * 0.5 * (1 + math.cos(math.pi * step / total))
        loss = F.cross_entropy(head(train_f[idx]), train_y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    head.eval()
    with torch.no_grad():
        preds = head(test_f.to(device)).argmax(dim=1).cpu()
    return 100.0 * (preds == test_y).float().mean().item()


# ---------------------------------------------------------------- main
def evaluate(args):
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda was asked for but no GPU is visible; use --device cpu")
    if not args.ckpt:
        raise DataError("--ckpt is required: a checkpoint.pt written by one of the method files")
    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    unknown = set(protocols) - {"knn", "linear"}
    if unknown:
        raise DataError(f"unknown protocol(s) {sorted(unknown)}; choose from knn, linear")
    if args.pool not in ("cls", "mean"):
        raise DataError(f"--pool must be 'cls' or 'mean', not {args.pool!r}")
    encoder, info = load_encoder(args.ckpt, args.encoder, args.random_init, args.seed)
    encoder.to(device)
    img_size = info["encoder_config"]["img_size"]

    # features of centre crops, no augmentation
    t0 = time.perf_counter()
    feats = {}
    for split in ("train", "val"):
        dataset = build_dataset(args.data, split, img_size)
        if isinstance(dataset, ImageFiles) and not dataset.classes:
            raise DataError(f"{dataset.root} has no class folders: evaluation needs labelled images")
        dataset = Augmented(dataset, eval_transform(img_size))
        if split == "train" and args.max_train_images and args.max_train_images < len(dataset):
            keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed))
            dataset = torch.utils.data.Subset(dataset, keep[:args.max_train_images].tolist())
        feats[split] = extract_features(encoder, dataset, args.pool, device, args.amp, args.batch_size, args.num_workers)
    (train_f, train_y), (test_f, test_y) = feats["train"], feats["val"]
    print(f"features: {len(train_f)} train, {len(test_f)} val, dim {train_f.shape[1]}, "
          f"pool {args.pool}, {time.perf_counter() - t0:.0f} s")

    results = dict(info, data=args.data, pool=args.pool, n_train=len(train_f), n_val=len(test_f))
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    if "knn" in protocols:
        for k in sorted({args.knn_k, 10, 200}):
            preds = knn_predict(train_f, train_y, test_f, k, args.knn_t, num_classes)
            results[f"knn_top1_k{k}"] = 100.0 * (preds == test_y).float().mean().item()
        results["knn_top1"] = results[f"knn_top1_k{args.knn_k}"]
    if "linear" in protocols:
        results["linear_top1"] = linear_probe(train_f, train_y, test_f, test_y, args.linear_epochs, args.linear_lr,
                                              args.linear_batch_size, args.seed, device)

    weights = "random init" if args.random_init else f"{info['encoder']} encoder, step {info['step']}"
    print(f"\n| checkpoint | method | weights | pool | kNN top-1 (k={args.knn_k}) | linear top-1 |")
    print("|---|---|---|---|---|---|")
    knn_text = f"{results['knn_top1']:.2f}" if "knn_top1" in results else "-"
    lin_text = f"{results['linear_top1']:.2f}" if "linear_top1" in results else "-"
    print(f"| {info['checkpoint']} | {info['method']} | {weights} | {args.pool} | {knn_text} | {lin_text} |")
    out = args.out or os.path.join(os.path.dirname(info["checkpoint"]),
                                   f"eval-{info['encoder']}-{args.pool}{'-random' if args.random_init else ''}.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nwrote {out}")
    return results


if __name__ == "__main__":
    try:
        evaluate(parse_args())
    except DataError as e:  # raised in a DataLoader worker, it carries the worker's traceback: keep the last line
        sys.exit("error: " + str(e).strip().splitlines()[-1].removeprefix("DataError: "))
