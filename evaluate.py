"""
evaluate.py: every evaluation protocol the seeds name, for any checkpoint a method file here wrote
(or published weights), with label efficiency first.

    python evaluate.py --ckpt runs/<run>/checkpoint.pt --data cifar10                  # kNN + linear probe
    python evaluate.py --ckpt runs/<run>/checkpoint.pt --data cifar10 --random-init    # the baseline
    python evaluate.py --ckpt runs/<run>/checkpoint.pt --data cifar10 --protocols all  # every protocol below
    python evaluate.py --ckpt runs/a/checkpoint.pt runs/b/checkpoint.pt --with-random-init --protocols knn,fewshot
    python evaluate.py --weights mae_pretrain_vit_base.pth --data imagenet/ --pool mean   # published weights
    python evaluate.py --ckpt runs/<run>/checkpoint.pt --data fake --device cpu --protocols all --finetune-epochs 1   # seconds

The encoder's shape comes from the checkpoint (its "encoder_config"); --encoder picks the weights
where a method keeps two (online / target, REFERENCE §8; the default is the one the method's
official code evaluates). Frozen features are computed once per read-out, from centre crops without
augmentation, for the train split and the val (or test) split of --data, and shared by:

  knn        weighted k-NN on L2-normalised features (DINO's eval_knn.py, InstDisc; none of the seven
             repositories has one): the k = 20 nearest training features by cosine similarity s vote
             for their class with weight exp(s / T), T = 0.07; k = 10 and 200 are reported too.
  linear     MAE's linear probe (main_linprobe.py): BatchNorm without affine parameters (eps 1e-6),
             then Linear (trunc-normal 0.01). Two recipes:
             --linear-recipe fast (default): on the cached centre-crop features, SGD momentum 0.9,
               base lr 0.1 x batch / 256, batch 1,024, 100 epochs, cosine, no warm-up, no weight decay,
               the last epoch's accuracy. Seconds instead of hours; not MAE's numbers.
             --linear-recipe official: MAE's recipe on the images: RandomResizedCrop (bicubic) + flip
               every epoch, LARS (trust 0.001, momentum 0.9, our own short optimizer, as MAE's
               util/lars.py), base lr 0.1 x batch / 256, batch 16,384 by gradient accumulation over
               --batch-size chunks (each chunk's BatchNorm statistics its own, as MAE's accum_iter),
               10 warm-up epochs, 90 epochs, wd 0. Reports the last epoch's accuracy and, labelled as
               selected on the evaluation set, the best (MAE prints the best).
  fewshot    label efficiency, MSN's logistic_eval.py (REFERENCE §8.3): 1, 2 and 5 labelled images per
             class and 1% and 10% of the labels, three fixed random subsets each (saved under
             --subsets-dir, so every checkpoint sees the same images), or MSN's own subset lists
             (--subsets FILE ...). MSN's read-out (the last block's CLS before the final norm,
             --fewshot-pool cls-prenorm) and resize (bilinear, 256 -> crop 224); cyanure's
             preprocess(normalize=True, columns=False, centering=True): each feature row minus its
             own mean, then L2-normalised, on the labelled and the test features separately;
             multinomial logistic regression, L2 penalty lambda = 2.5e-4 / n, no intercept. Fitted
             full-batch with torch's L-BFGS instead of cyanure: the objective and lambda are MSN's,
             and the optimum matches cyanure's (REFERENCE §8.3). Mean and std over the subsets.
  kmeans     clustering: k-means (k = number of classes, k-means++ seeding, best of 3 restarts) on
             the L2-normalised val features; NMI and ARI against the labels (scikit-learn's
             definitions, computed here).
  tsne       a PNG scatter of a t-SNE embedding of 2,000 val features coloured by class, with a
             legend; needs the optional scikit-learn and matplotlib (skipped with a message).
  finetune   MAE's fine-tuning recipe (main_finetune.py, REFERENCE §8.4) on the images: mean pooling
             and a fresh LayerNorm, the position table trained from the checkpoint's, AdamW,
             layer-wise lr decay (0.65 for base, 0.75 otherwise), drop-path, mixup / cutmix, label
             smoothing, RandAugment, random erasing, warm-up and cosine; bf16 and torch.compile on
             CUDA; checkpoints every --save-minutes and --resume.
  pretext    the method's own objective on --pretext-images val images it did not train on, views
             and masks from fixed seeds, through the method file named in the checkpoint (its
             build_model() and pretext_metrics()): the loss, and what each method can read off it
             (MoCo v3: how often the positive key ranks first; MSN: how often an anchor and its
             target pick the same prototype; SimSiam: the collapse monitor; CMAE: both terms); MAE
             and CMAE also draw their reconstructions of 8 of those images.
  robustness kNN and linear top-1 on the val images under common corruptions (Hendrycks & Dietterich
             2019), built from torch / torchvision / PIL ops: Gaussian noise, Gaussian blur,
             contrast, brightness, JPEG, pixelation, severities 1 to 5 (ImageNet-C's levels; the
             blur's sigma is CIFAR-10-C's scaled with the image, the pixelation is in blocks of 2 to
             6 pixels), against the clean training features, and the mean relative to clean.
             Not the published ImageNet-C / CIFAR-10-C files: the same kinds of damage, made here.
  --transfer-data PATH  generalisation: kNN and linear probe of the same frozen encoder on another
             labelled data set.
  attention  what the encoder looks at: for 8 val images of 8 classes, the last block's attention from
             the CLS token to every patch, per head and averaged over the heads, over each image (the
             patch grid upsampled by nearest neighbour), and each head's entropy relative to uniform.
  retrieval  for the same 8 images, the --retrieval-k nearest training images under the kNN protocol's
             features and cosine metric, labelled with their classes (another class framed in red), and
             the share of them with the query's class.
  curves     the kNN monitor of every run given in one figure, from each run's log.jsonl, against
             minutes and against images seen (drawn whenever several checkpoints are given).

Every checkpoint a method file wrote records what its training cost (wall-clock, device-hours,
steps, images, img/s, peak memory); it is printed before the accuracies and shown in the table.
--random-init evaluates an untrained encoder of the same shape: every self-supervised number must
beat it. Results print as a Markdown table and are written as JSON (and, for several checkpoints or
several protocols, a Markdown file) next to the checkpoint.

Other differences from the official protocols: fine-tuning draws RandAugment from torchvision (fixed
magnitude 9, no magnitude noise) and mixup / cutmix from our own 15 lines (timm's defaults: one of
the two per batch, p = 0.5 each). These numbers are a consistent yardstick for comparing checkpoints
here; at the papers' scale the official recipes (--linear-recipe official, --subsets) apply.
"""
# ---------------------------------------------------------------- imports
import argparse
import ast
import atexit
import dataclasses
import inspect
import itertools
import json
import math
import multiprocessing
import os
import random
import signal
import sys
import time
import typing
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T

from vit import SIZES, ViT, knn_predict, nearest

PROTOCOLS = ("knn", "linear", "fewshot", "kmeans", "tsne", "finetune", "pretext", "robustness", "attention", "retrieval",
             "curves")
METHOD_FILES = ("mae", "msn", "cmae", "conmim", "simsiam", "moco", "grafting")


# ---------------------------------------------------------------- config
@dataclass
class Args:
    ckpt: tuple[str, ...] = ()
    """one or more checkpoint.pt files written by mae.py, msn.py, ... (or their run folders); several are evaluated side by side"""
    weights: tuple[str, ...] = ()
    """instead of --ckpt: encoder state dicts in timm or official format (MAE, MoCo v3, MSN, ...; prefixes such as module., encoder., base_encoder. are handled); the shape is read from the weights"""
    heads: int = 0
    """attention heads for --weights (not stored in a state dict); 0 = the standard for its width (192: 3, 384: 6, 768: 12, 1024: 16)"""
    img_size: int = 224
    """input size for --weights (the position table is resized if it was trained at another size)"""
    data: str = "cifar10"
    """'cifar10', 'fake', or a folder with train/ and val/ (or test/) folders of class folders"""
    encoder: str = "default"
    """which weights: 'online', 'target' (EMA / momentum / slow encoder), or 'default' (the method's official choice)"""
    pool: str = "cls"
    """read-out of the frozen protocols: 'cls' token after the final norm, 'mean' of the patch tokens (often better for MIM encoders), or 'cls-prenorm': the last block's CLS before the final norm (MSN's few-shot read-out, forward_blocks(x, 1))"""
    random_init: bool = False
    """evaluate a freshly initialised encoder of the checkpoint's shape instead of its weights: the baseline"""
    with_random_init: bool = False
    """also evaluate an untrained encoder of the first checkpoint's shape, as one more row of the table"""
    protocols: str = "knn,linear"
    """comma-separated protocols: knn, linear, fewshot, kmeans, tsne, finetune, or 'all' (--protocol all works too)"""
    knn_k: int = 20
    """neighbours that vote in the kNN classifier (also reported: 10 and 200)"""
    knn_t: float = 0.07
    """temperature T of the kNN vote weight exp(s / T)"""
    retrieval_k: int = 5
    """nearest training images per query in the retrieval protocol's picture (the kNN protocol's features and metric)"""
    linear_recipe: str = "fast"
    """'fast': the probe on cached centre-crop features, SGD (seconds); 'official': MAE's main_linprobe.py on the images, RandomResizedCrop + flip every epoch, LARS, 10 warm-up epochs (minutes to hours: every epoch runs the encoder)"""
    linear_epochs: int | None = None
    """epochs of the linear probe (fast: 100; official: 90, MAE's)"""
    linear_lr: float = 0.1
    """base lr of the linear probe at batch 256, scaled linearly with --linear-batch-size, cosine-decayed (fast: SGD; official: LARS, MAE's blr 0.1)"""
    linear_batch_size: int | None = None
    """batch of the linear probe (fast: 1024; official: MAE's 16384, reached by gradient accumulation over --batch-size images)"""
    fewshot_shots: str = "1,2,5"
    """labelled images per class of the few-shot protocol (MSN: 1, 2, 5)"""
    fewshot_fractions: str = "0.01,0.1"
    """fractions of the labels, taken class by class (1% and 10%)"""
    fewshot_subsets: int = 3
    """random subsets per setting; the table shows mean and std over them"""
    fewshot_pool: str = "cls-prenorm"
    """read-out of the few-shot protocol: MSN's logistic_eval.py reads the last block's CLS before the final norm ('cls-prenorm'); 'same' uses --pool"""
    subsets: tuple[str, ...] = ()
    """few-shot subset lists in MSN's format (one training image file name per line, e.g. n01440764_10026.JPEG; MSN ships imagenet_subsets1..3/1imgs_class.txt etc.), scored instead of random subsets; files of the same name in different folders are one setting (mean and std)"""
    subsets_dir: str = "runs/subsets"
    """where the few-shot subsets are saved (one file of training indices each) and reused, so every checkpoint is scored on the same images"""
    logreg_lambda: float = 2.5e-4
    """L2 penalty of the few-shot logistic regression, divided by the number of labelled images (MSN's cyanure setting: 2.5e-4 / n)"""
    logreg_iters: int = 300
    """L-BFGS iterations of the few-shot logistic regression"""
    kmeans_restarts: int = 3
    """k-means runs from different k-means++ seeds; the one with the lowest inertia is scored"""
    tsne_points: int = 2000
    """val images in the t-SNE picture"""
    corruptions: str = "gaussian_noise,gaussian_blur,contrast,brightness,jpeg,pixelate"
    """the common corruptions of the robustness protocol, each at severities 1 to 5"""
    transfer_data: tuple[str, ...] = ()
    """other labelled data sets (folders with train/ and val/, or 'cifar10', 'fake'): kNN and linear probe of the same frozen encoder there (generalisation)"""
    pretext_images: int = 512
    """val images of the pretext protocol (the method's own objective on images it did not train on); at most --max-val-images"""
    finetune_epochs: int = 100
    """fine-tuning epochs (MAE: 100 for ViT-B)"""
    finetune_blr: float = 5e-4
    """fine-tuning base lr at batch 256; lr = blr x batch / 256 (MAE: 5e-4 at batch 1024 with the same rule)"""
    finetune_batch_size: int = 256
    """fine-tuning batch (MAE: 1024)"""
    finetune_warmup_epochs: float = 5
    """linear lr warm-up before the cosine decay (MAE: 5), at most half of the run"""
    finetune_min_lr: float = 1e-6
    """lr at the end of the cosine decay"""
    finetune_weight_decay: float = 0.05
    """AdamW weight decay, not on biases, norms, CLS and positions"""
    layer_decay: float = 0.0
    """layer-wise lr decay: block i of L learns at lr x decay^(L + 1 - i); 0 = 0.65 for a base-width ViT (768), 0.75 otherwise (MAE, REFERENCE §8.4)"""
    drop_path: float = 0.1
    """stochastic depth rate of the last block while fine-tuning, rising linearly from 0 (MAE: 0.1)"""
    mixup: float = 0.8
    """mixup alpha (0 turns it off)"""
    cutmix: float = 1.0
    """cutmix alpha (0 turns it off); with both on, each batch uses one of the two"""
    label_smoothing: float = 0.1
    """label smoothing of the fine-tuning targets"""
    randaug_magnitude: int = 9
    """RandAugment magnitude, 2 ops per image (MAE: rand-m9-mstd0.5); 0 turns it off"""
    random_erasing: float = 0.25
    """probability of random erasing after normalisation (MAE: 0.25)"""
    compile: bool | None = None
    """torch.compile the fine-tuned model (auto: on with CUDA, off on CPU)"""
    resume: bool = False
    """continue an interrupted fine-tuning from its eval-<encoder>-<pool>[-random]-finetune.pt next to the checkpoint"""
    stop_after: int = 0
    """end fine-tuning after this many steps, saving its checkpoint (the schedule still spans all epochs); continue with --resume"""
    save_minutes: float = 10.0
    """minutes between fine-tuning checkpoints; one is also written at the end and on Ctrl-C"""
    batch_size: int = 256
    """images per forward pass when computing features"""
    max_train_images: int = 0
    """use only this many training images (a fixed random subset; 0 = all), for quick checks"""
    max_val_images: int = 0
    """use only this many val images (a fixed random subset; 0 = all); with --max-train-images it gives the subsets of a training run's kNN monitor (--knn-train / --knn-val, seed 0)"""
    seed: int = 0
    """seeds the random-init encoder, the subsets, the probes, k-means and fine-tuning"""
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    """'cuda' or 'cpu'"""
    amp: bool | None = None
    """bf16 autocast (auto: on with CUDA, off on CPU)"""
    num_workers: int = min(8, os.cpu_count() or 1)
    """data-loading processes"""
    out: str = ""
    """where to write the JSON results (default: next to the checkpoint, eval-<encoder>-<pool>[-random].json; for several checkpoints, runs/compare-<time>.json); when several checkpoints or more than two protocols are compared, a Markdown table (.md) goes next to it"""


PAPER = {}  # the method files' published values of their flags; here each protocol's help names its source

# The two sections below are the method files' own, word for word (tests/test_shared_blocks.py checks it).
# ---- argument parsing (also in evaluate.py) ----
def parse_args(argv=None):
    """One --kebab-case flag per Args field; the docstring under each field is its --help."""
    fields = ast.parse(inspect.getsource(Args)).body[0].body
    helps = {a.target.id: b.value.value for a, b in zip(fields, fields[1:])
             if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)}
    title, *paragraphs = __doc__.strip().split("\n\n")  # --help: the title, the flags, then the example commands
    examples = next((p for p in paragraphs if p.startswith(("Run:", "    python"))), "")
    parser = argparse.ArgumentParser(description=title, epilog=examples, allow_abbrev=False,  # --step is not --steps
                                     formatter_class=argparse.RawDescriptionHelpFormatter)

    def one_line_error(message):  # argparse would print the whole usage first
        raise DataError(f"{message} (--help lists them)")
    parser.error = one_line_error
    for f in dataclasses.fields(Args):
        kind = f.type
        if type(None) in typing.get_args(kind):  # "int | None" -> int
            kind = typing.get_args(kind)[0]
        default = f.default if f.default is not None else "auto" if kind is bool else "from the recipe"
        paper = f" (paper: {PAPER[f.name]})" if f.name in PAPER else ""  # the method's published value
        text = helps.get(f.name, "") + paper + ("" if "(default:" in helps.get(f.name, "") else f" (default: {default})")
        options = dict(default=f.default, help=text.replace("%", "%%"))
        if kind is bool:
            options.update(action=argparse.BooleanOptionalAction)
        elif typing.get_origin(kind) is tuple:  # "tuple[str, ...]" -> one or more values
            options.update(nargs="+", type=typing.get_args(kind)[0])
        else:
            options.update(type=kind)
        parser.add_argument("--" + f.name.replace("_", "-"), **options)
    return Args(**vars(parser.parse_args(argv)))

# ---- data (also in evaluate.py) ----
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet statistics, used by every method

def normalize(x):
    """Float images (B, 3, H, W) in [0, 1] -> (x - mean) / std per channel, on x's device."""
    return (x - torch.tensor(MEAN, device=x.device).view(3, 1, 1)) / torch.tensor(STD, device=x.device).view(3, 1, 1)

class DataError(Exception):
    """A problem reported as one line, without a traceback: bad input, or a run that diverged."""

class BadImage(DataError):
    """An image file that cannot be read (a training run saves a checkpoint before it stops)."""

def error_line(e):
    """The line to print for a DataError (raised in a data worker, its text ends with that line)."""
    return str(e).strip().splitlines()[-1].removeprefix(f"{type(e).__name__}: ")

def check_folder(root):
    if root.endswith((".tar", ".tar.gz", ".tgz")) and os.path.isfile(root):
        raise DataError(f"--data {root!r} is an archive: unpack it first (mkdir -p data && tar -xf {root} -C data) and "
                        "pass the folder it holds, or use --data cifar10, which downloads CIFAR-10")
    if os.path.isfile(root):
        raise DataError(f"--data {root!r} is a file; it takes a folder of images (or 'cifar10' or 'fake')")
    if not os.path.isdir(root):
        raise DataError(f"data folder {root!r} does not exist (--data takes 'cifar10', 'fake' or a folder)")

def walk_images(top, seen=None, avoid=()):
    """(folder, sorted image names) under top, without hidden files; through symbolic links a folder is read once (seen),
    and no folder in avoid (the root, other classes) or above one is entered: a link cannot relabel another class."""
    seen = set() if seen is None else seen
    for folder, dirs, files in os.walk(top, followlinks=True):
        real = os.path.realpath(folder)
        skip = real in seen or any(a == real or a.startswith(real + os.sep) for a in avoid)
        dirs[:] = [] if skip else sorted(d for d in dirs if not d.startswith("."))
        if not skip:
            seen.add(real)
            yield folder, sorted(f for f in files if not f.startswith(".") and f.lower().endswith(IMAGE_EXTS))

def find_images(root):
    """(path, label) pairs and class names for a folder of class folders, or a flat folder (label -1); walked at each
    call, so that a run resumed in the same process sees the folder as it is now."""
    check_folder(root)
    classes = sorted(d for d in os.listdir(root) if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))
    tops = [os.path.realpath(p) for p in [root] + [os.path.join(root, name) for name in classes]]
    seen, samples = set(), []
    for label, name in enumerate(classes):
        others = [t for t in tops if t != tops[1 + label]]
        samples += [(os.path.join(folder, f), label) for folder, files in
                    sorted(walk_images(os.path.join(root, name), seen, others)) for f in files]
    if not classes:  # a flat folder of unlabelled images
        samples = [(os.path.join(root, f), -1) for f in next(walk_images(root))[1]]
    if not samples:
        raise DataError(f"no images ({', '.join(IMAGE_EXTS)}) found in {root!r}")
    return samples, classes

class ImageFiles(torch.utils.data.Dataset):
    """(RGB PIL image, label) for every image file under root (see find_images); JPEGs decoded down to decode_side."""
    def __init__(self, root, decode_side=0):
        self.root, self.decode_side = root, decode_side
        self.samples, self.classes = find_images(root)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return read_image(self.samples[i][0], self.decode_side), self.samples[i][1]

def read_image(path, decode_side=0):
    """An RGB PIL image (16-bit grayscale scaled, not clipped); a JPEG over twice decode_side px (the geometric mean of
    its sides) is decoded at 1/2, 1/4 or 1/8 of its size in the DCT (PIL's draft mode), never below decode_side."""
    from PIL import Image  # torchvision depends on Pillow
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            shrink = decode_side / math.sqrt(img.width * img.height)
            if img.format == "JPEG" and 0 < shrink <= 0.5:
                img.draft(img.mode, (math.ceil(img.width * shrink), math.ceil(img.height * shrink)))
            img.load()
        if img.mode.startswith("I"):
            img = img.convert("I").point(lambda v: v / 256).convert("L")
        return img if img.mode == "RGB" else img.convert("RGB")
    except Exception as e:
        raise BadImage(f"cannot read image {path}: {e}") from None

class FakeImages(torch.utils.data.Dataset):
    """Synthetic images (smoke runs, tests): a smooth random colour field and stripes whose angle and frequency are the class's."""
    def __init__(self, n, size=32):
        self.n, self.size, self.classes = n, size, [f"class{c}" for c in range(10)]

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        label, angle = i % 10, math.pi * (i % 5) / 5
        field = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(i))
        field = torch.nn.functional.interpolate(field, size=(self.size, self.size), mode="bilinear")[0]
        y, x = torch.meshgrid(torch.arange(self.size), torch.arange(self.size), indexing="ij")
        wave = torch.sin((x * math.cos(angle) + y * math.sin(angle)) * (0.3 + 0.3 * (label // 5)))
        return T.functional.to_pil_image((0.6 * field + 0.4 * (wave + 1) / 2).clamp(0, 1)), label

def build_dataset(data, split="train", img_size=32):
    """The unaugmented (PIL image, label) data set for --data, split 'train' or 'val'."""
    if data == "fake":
        return FakeImages(1000 if split == "train" else 200, size=img_size)
    if data == "cifar10":
        root = os.environ.get("CIFAR10_ROOT", os.path.join("data", "cifar10-torchvision"))
        existed = os.path.isdir(root)
        try:
            return torchvision.datasets.CIFAR10(root, train=(split == "train"), download=True)
        except Exception as e:
            if not existed:  # no empty folder left behind (nor an empty data/ above it)
                try:
                    os.removedirs(root)
                except OSError:
                    pass
            raise DataError(f"could not download CIFAR-10 into {root} ({type(e).__name__}: {e}); without a "
                            "network, pass --data PATH to a folder of images, e.g. CIFAR-10 as JPEGs") from None
    for name in ["train"] if split == "train" else ["val", "test"]:  # ImageNet layout: train/ and val/ (or test/)
        if os.path.isdir(os.path.join(data, name)):
            return ImageFiles(os.path.join(data, name))
    if split == "train":  # the folder itself is the training set
        return ImageFiles(data)
    raise DataError(f"{data!r} has no val/ or test/ folder of labelled images to evaluate on")

def eval_transform(img_size, uint8=False, interpolation=T.InterpolationMode.BICUBIC):
    """Resize to img_size / 0.875 and centre-crop (256 -> 224; small images only resized): normalised floats, or uint8."""
    resize = round(img_size / 0.875) if img_size >= 96 else img_size
    crop = [T.Resize(resize, interpolation=interpolation), T.CenterCrop(img_size)]
    return T.Compose(crop + ([T.PILToTensor()] if uint8 else [T.ToTensor(), T.Normalize(MEAN, STD)]))

class Augmented(torch.utils.data.Dataset):
    """base[index] through transform under the sample's seed (EpochSampler): any number of workers or GPUs, or a resume,
    give the same augmentations."""
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
    """(index, augmentation seed) pairs shuffled by (seed, epoch) in whole global batches, each rank yielding its part in
    rank order (a step's global batch is the same on any number of GPUs); set_epoch's skip: the samples done before."""
    def __init__(self, n, seed, batch_size=1, rank=0, world=1):
        self.n, self.seed, self.epoch, self.skip = n, seed, 0, 0
        self.batch, self.rank, self.world = batch_size, rank, world

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip

    def __len__(self):  # this rank's samples left in the epoch
        return (self.n // (self.batch * self.world) * self.batch * self.world - self.skip) // self.world

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        seeds = torch.randint(0, 2**62, (self.n,), generator=g).tolist()
        step = self.batch * self.world
        for start in range(self.skip, self.n // step * step, step):
            mine = slice(start + self.rank * self.batch, start + (self.rank + 1) * self.batch)
            yield from zip(order[mine], seeds[mine])

def worker_ignores_signals(worker_id):
    """Data workers leave Ctrl-C, SIGTERM, SIGHUP (sent to the whole process group) to the main process, which saves."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)

@atexit.register
def end_workers():
    """At exit (an error, a second Ctrl-C), end the data workers still alive: they ignore the signals."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # their end is expected, not a worker failure
    for worker in multiprocessing.active_children():
        worker.kill()

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
        raise DataError(f"cannot load checkpoint {path}: not a PyTorch checkpoint, or a truncated or damaged "
                        f"one ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "encoder" not in ckpt or "encoder_config" not in ckpt:
        raise DataError(f"{path} has no 'encoder' and 'encoder_config': it was not written by a method file here "
                        "(for published weights use --weights)")
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
        check_finite_weights(encoder, path, which)
    info = {"checkpoint": path, "method": ckpt.get("method"), "step": ckpt.get("step"),
            "encoder": which, "random_init": random_init, "encoder_config": ckpt["encoder_config"],
            "efficiency": None if random_init else ckpt.get("efficiency")}  # what the training run cost
    return encoder, info


def load_weights_file(path, which="default", heads=0, img_size=224, random_init=False, seed=0):
    """A published encoder: a timm state dict, or an official checkpoint (MAE {'model': ...}, MoCo v3
    {'state_dict': 'module.base_encoder.*'}, MSN {'target_encoder': 'module.*'}, ...). The weights
    are found under the usual keys, the prefix in front of 'cls_token' is stripped (picking the
    momentum / target copy for --encoder target), heads such as 'head.*' or 'decoder*' are ignored,
    and the shape is read from the tensors. Returns (encoder, info) like load_encoder()."""
    if not os.path.isfile(path):
        raise DataError(f"weights file {path!r} does not exist")
    torch.serialization.add_safe_globals([argparse.Namespace])  # MAE's checkpoints store their args so
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DataError(f"cannot load weights {path}: not a PyTorch file, or a truncated or damaged one "
                        f"({type(e).__name__})") from None
    which = "online" if which == "default" else which
    nested = {"online": ("model", "state_dict", "encoder", "student", "online_encoder"),
              "target": ("target_encoder", "momentum_encoder", "teacher", "model_ema", "state_dict", "model")}
    if isinstance(state, dict) and not any(torch.is_tensor(v) for v in state.values()):
        key = next((k for k in nested.get(which, ()) if isinstance(state.get(k), dict)), None)
        if key is None:
            raise DataError(f"{path}: no encoder weights under {nested.get(which)} (keys: {sorted(state)[:8]})")
        state = state[key]
    if not isinstance(state, dict):
        raise DataError(f"{path} holds no state dict")
    prefixes = [k[:-len("cls_token")] for k in state if k.endswith("cls_token")]
    if not prefixes:
        raise DataError(f"{path}: no 'cls_token' among its {len(state)} tensors; not a ViT encoder")
    copies = [p for p in prefixes if any(s in p for s in ("momentum", "target", "teacher", "ema"))]
    pick = (copies or prefixes) if which == "target" else ([p for p in prefixes if p not in copies] or prefixes)
    prefix = min(pick, key=len)
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        dim, patch = state["cls_token"].shape[-1], state["patch_embed.proj.weight"].shape[-1]
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / dim
        n_pos = state["pos_embed"].shape[1]
    except (KeyError, ValueError) as e:
        raise DataError(f"{path}: not a timm-style ViT state dict (missing {e})") from None
    heads = heads or {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}.get(dim, 0)
    if not heads:
        raise DataError(f"{path}: width {dim} has no standard number of heads; pass --heads")
    grid = math.isqrt(n_pos - 1)
    if grid * grid != n_pos - 1:
        raise DataError(f"{path}: pos_embed has {n_pos} rows, not 1 + a square grid (a table without a CLS slot?)")
    config = dict(img_size=grid * patch, patch_size=patch, dim=dim, depth=depth, heads=heads, mlp_ratio=mlp_ratio,
                  in_chans=state["patch_embed.proj.weight"].shape[1], pos_embed="learnable")
    torch.manual_seed(seed)
    encoder = ViT(**config)
    if not random_init:
        wanted = encoder.state_dict().keys()
        missing = [k for k in wanted if k not in state]
        if missing:
            raise DataError(f"{path}: the encoder lacks {missing[:4]} (a model with fc_norm instead of norm?)")
        try:
            encoder.load_state_dict({k: state[k] for k in wanted})
        except RuntimeError as e:
            raise DataError(f"{path}: {str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}") from None
        check_finite_weights(encoder, path, which)
    # the model runs at --img-size: embed() resizes the position table to the input's grid
    info = {"checkpoint": path, "method": "weights", "step": None, "encoder": which, "random_init": random_init,
            "encoder_config": dict(config, img_size=img_size)}
    return encoder, info


def check_finite_weights(encoder, path, which):
    """A diverged run's NaN weights would evaluate to chance accuracy without a word: refuse them."""
    bad = [name for name, t in encoder.state_dict().items() if t.is_floating_point() and not t.isfinite().all()]
    if bad:
        raise DataError(f"{path}: the {which} weights hold NaN or inf values ({len(bad)} tensors, e.g. {bad[0]}): "
                        "the run diverged; there is nothing to evaluate")


def labelled_splits(data, img_size):
    """The train and val datasets with one label space. A folder's labels are the indices of its
    sorted class folders, so val's classes are matched to train's by name: a val split that lacks a
    class (or names one differently) would otherwise be scored against the wrong labels."""
    train, val = build_dataset(data, "train", img_size), build_dataset(data, "val", img_size)
    for ds in (train, val):
        if isinstance(ds, ImageFiles) and not ds.classes:
            raise DataError(f"{ds.root} has no class folders: evaluation needs labelled images")
    if isinstance(train, ImageFiles) and isinstance(val, ImageFiles):
        unknown = sorted(set(val.classes) - set(train.classes))
        if unknown:
            raise DataError(f"{val.root} has {len(unknown)} class folder(s) that {train.root} lacks "
                            f"({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''}): the labels cannot be matched")
        missing = sorted(set(train.classes) - set(val.classes))
        if missing:
            print(f"note: {val.root} has no images of {len(missing)} of the {len(train.classes)} training classes "
                  f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); they are still candidate labels")
        index = {name: i for i, name in enumerate(train.classes)}
        val.samples = [(path, index[val.classes[label]]) for path, label in val.samples]
        val.classes = train.classes
    return train, val


def hms(seconds):
    """Seconds as h:mm:ss, for ETAs."""
    return f"{int(seconds // 3600)}:{int(seconds % 3600 // 60):02d}:{int(seconds % 60):02d}"


def read_out(encoder, images, pool):
    """The features of --pool: 'cls' or 'mean' after the final norm, or 'cls-prenorm', the CLS token of the last
    block before the final LayerNorm (MSN's logistic_eval.py: deit.forward_blocks(x, 1))."""
    if pool == "cls-prenorm":
        return encoder(images, pool="cls", norm=False)
    return encoder(images, pool=pool)


@torch.no_grad()
def extract_features(encoder, dataset, pool, device, amp, batch_size, num_workers, name="", progress_every=30.0):
    """Frozen features (N, D) in fp32 on the CPU and labels (N,), in dataset order. A progress line
    (images, img/s, ETA) every progress_every seconds, for long passes such as ImageNet's train split."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         pin_memory=device.type == "cuda")
    encoder.eval()
    feats, labels, done = [], [], 0
    t0 = last = time.perf_counter()
    for images, y in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            feats.append(read_out(encoder, images.to(device, non_blocking=True), pool).float().cpu())
        labels.append(torch.as_tensor(y))
        done += len(y)
        now = time.perf_counter()
        if now - last >= progress_every and done < len(dataset):
            rate = done / (now - t0)
            eta = (len(dataset) - done) / rate
            print(f"features {name}: {done:,}/{len(dataset):,} images | {rate:,.0f} img/s | "
                  f"ETA {hms(eta)}", flush=True)
            last = now
    return torch.cat(feats), torch.cat(labels)


# ---------------------------------------------------------------- frozen-feature protocols
# ---- the linear probe ----
def linear_probe(train_f, train_y, test_f, test_y, epochs=100, lr=0.1, batch_size=1024, seed=0, device="cpu"):
    """MAE-style linear probe on frozen features: BatchNorm1d(affine=False, eps=1e-6) then Linear
    (weight ~ trunc_normal(0.01), bias 0), SGD momentum 0.9, no weight decay, cosine lr per step.
    Returns test top-1 accuracy in %."""
    head = fit_linear_head(train_f, train_y, epochs, lr, batch_size, seed, device)
    return head_accuracy(head, test_f, test_y, device)


def fit_linear_head(train_f, train_y, epochs=100, lr=0.1, batch_size=1024, seed=0, device="cpu"):
    """The probe of linear_probe(), trained on cached features; returns the head (in eval mode)."""
    g = torch.Generator().manual_seed(seed)
    head = probe_head(train_f.shape[1], int(train_y.max()) + 1, seed).to(device)
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
    return head.eval()


def probe_head(dim, num_classes, seed=0):
    """MAE's linear-probe head: BatchNorm1d without affine parameters (eps 1e-6), then Linear with weights
    trunc_normal(std 0.01) and zero bias."""
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    return head


@torch.no_grad()
def head_accuracy(head, test_f, test_y, device="cpu"):
    preds = head(test_f.to(device)).argmax(dim=1).cpu()
    return 100.0 * (preds == test_y).float().mean().item()


class LARS(torch.optim.Optimizer):
    """LARS as MAE's util/lars.py uses it for the linear probe: SGD with momentum, where the step of a weight
    matrix (ndim > 1) is g' = g + wd w scaled by the trust ratio eta |w| / |g'| (1 when either norm is 0);
    biases and norm weights take g unscaled and undecayed. Then mu <- momentum mu + g', w <- w - lr mu."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                step = p.grad
                if p.ndim > 1:
                    step = step.add(p, alpha=group["weight_decay"])
                    w_norm, step_norm = p.norm(), step.norm()
                    trust = torch.where((w_norm > 0) & (step_norm > 0),
                                        group["trust_coefficient"] * w_norm / step_norm, torch.ones_like(w_norm))
                    step = step * trust
                mu = self.state[p].setdefault("mu", torch.zeros_like(p))
                mu.mul_(group["momentum"]).add_(step)
                p.add_(mu, alpha=-group["lr"])


class OneDrawResizedCrop(T.RandomResizedCrop):
    """MAE's util/crop.py (the TF / BYOL sampler): one draw of the area fraction (uniform in scale) and of the log aspect
    ratio, the crop's width and height then clamped to the image. torchvision's RandomResizedCrop redraws up to 10 times
    until the crop fits, which favours small crops on non-square photographs (mean area 0.43 against 0.52 on 500 x 375)."""
    @staticmethod
    def get_params(img, scale, ratio):
        width, height = T.functional.get_image_size(img)
        area = width * height * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = math.exp(torch.empty(1).uniform_(math.log(ratio[0]), math.log(ratio[1])).item())
        w, h = min(width, round(math.sqrt(area * aspect))), min(height, round(math.sqrt(area / aspect)))
        return torch.randint(0, height - h + 1, (1,)).item(), torch.randint(0, width - w + 1, (1,)).item(), h, w


def official_linear_probe(args, encoder, img_size, device):
    """MAE's main_linprobe.py on the images: the frozen encoder's read-out (--pool) through probe_head(), trained
    with MAE's one-draw RandomResizedCrop (bicubic) + flip every epoch, LARS at lr = blr x batch / 256 (blr
    --linear-lr, 0.1), wd 0, a linear warm-up of 10 epochs (at most half the run) then a half-cosine per step,
    cross-entropy; the batch (16384) is reached by accumulating gradients over chunks of --batch-size images (each chunk's BatchNorm
    statistics are its own, as with MAE's accum_iter). Evaluated on centre crops after every epoch.
    Returns (last epoch's top-1, best epoch's top-1), both in %."""
    torch.manual_seed(args.seed)
    train, val = labelled_splits(args.data, img_size)
    num_classes = len(train.classes)
    crop = OneDrawResizedCrop(img_size, interpolation=T.InterpolationMode.BICUBIC)
    train = Augmented(train_subset(train, args), T.Compose([crop, T.RandomHorizontalFlip(), T.ToTensor(),
                                                              T.Normalize(MEAN, STD)]))
    val = Augmented(train_subset(val, args, args.max_val_images), eval_transform(img_size))
    epochs, batch = args.linear_epochs or 90, args.linear_batch_size or 16384
    batch, chunk = min(batch, len(train)), min(args.batch_size, batch, len(train))
    accum = max(1, batch // chunk)
    head = probe_head(encoder.dim, num_classes, args.seed).to(device)
    lr = args.linear_lr * batch / 256
    optimizer = LARS(head.parameters(), lr=lr, weight_decay=0.0)
    steps_per_epoch = len(train) // (chunk * accum)
    total, warmup = epochs * steps_per_epoch, min(10 * steps_per_epoch, epochs * steps_per_epoch // 2)
    sampler = EpochSampler(len(train), args.seed)
    loader = torch.utils.data.DataLoader(train, batch_size=chunk, sampler=sampler, drop_last=True,
                                         num_workers=args.num_workers, pin_memory=device.type == "cuda")
    print(f"linear (official) | {len(train)} images | {epochs} epochs of {steps_per_epoch} steps | batch {chunk * accum} "
          f"= {accum} x {chunk} | LARS lr {lr:.3g} (blr {args.linear_lr} x {chunk * accum}/256) | warm-up {warmup} steps")
    encoder.eval()
    accs, step = [], 0
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        head.train()
        for i, (images, y) in enumerate(loader):
            if i >= steps_per_epoch * accum:
                break
            if i % accum == 0:
                progress = step / max(1, warmup) if step < warmup else \
                    0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
                for group in optimizer.param_groups:
                    group["lr"] = lr * progress
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
                feats = read_out(encoder, images.to(device), args.pool).float()
            loss = F.cross_entropy(head(feats), torch.as_tensor(y).to(device)) / accum
            loss.backward()
            if i % accum == accum - 1:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
        val_f, val_y = extract_features(encoder, val, args.pool, device, args.amp, args.batch_size, args.num_workers)
        accs.append(head_accuracy(head.eval(), val_f, val_y, device))
        print(f"linear (official) | epoch {epoch + 1}/{epochs} | val top-1 {accs[-1]:.2f} (best {max(accs):.2f})", flush=True)
    return accs[-1], max(accs)


# ---- robustness: common corruptions (Hendrycks & Dietterich 2019) built from torch / torchvision ops
CORRUPTIONS = ("gaussian_noise", "gaussian_blur", "contrast", "brightness", "jpeg", "pixelate")


def corrupt(x, name, severity):
    """An image x (3, H, W) in [0, 1] under one corruption at severity 0 (x itself) to 5. The levels are
    ImageNet-C's, except the blur, whose sigma is CIFAR-10-C's scaled with the image side, and the pixelation,
    in blocks of 2 to 6 pixels; random draws (the noise) come from the global RNG, which Augmented seeds per image."""
    if severity == 0:
        return x
    s = severity - 1
    if name == "gaussian_noise":
        return (x + torch.randn_like(x) * [0.08, 0.12, 0.18, 0.26, 0.38][s]).clamp(0, 1)
    if name == "gaussian_blur":
        sigma = [0.4, 0.6, 0.7, 0.8, 1.0][s] * x.shape[-1] / 32
        return T.functional.gaussian_blur(x, 2 * math.ceil(3 * sigma) + 1, sigma)
    if name == "contrast":  # towards each channel's mean
        mean = x.mean(dim=(-2, -1), keepdim=True)
        return ((x - mean) * [0.4, 0.3, 0.2, 0.1, 0.05][s] + mean).clamp(0, 1)
    if name == "brightness":  # + b on the HSV value, hue and saturation kept (a black pixel becomes grey b)
        b, value = [0.1, 0.2, 0.3, 0.4, 0.5][s], x.amax(dim=0, keepdim=True)
        scale = (value + b).clamp(max=1) / value.clamp(min=1e-12)
        return torch.where(value > 0, x * scale, torch.full_like(x, b)).clamp(0, 1)
    if name == "jpeg":  # PIL's encoder at ImageNet-C's qualities
        import io
        from PIL import Image
        buffer = io.BytesIO()
        T.functional.to_pil_image(x).save(buffer, format="JPEG", quality=[25, 18, 15, 10, 7][s])
        return T.functional.to_tensor(Image.open(buffer).convert("RGB"))
    if name == "pixelate":  # each block of b x b pixels replaced by its mean, b = 2 to 6
        b, (h, w) = [2, 3, 4, 5, 6][s], x.shape[-2:]
        blocks = F.avg_pool2d(x[None], b, stride=b, ceil_mode=True)
        return blocks.repeat_interleave(b, dim=-2).repeat_interleave(b, dim=-1)[0, :, :h, :w]
    raise DataError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}")


def corrupted_transform(img_size, name, severity):
    """The centre crop of eval_transform, the corruption on its [0, 1] pixels, then the normalisation."""
    resize = round(img_size / 0.875) if img_size >= 96 else img_size
    return T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(img_size),
                      T.ToTensor(), T.Lambda(lambda x: corrupt(x, name, severity)), T.Normalize(MEAN, STD)])


def class_subset(labels, per_class=0, fraction=0.0, seed=0):
    """Sorted training indices: per_class images of every class, or round(fraction x n_c) (at least
    one) of every class c, drawn with a generator seeded by `seed`."""
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten()
        n = per_class or max(1, round(fraction * len(members)))
        if n > len(members):
            raise DataError(f"class {c} has {len(members)} training images, fewer than the {n} asked for")
        picks.append(members[torch.randperm(len(members), generator=g)[:n]])
    return torch.cat(picks).sort().values


def saved_subset(folder, name, labels, per_class=0, fraction=0.0, seed=0):
    """The subset in folder/name.json, made (and saved) on first use, so that every checkpoint, in
    this run or a later one, is scored on the same labelled images."""
    path = os.path.join(folder, name + ".json")
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        if saved["n_train"] == len(labels) and saved["labels"] == labels[saved["indices"]].tolist():
            return torch.tensor(saved["indices"])
        raise DataError(f"{path} does not match this training set (delete it or pass another --subsets-dir)")
    indices = class_subset(labels, per_class, fraction, seed)
    os.makedirs(folder, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump({"n_train": len(labels), "seed": seed, "per_class": per_class, "fraction": fraction,
                   "indices": indices.tolist(), "labels": labels[indices].tolist()}, f)
    os.replace(path + ".tmp", path)
    return indices


def logistic_regression(x, y, num_classes, lam, iters=300):
    """Multinomial logistic regression without intercept, min_W mean_i CE(x_i W, y_i) + lam/2 |W|^2,
    fitted full-batch with L-BFGS (strong-Wolfe line search). Returns W (D, C)."""
    W = torch.zeros(x.shape[1], num_classes, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([W], lr=1, max_iter=iters, history_size=20, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-9, tolerance_change=1e-12)

    def objective():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ W, y) + lam / 2 * (W ** 2).sum()
        loss.backward()
        return loss
    optimizer.step(objective)
    return W.detach()


def cyanure_preprocess(x):
    """MSN's cyan.preprocess(x, normalize=True, columns=False, centering=True): each row (one image's feature) minus
    its own mean over its D values, then L2-normalised. A function of the row alone: the labelled and the test
    features are preprocessed separately and nothing is shared between them."""
    return F.normalize(x - x.mean(dim=1, keepdim=True), dim=1)


def few_shot(train_f, train_y, test_f, test_y, per_class=0, fraction=0.0, subsets=3, lam=2.5e-4, iters=300,
             folder="runs/subsets", device="cpu", subset_indices=None):
    """The MSN protocol (logistic_eval.py) on `subsets` fixed subsets (or the given lists of training indices):
    cyanure's row preprocessing of the labelled and the test features, the regression with lambda = lam / n,
    test top-1. Returns the accuracies (%)."""
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    tag = f"{per_class}shot" if per_class else f"{100 * fraction:g}pct"
    if subset_indices is None:
        subset_indices = [saved_subset(folder, f"{tag}-{s}", train_y, per_class, fraction, seed=s) for s in range(subsets)]
    test_x, accs = cyanure_preprocess(test_f.to(device)), []
    for idx in subset_indices:
        x, y = cyanure_preprocess(train_f[idx].to(device)), train_y[idx].to(device)
        W = logistic_regression(x, y, num_classes, lam / len(idx), iters)
        preds = (test_x @ W).argmax(dim=1).cpu()
        accs.append(100.0 * (preds == test_y).float().mean().item())
    return accs


def kmeans(x, k, iters=100, restarts=3, seed=0):
    """Lloyd's k-means with k-means++ seeding; of `restarts` runs, the one with the lowest inertia
    (sum of squared distances to the nearest centre). Returns the cluster of each row (N,)."""
    g = torch.Generator().manual_seed(seed)
    best, best_inertia = None, float("inf")
    for _ in range(restarts):
        centres = x[torch.randint(len(x), (1,), generator=g)]
        d2 = torch.cdist(x, centres).squeeze(1) ** 2
        for _ in range(k - 1):  # k-means++: the next centre with probability proportional to d^2
            nxt = torch.multinomial(d2 / d2.sum(), 1, generator=g)
            centres = torch.cat([centres, x[nxt]])
            d2 = torch.minimum(d2, (torch.cdist(x, x[nxt]).squeeze(1)) ** 2)
        assign = None
        for _ in range(iters):
            new = torch.cdist(x, centres).argmin(dim=1)
            if assign is not None and torch.equal(new, assign):
                break
            assign = new
            sums = torch.zeros_like(centres).index_add_(0, assign, x)
            counts = torch.bincount(assign, minlength=k).unsqueeze(1)
            centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)  # an empty cluster keeps its centre
        inertia = (torch.cdist(x, centres).min(dim=1).values ** 2).sum().item()
        if inertia < best_inertia:
            best, best_inertia = assign, inertia
    return best


def contingency(a, b):
    """n_ij = the number of items in cluster i of a and class j of b."""
    a, b = a.unique(return_inverse=True)[1], b.unique(return_inverse=True)[1]
    table = torch.zeros(int(a.max()) + 1, int(b.max()) + 1, dtype=torch.float64)
    table.index_put_((a, b), torch.ones(len(a), dtype=torch.float64), accumulate=True)
    return table


def nmi(a, b):
    """Normalised mutual information, I(a; b) / ((H(a) + H(b)) / 2) (scikit-learn's default, arithmetic)."""
    p = contingency(a, b) / len(a)
    pa, pb = p.sum(1), p.sum(0)
    nz = p > 0
    mi = (p[nz] * (p[nz] / (pa[:, None] * pb[None, :])[nz]).log()).sum()
    h = lambda q: -(q[q > 0] * q[q > 0].log()).sum()
    denom = (h(pa) + h(pb)) / 2
    return 1.0 if denom == 0 else (mi / denom).item()


def ari(a, b):
    """Adjusted Rand index (Hubert and Arabie): (sum_ij C(n_ij, 2) - E) / ((A + B) / 2 - E), with
    A = sum_i C(a_i, 2), B = sum_j C(b_j, 2), E = A B / C(n, 2)."""
    n = contingency(a, b)
    pairs = lambda t: (t * (t - 1) / 2).sum()
    index, A, B = pairs(n), pairs(n.sum(1)), pairs(n.sum(0))
    expected = A * B / (len(a) * (len(a) - 1) / 2)
    denom = (A + B) / 2 - expected
    return 1.0 if denom == 0 else ((index - expected) / denom).item()


def tsne_plot(feats, labels, path, title, points=2000, seed=0, class_names=None):
    """A t-SNE scatter of `points` features coloured by class, with a legend of the class names (up to 20),
    if scikit-learn and matplotlib are installed; otherwise returns a message saying what to install."""
    try:
        from sklearn.manifold import TSNE
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"skipped: t-SNE needs scikit-learn and matplotlib ({e}); pip install scikit-learn matplotlib"
    idx = torch.randperm(len(feats), generator=torch.Generator().manual_seed(seed))[:points]
    xy = TSNE(n_components=2, init="pca", random_state=seed).fit_transform(F.normalize(feats[idx], dim=1).numpy())
    fig, ax = plt.subplots(figsize=(6, 6))
    cmap = plt.get_cmap("tab10" if labels.max() < 10 else "tab20")
    for c in labels[idx].unique().tolist():
        at = labels[idx] == c
        name = class_names[c] if class_names and c < len(class_names) else str(c)
        ax.scatter(xy[at.numpy(), 0], xy[at.numpy(), 1], color=cmap(c % cmap.N), s=3, label=name)
    if labels.max() < 20:
        ax.legend(markerscale=4, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return path


# ---- pictures: what an encoder learned (issue #30); they need matplotlib, the numbers print without it
def pyplot():
    """matplotlib's pyplot (drawing to files), or None with a one-line note: pictures are optional."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("note: no pictures without matplotlib (pip install matplotlib); the numbers are printed")
        return None


def spread_queries(labels, n=8):
    """Positions of n images of n different classes spread over the label space (the first image of each class)."""
    classes = sorted(set(labels.tolist()))
    picked = dict.fromkeys(classes[round(i * (len(classes) - 1) / max(1, n - 1))] for i in range(min(n, len(classes))))
    return [int((labels == c).nonzero()[0]) for c in picked]


def labels_of(dataset):
    """The labels of a data set (or a subset of one) through Augmented, without reading an image."""
    indices = dataset.indices if isinstance(dataset, torch.utils.data.Subset) else range(len(dataset))
    base = (dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset).base
    if isinstance(base, ImageFiles):
        return torch.tensor([base.samples[i][1] for i in indices])
    return torch.tensor([base.targets[i] if hasattr(base, "targets") else base[i][1] for i in indices])


def shown(image):
    """A uint8 (3, H, W) tensor as an (H, W, 3) array for imshow."""
    return image.permute(1, 2, 0).numpy()


def attention_maps(encoder, images, names, path, title, device):
    """The last block's attention from the CLS token to every patch, per head and averaged over the heads, drawn over
    each image (one row per image, the image on the left), the patch grid upsampled by nearest neighbour to the image's
    pixels. images: uint8 (Q, 3, H, W); names: their classes. Returns the maps' numbers and the picture's path."""
    x = normalize(images.float().to(device) / 255)
    weights = encoder.attention(x)[:, :, 0, 1:].float().cpu()  # (Q, heads, N): CLS -> patches
    maps = weights.reshape(*weights.shape[:2], *encoder.grid)
    maps = torch.cat([maps.mean(dim=1, keepdim=True), maps], dim=1)  # column 0: the mean over heads
    up = F.interpolate(maps, size=images.shape[-2:], mode="nearest")  # (Q, 1 + heads, H, W)
    n = weights.shape[-1]
    entropy = -(weights * weights.clamp_min(1e-12).log()).sum(-1) / math.log(n)  # 1 = uniform over the patches
    print(f"attention: CLS -> {n} patches, last block, {weights.shape[1]} heads; entropy relative to uniform, per head "
          f"(mean over {len(images)} images): " + ", ".join(f"{e:.2f}" for e in entropy.mean(0).tolist()))
    result = {"entropy_per_head": entropy.mean(0).tolist(), "upsampling": "nearest"}
    plt = pyplot()
    if plt is None:
        return result
    rows, cols = len(images), up.shape[1] + 1
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.3 * rows + 0.5), squeeze=False)
    for r in range(rows):
        axes[r, 0].imshow(shown(images[r]))
        axes[r, 0].set_ylabel(names[r], fontsize=7)
        for c in range(1, cols):
            axes[r, c].imshow(shown(images[r]))
            axes[r, c].imshow(up[r, c - 1].numpy(), cmap="inferno", alpha=0.6)
        for c in range(cols):
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
    for c, name in enumerate(["image", "mean of heads"] + [f"head {h + 1}" for h in range(cols - 2)]):
        axes[0, c].set_title(name, fontsize=8)
    fig.suptitle(title + "\nattention of the CLS token to each patch, last block (nearest upsampling)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"attention: {path}")
    return {**result, "picture": path}


def retrieval_picture(queries, query_y, neighbours, neighbour_y, class_names, path, title):
    """Each query (uint8 (3, H, W)) and its nearest training images in a row, labelled with their classes; a neighbour
    of another class than its query's is framed in red."""
    plt = pyplot()
    if plt is None:
        return None
    rows, cols = len(queries), 1 + neighbours.shape[1]
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.4 * rows + 0.5), squeeze=False)
    name = (lambda y: class_names[y]) if class_names else str
    for r in range(rows):
        for c in range(cols):
            ax, y = axes[r, c], query_y[r] if c == 0 else neighbour_y[r, c - 1]
            ax.imshow(shown(queries[r] if c == 0 else neighbours[r, c - 1]))
            ax.set_xticks([])
            ax.set_yticks([])
            differs = c > 0 and y != query_y[r]
            ax.set_title(("query: " if c == 0 else f"{c}: ") + name(int(y)), fontsize=7, color="red" if differs else "black")
            for side in ax.spines.values():
                side.set(edgecolor="red" if differs else "black", linewidth=2.5 if differs else 0.5)
    fig.suptitle(title + "\nnearest training images (cosine, the kNN protocol's features); red: another class", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"retrieval: {path}")
    return path


def curves_figure(sources, path):
    """The kNN monitor of several runs in one figure, from each run's log.jsonl: top-1 against minutes and against
    images seen, one labelled line per run (a resumed run is one line: its log continues). Writes the PNG and the
    numbers it drew (a JSON next to it); returns them, with the runs that logged no monitor."""
    drawn, without = {}, []
    for source in sources:
        path_ckpt = os.path.join(source, "checkpoint.pt") if os.path.isdir(source) else source
        log = os.path.join(os.path.dirname(path_ckpt), "log.jsonl")
        ckpt = torch.load(path_ckpt, map_location="cpu", weights_only=True) if os.path.isfile(path_ckpt) else {}
        cost = ckpt.get("efficiency") or {}
        batch = cost["images_seen"] / max(1, cost["steps"]) if cost.get("steps") else None
        rows = [json.loads(line) for line in open(log)] if os.path.isfile(log) else []
        points = [(r["minutes"], r["step"] * batch if batch else None, r["knn"]) for r in rows if "knn" in r]
        method, folder = ckpt.get("method", "?"), os.path.basename(os.path.dirname(os.path.abspath(path_ckpt)))
        label = method if folder == method else f"{method}: {folder}"  # the run folder's name, after the method's
        if points:
            drawn[label] = points
        else:
            without.append(label)
    if without:
        print(f"curves: no kNN monitor in the log of {', '.join(without)}")
    for label, points in drawn.items():
        print(f"curves: {label}: kNN {points[0][2]:.2f} -> {points[-1][2]:.2f} in {points[-1][0]:.1f} min")
    result = {"runs": drawn, "without_monitor": without}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump(result, f, indent=1)
    plt = pyplot()
    if plt is None or not drawn:
        return result
    fig, (by_time, by_images) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, points in drawn.items():
        minutes, images, knn = zip(*points)
        by_time.plot(minutes, knn, marker="o", markersize=3, label=label)
        if None not in images:
            by_images.plot([i / 1000 for i in images], knn, marker="o", markersize=3, label=label)
    by_time.set(xlabel="minutes of training", ylabel="kNN top-1 (%)", title="the kNN monitor against time")
    by_images.set(xlabel="images seen (thousands)", ylabel="kNN top-1 (%)", title="against images seen")
    for ax in (by_time, by_images):
        ax.grid(alpha=0.3)
    by_images.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"curves: {path}")
    return {**result, "picture": path}


def train_subset(dataset, args, n=None):
    """The fixed random subset of --max-train-images training images (seed --seed), or all of them;
    the same images for the frozen features and for fine-tuning. n: another size (--max-val-images)."""
    n = args.max_train_images if n is None else n
    if not n or n >= len(dataset):
        return dataset
    keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed))
    return torch.utils.data.Subset(dataset, keep[:n].tolist())


def robustness(args, train_f, train_y, test_f, test_y, num_classes, features, img_size, device):
    """kNN and linear top-1 on the val images under each corruption at severities 1 to 5, against the clean
    training features (the linear head trained once, on them), and the mean accuracy relative to clean."""
    head = fit_linear_head(train_f, train_y, args.linear_epochs or 100, args.linear_lr, args.linear_batch_size or 1024,
                           args.seed, device)
    def scores(f, y):
        knn = 100.0 * (knn_predict(train_f, train_y, f, args.knn_k, args.knn_t, num_classes) == y).float().mean().item()
        return {"knn": knn, "linear": head_accuracy(head, f, y, device)}
    out = {"clean": scores(test_f, test_y)}
    for name in [c.strip() for c in args.corruptions.split(",") if c.strip()]:
        corrupt(torch.zeros(3, 4, 4), name, 1)  # an unknown name stops here, before any compute
        levels = [scores(*features("val", transform=corrupted_transform(img_size, name, s), tag=f"{name} {s}"))
                  for s in range(1, 6)]
        out[name] = {k: [level[k] for level in levels] for k in ("knn", "linear")}
        print(f"robustness {name}: kNN {' '.join(f'{a:.1f}' for a in out[name]['knn'])} | "
              f"linear {' '.join(f'{a:.1f}' for a in out[name]['linear'])} (severity 1 to 5)")
    names = [n for n in out if n != "clean"]
    for k in ("knn", "linear"):  # ImageNet-C's "relative" view: accuracy under corruption / clean accuracy
        mean = sum(sum(out[n][k]) for n in names) / (5 * len(names)) if names else float("nan")
        out[f"mean_{k}"], out[f"relative_{k}"] = mean, mean / max(out["clean"][k], 1e-9)
    print(f"robustness: mean kNN {out['mean_knn']:.2f} ({100 * out['relative_knn']:.0f}% of clean), mean linear "
          f"{out['mean_linear']:.2f} ({100 * out['relative_linear']:.0f}% of clean)")
    return out


def msn_subsets(paths, train, args):
    """MSN's subset lists (one training image file name per line, as in its imagenet_subsets*/Nimgs_class.txt)
    -> {file name: [training indices of each list]}; lists of the same file name are one setting."""
    if not isinstance(train, ImageFiles) or args.max_train_images:
        raise DataError("--subsets needs --data FOLDER with every training image (no --max-train-images)")
    where = {os.path.basename(path): i for i, (path, _) in enumerate(train.samples)}
    groups = {}
    for path in paths:
        try:
            names = [line.strip() for line in open(path) if line.strip()]
        except OSError as e:
            raise DataError(f"cannot read subset list {path}: {os.strerror(e.errno) if e.errno else e}") from None
        missing = [n for n in names if n not in where]
        if missing:
            raise DataError(f"{path}: {len(missing)} of its {len(names)} images are not in the training set "
                            f"(e.g. {missing[0]})")
        groups.setdefault(os.path.splitext(os.path.basename(path))[0], []).append(torch.tensor([where[n] for n in names]))
    return groups


def pretext(args, info, random_init, device, stem):
    """The method's own training objective on --pretext-images val images it did not train on, with the views
    and masks of fixed seeds (the same images, views and masks for every checkpoint of the method): the method
    file named in the checkpoint builds the model and scores it (its pretext_metrics())."""
    import importlib
    ckpt = torch.load(info["checkpoint"], map_location="cpu", weights_only=True)
    if not isinstance(ckpt.get("args"), dict) or ckpt.get("method") not in METHOD_FILES or "model" not in ckpt:
        print(f"pretext: skipped, {info['checkpoint']} holds only an encoder, not a method file's training run")
        return "skipped: the checkpoint holds only an encoder"
    method = importlib.import_module(ckpt["method"])  # mae.py, msn.py, ...: they import only vit.py
    margs = method.Args(**{k: v for k, v in ckpt["args"].items() if k in method.Args.__dataclass_fields__})
    margs.device, margs.amp, margs.compile = str(device), args.amp, False
    model = method.build_model(margs).to(device)
    if not random_init:
        model.load_state_dict(ckpt["model"])
    val = method.build_dataset(args.data, "val", margs.img_size)
    n = min(args.pretext_images, args.max_val_images or len(val), len(val))
    keep = torch.randperm(len(val), generator=torch.Generator().manual_seed(args.seed))[:n].tolist()
    views = method.Augmented(val, method.train_transform(margs))
    batch = min(margs.batch_size, n)
    totals, count = {}, 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for start in range(0, n - batch + 1, batch):  # whole batches: the losses with negatives depend on the batch
            items = [views[(i, 1_000_003 * args.seed + i)] for i in keep[start:start + batch]]
            crops = method.to_device(method.collate([x for x, _ in items]), device)
            torch.manual_seed(args.seed * 7919 + start)  # the masks
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
                metrics = method.pretext_metrics(model, method.device_views(crops, margs), margs)
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + float(v) * len(items)
            count += len(items)
    out = {k: v / count for k, v in totals.items()}
    out.update(images=count, batch=batch)
    if hasattr(method, "save_reconstructions"):  # MAE / CMAE: the picture of 8 of these val images
        images = torch.stack([eval_transform(margs.img_size)(val[i][0]) for i in keep[:8]]).to(device)
        title = f"{ckpt['method']}{' (random init)' if random_init else ''}: {info['checkpoint']}, step {ckpt['step']}"
        method.save_reconstructions(model, images, stem + "-pretext.png", title)
        out["picture"] = stem + "-pretext.png"
    print(f"pretext ({ckpt['method']}, {count} val images in batches of {batch}): "
          + ", ".join(f"{k} {v:.4g}" for k, v in out.items() if isinstance(v, float))
          + (f"; reconstructions: {out['picture']}" if "picture" in out else ""))
    return out


# ---------------------------------------------------------------- fine-tuning
class Classifier(nn.Module):
    """The MAE fine-tuning model: the encoder's patch tokens (without its final norm), mean-pooled,
    a fresh LayerNorm (fc_norm) and a Linear head initialised at std 2e-5."""

    def __init__(self, encoder, num_classes):
        super().__init__()
        self.encoder, self.fc_norm = encoder, nn.LayerNorm(encoder.dim, eps=1e-6)
        self.head = nn.Linear(encoder.dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)
        encoder.norm.requires_grad_(False)  # unused with mean pooling, as MAE's global_pool

    def forward(self, imgs):
        tokens = self.encoder(imgs, pool="all", norm=False)                # (B, 1 + N, D)
        return self.head(self.fc_norm(tokens[:, 1:].mean(dim=1)))


def layer_decay_groups(model, weight_decay, decay):
    """MAE's util/lr_decay.py: layer 0 = patch embedding, CLS and positions, layer i = block i,
    layer L + 1 = fc_norm and head; layer l learns at lr x decay^(L + 1 - l) (lr_scale). No weight
    decay on 1-D parameters, CLS and positions."""
    L = len(model.encoder.blocks)
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("encoder.blocks."):
            layer = int(name.split(".")[2]) + 1
        elif name.startswith(("encoder.patch_embed", "encoder.cls_token", "encoder.pos_embed")):
            layer = 0
        else:
            layer = L + 1
        wd = 0.0 if p.ndim == 1 or name in ("encoder.cls_token", "encoder.pos_embed") else weight_decay
        group = groups.setdefault((layer, wd), {"params": [], "lr_scale": decay ** (L + 1 - layer), "weight_decay": wd})
        group["params"].append(p)
    return list(groups.values())


def mix_batch(x, y, num_classes, mixup=0.8, cutmix=1.0, smoothing=0.1):
    """Soft targets for a batch: label-smoothed one-hot vectors, then (timm's defaults) mixup or
    cutmix with probability 1/2 each when both are on: every image is paired with the batch flipped,
    lam ~ Beta(alpha, alpha); cutmix pastes a box of area (1 - lam) and sets lam to the exact share
    of pixels kept. Returns (mixed images, targets (B, C), lam)."""
    targets = F.one_hot(y, num_classes).float() * (1 - smoothing) + smoothing / num_classes
    if mixup <= 0 and cutmix <= 0:
        return x, targets, 1.0
    use_cutmix = cutmix > 0 and (mixup <= 0 or torch.rand(()).item() < 0.5)
    alpha = cutmix if use_cutmix else mixup
    lam = torch.distributions.Beta(alpha, alpha).sample().item()
    if use_cutmix:
        H, W = x.shape[-2:]
        ch, cw = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
        cy, cx = torch.randint(H, ()).item(), torch.randint(W, ()).item()
        y0, y1, x0, x1 = max(cy - ch // 2, 0), min(cy + ch // 2, H), max(cx - cw // 2, 0), min(cx + cw // 2, W)
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = x.flip(0)[:, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)
    else:
        x = lam * x + (1 - lam) * x.flip(0)
    return x, lam * targets + (1 - lam) * targets.flip(0), lam


def finetune(args, encoder, info, device, ckpt_path):
    """Fine-tune a copy of the encoder with the MAE recipe and return val top-1 (%), or None when
    --stop-after ends it early. Writes ckpt_path every --save-minutes, at the end and on Ctrl-C."""
    import copy
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    img_size = info["encoder_config"]["img_size"]
    base, val = labelled_splits(args.data, img_size)
    base = train_subset(base, args)
    val = Augmented(val, eval_transform(img_size))
    augment = [T.RandomResizedCrop(img_size, interpolation=T.InterpolationMode.BICUBIC), T.RandomHorizontalFlip()]
    if args.randaug_magnitude:
        augment.append(T.RandAugment(num_ops=2, magnitude=args.randaug_magnitude))
    augment += [T.ToTensor(), T.Normalize(MEAN, STD), T.RandomErasing(p=args.random_erasing, value="random")]
    dataset = Augmented(base, T.Compose(augment))
    num_classes = len(getattr(val.base, "classes", [])) or 10
    encoder = copy.deepcopy(encoder)
    rates = [args.drop_path * i / max(len(encoder.blocks) - 1, 1) for i in range(len(encoder.blocks))]
    for block, rate in zip(encoder.blocks, rates):  # stochastic depth rising linearly to --drop-path
        block.drop_path.p = rate
    encoder.pos_embed.requires_grad_(True)  # MAE's fine-tuning model learns its position table, from the checkpoint's
    model = Classifier(encoder, num_classes).to(device)
    decay = args.layer_decay or (0.65 if encoder.dim == 768 else 0.75)
    lr = args.finetune_blr * args.finetune_batch_size / 256
    optimizer = torch.optim.AdamW(layer_decay_groups(model, args.finetune_weight_decay, decay), lr=lr,
                                  betas=(0.9, 0.999), fused=device.type == "cuda")
    train_model = torch.compile(model) if args.compile else model
    steps_per_epoch = len(dataset) // args.finetune_batch_size
    if steps_per_epoch == 0:
        raise DataError(f"{len(dataset)} training images, fewer than one fine-tuning batch of {args.finetune_batch_size}")
    total = args.finetune_epochs * steps_per_epoch
    warmup = min(round(args.finetune_warmup_epochs * steps_per_epoch), total // 2)  # short runs: at most half
    sampler = EpochSampler(len(dataset), args.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.finetune_batch_size, sampler=sampler, drop_last=True,
                                         num_workers=args.num_workers, pin_memory=device.type == "cuda",
                                         persistent_workers=args.num_workers > 0,
                                         generator=torch.Generator().manual_seed(args.seed))
    step = 0
    if args.resume and os.path.isfile(ckpt_path):
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        random.setstate(state["rng"]["python"])
        torch.set_rng_state(state["rng"]["torch"])
        step = state["step"]
        print(f"finetune | resumed from {ckpt_path} at step {step}")

    def save():
        tmp = ckpt_path + ".tmp"
        torch.save({"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "rng": {"python": random.getstate(), "torch": torch.get_rng_state()},
                    "args": dataclasses.asdict(args), "source": info["checkpoint"]}, tmp)
        os.replace(tmp, ckpt_path)

    print(f"finetune | {len(dataset)} images | {total} steps ({args.finetune_epochs} epochs, warm-up {warmup}) | "
          f"lr {lr:.2e} (blr {args.finetune_blr:.1e} x {args.finetune_batch_size}/256) | layer decay {decay} | "
          f"drop-path {args.drop_path} | mixup {args.mixup} cutmix {args.cutmix} | smoothing {args.label_smoothing}")
    stop = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: stop.append(signum))
    end = min(total, step + args.stop_after) if args.stop_after else total
    t0, step0, last_save = time.perf_counter(), step, time.monotonic()
    model.train()
    while step < end and not stop:
        epoch = step // steps_per_epoch
        sampler.set_epoch(epoch, skip=(step % steps_per_epoch) * args.finetune_batch_size)
        for images, labels in loader:
            now = lr * step / warmup if step < warmup else args.finetune_min_lr + (lr - args.finetune_min_lr) * 0.5 * (
                1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
            for group in optimizer.param_groups:
                group["lr"] = now * group["lr_scale"]
            images, labels = images.to(device, non_blocking=True), torch.as_tensor(labels).to(device)
            images, targets, _ = mix_batch(images, labels, num_classes, args.mixup, args.cutmix, args.label_smoothing)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
                logits = train_model(images)
            loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()  # soft-target CE
            if not torch.isfinite(loss):
                raise DataError(f"fine-tuning loss is {loss.item()} at step {step + 1}; try a lower --finetune-blr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step % 50 == 0 or step == end:
                ips = (step - step0) * args.finetune_batch_size / (time.perf_counter() - t0)
                eta = (total - step) * args.finetune_batch_size / max(ips, 1e-9)
                print(f"finetune | step {step}/{total} | epoch {epoch} | loss {loss.item():.4f} | lr {now:.2e} | "
                      f"{ips:.0f} img/s | ETA {hms(eta)}", flush=True)
            if time.monotonic() - last_save > 60 * args.save_minutes or step == end or stop:
                save()
                last_save = time.monotonic()
            if step == end or stop or step % steps_per_epoch == 0:
                break
    signal.signal(signal.SIGINT, previous)
    if step < total:
        print(f"finetune | stopped at step {step}/{total}; continue with --resume (checkpoint {ckpt_path})")
        return None
    val_loader = torch.utils.data.DataLoader(val, batch_size=args.batch_size, num_workers=args.num_workers)
    model.eval()
    correct = 0
    with torch.no_grad():
        for images, labels in val_loader:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
                correct += (model(images.to(device)).argmax(dim=1).cpu() == torch.as_tensor(labels)).sum().item()
    return 100.0 * correct / len(val)


# ---------------------------------------------------------------- main
def evaluate_one(args, source, kind, protocols, random_init, device):
    """Every protocol for one checkpoint or weights file; returns the results dict and writes its JSON."""
    if kind == "ckpt":
        encoder, info = load_encoder(source, args.encoder, random_init, args.seed)
    else:
        encoder, info = load_weights_file(source, args.encoder, args.heads, args.img_size, random_init, args.seed)
    encoder.to(device)
    img_size = info["encoder_config"]["img_size"]
    folder, prefix = os.path.dirname(info["checkpoint"]), ""
    if kind != "ckpt":  # next to the weights file, named after it
        prefix = os.path.splitext(os.path.basename(info["checkpoint"]))[0] + "-"
    data = os.path.basename(os.path.normpath(args.data))  # results on other data or subsets go to their own files
    if args.max_train_images or args.max_val_images:
        data += f"-{args.max_train_images or 'all'}x{args.max_val_images or 'all'}"
    stem = os.path.join(folder, f"{prefix}eval-{info['encoder']}-{args.pool}-{data}{'-random' if random_init else ''}")
    if "finetune" in protocols and not args.resume and os.path.isfile(stem + "-finetune.pt"):
        done = torch.load(stem + "-finetune.pt", map_location="cpu", weights_only=True)
        raise DataError(f"{stem}-finetune.pt already holds a fine-tuning run (step {done.get('step')}): continue it "
                        "with --resume, or move it away to fine-tune again from the start")
    results = dict(info, data=args.data, pool=args.pool)
    if info.get("efficiency"):
        print(cost_line(info["efficiency"]))
    splits, cache = labelled_splits(args.data, img_size) if set(protocols) - {"finetune", "pretext"} else None, {}

    def features(split, pool=args.pool, transform=None, tag="", data=None):
        """Frozen features of a split (centre crops, or another transform), computed once per read-out and tag."""
        key = (data, split, pool, tag)
        if key not in cache:
            pair = labelled_splits(data, img_size) if data else splits
            dataset = Augmented(pair[split == "val"], transform or eval_transform(img_size))
            dataset = train_subset(dataset, args, None if split == "train" else args.max_val_images)
            t0 = time.perf_counter()
            cache[key] = extract_features(encoder, dataset, pool, device, args.amp, args.batch_size, args.num_workers,
                                          f"{data or ''} {split} {tag}".strip())
            print(f"features: {len(cache[key][0])} {split}{' of ' + data if data else ''}{', ' + tag if tag else ''}, "
                  f"dim {cache[key][0].shape[1]}, pool {pool}, {time.perf_counter() - t0:.0f} s")
        return cache[key]

    if set(protocols) & {"knn", "linear", "kmeans", "tsne", "robustness", "retrieval"}:
        (train_f, train_y), (test_f, test_y) = features("train"), features("val")
        results.update(n_train=len(train_f), n_val=len(test_f))
        num_classes = int(max(train_y.max(), test_y.max())) + 1
    if "knn" in protocols:
        for k in sorted({args.knn_k, 10, 200}):
            preds = knn_predict(train_f, train_y, test_f, k, args.knn_t, num_classes)
            results[f"knn_top1_k{k}"] = 100.0 * (preds == test_y).float().mean().item()
        results["knn_top1"] = results[f"knn_top1_k{args.knn_k}"]
    if "linear" in protocols and args.linear_recipe == "official":
        last, best = official_linear_probe(args, encoder, img_size, device)
        results["linear_top1"], results["linear_top1_best_on_val"] = last, best
        results["linear_recipe"] = "official (MAE main_linprobe.py: images, LARS)"
    elif "linear" in protocols:
        results["linear_top1"] = linear_probe(train_f, train_y, test_f, test_y, args.linear_epochs or 100, args.linear_lr,
                                              args.linear_batch_size or 1024, args.seed, device)
        results["linear_recipe"] = "fast (cached centre-crop features, SGD)"
    if "fewshot" in protocols:  # MSN's logistic_eval.py: its read-out, its resize (bilinear), its preprocessing
        pool = args.pool if args.fewshot_pool == "same" else args.fewshot_pool
        bilinear = img_size >= 96  # small images are not resized, so the interpolation does not matter
        tag = "bilinear resize" if bilinear else ""
        transform = eval_transform(img_size, interpolation=T.InterpolationMode.BILINEAR) if bilinear else None
        (shot_f, shot_y), (query_f, query_y) = features("train", pool, transform, tag), features("val", pool, transform, tag)
        folder = os.path.join(args.subsets_dir, f"{os.path.basename(os.path.normpath(args.data))}-{len(shot_y)}")
        settings = [(f"{int(n)}shot", int(n), 0.0, None) for n in args.fewshot_shots.split(",") if n.strip()]
        settings += [(f"{100 * float(x):g}pct", 0, float(x), None) for x in args.fewshot_fractions.split(",") if x.strip()]
        if args.subsets:  # MSN's own subset lists instead of our random ones
            settings = [(f"file-{name}", 0, 0.0, lists) for name, lists in msn_subsets(args.subsets, splits[0], args).items()]
        for tag, per_class, fraction, lists in settings:
            accs = few_shot(shot_f, shot_y, query_f, query_y, per_class, fraction, args.fewshot_subsets,
                            args.logreg_lambda, args.logreg_iters, folder, device, lists)
            acc = torch.tensor(accs)
            results[f"fewshot_{tag}"] = {"mean": acc.mean().item(), "std": acc.std().item() if len(accs) > 1 else 0.0,
                                         "runs": accs, "pool": pool}
            print(f"few-shot {tag}: {acc.mean():.2f} +- {results[f'fewshot_{tag}']['std']:.2f} over {len(accs)} subsets")
    if "kmeans" in protocols:
        clusters = kmeans(F.normalize(test_f, dim=1), num_classes, restarts=args.kmeans_restarts, seed=args.seed)
        results["kmeans_nmi"], results["kmeans_ari"] = nmi(clusters, test_y), ari(clusters, test_y)
    if "tsne" in protocols:
        title = f"{info['method']}{' (random init)' if random_init else ''}, step {info['step']}: {info['checkpoint']}"
        results["tsne"] = tsne_plot(test_f, test_y, stem + "-tsne.png", title, args.tsne_points, args.seed,
                                    getattr(splits[1], "classes", None))
        print(f"t-SNE: {results['tsne']}")
    title = f"{info['method']}{' (random init)' if random_init else ''}, {info['encoder']} weights, step {info['step']}: " \
            f"{info['checkpoint']}"
    if {"attention", "retrieval"} & set(protocols):  # 8 val images of 8 classes, as in the val features' order
        val = train_subset(Augmented(splits[1], eval_transform(img_size, uint8=True)), args, args.max_val_images)
        val_y = labels_of(val)
        queries = spread_queries(val_y)
        query_images = torch.stack([val[i][0] for i in queries])
        classes = getattr(splits[1], "classes", None)
        query_names = [classes[int(val_y[i])] if classes else str(int(val_y[i])) for i in queries]
    if "attention" in protocols:
        results["attention"] = attention_maps(encoder, query_images, query_names, stem + "-attention.png", title, device)
    if "retrieval" in protocols:
        sims, neighbours = nearest(train_f, test_f[queries], args.retrieval_k)  # the kNN protocol's metric
        same = 100.0 * (train_y[neighbours] == test_y[queries, None]).float().mean().item()
        print(f"retrieval: {same:.1f}% of the {args.retrieval_k} nearest training images have the query's class "
              f"({len(queries)} queries of {len(queries)} classes)")
        shown_train = train_subset(Augmented(splits[0], eval_transform(img_size, uint8=True)), args)
        picture = retrieval_picture(query_images, test_y[queries], torch.stack(
            [torch.stack([shown_train[i][0] for i in row]) for row in neighbours.tolist()]), train_y[neighbours],
            getattr(splits[0], "classes", None), stem + "-retrieval.png", title)
        results["retrieval"] = {"k": args.retrieval_k, "queries": queries, "neighbours": neighbours.tolist(),
                                "similarities": sims.tolist(), "same_class_pct": same, "picture": picture}
    if "robustness" in protocols:
        results["robustness"] = robustness(args, train_f, train_y, test_f, test_y, num_classes, features, img_size, device)
    for data in args.transfer_data:  # generalisation: the same frozen protocols on another labelled data set
        (tr_f, tr_y), (te_f, te_y) = features("train", data=data), features("val", data=data)
        n = int(max(tr_y.max(), te_y.max())) + 1
        knn = 100.0 * (knn_predict(tr_f, tr_y, te_f, args.knn_k, args.knn_t, n) == te_y).float().mean().item()
        linear = linear_probe(tr_f, tr_y, te_f, te_y, args.linear_epochs or 100, args.linear_lr,
                              args.linear_batch_size or 1024, args.seed, device)
        results.setdefault("transfer", {})[data] = {"knn_top1": knn, "linear_top1": linear, "n_train": len(tr_f)}
        print(f"transfer to {data}: kNN top-1 {knn:.2f}, linear top-1 {linear:.2f}")
    if "pretext" in protocols:
        if kind != "ckpt":
            raise DataError("the pretext protocol needs a checkpoint written by a method file here (--ckpt)")
        results["pretext"] = pretext(args, info, random_init, device, stem)
    if "finetune" in protocols:
        results["finetune_top1"] = finetune(args, encoder, info, device, stem + "-finetune.pt")
    path = args.out if args.out and len(args.ckpt) + len(args.weights) == 1 and not args.with_random_init else stem + ".json"
    results = merged_with_earlier(path, results)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    results["json"] = path
    return results


def cost_line(e):
    """What a training run cost (its checkpoint's "efficiency"), for reading beside its accuracies."""
    memory = f"{e['peak_memory_gib']:.2f} GiB ({e['peak_memory_of']})" if e.get("peak_memory_gib") else "n/a"
    return (f"training cost: {e['steps']:,} steps, {e['images_seen']:,} images in {e['seconds'] / 60:.1f} min on "
            f"{e['devices']} x {e['device']} ({e['device_hours']:.3g} device-hours, {e['img_per_s']:,.0f} img/s), "
            f"peak memory {memory}")


def merged_with_earlier(path, results):
    """An earlier evaluation of the same weights (same checkpoint, step and read-out) keeps the results
    of the protocols this run did not compute; results of other weights are replaced."""
    try:
        with open(path) as f:
            earlier = json.load(f)
    except (OSError, ValueError):
        return results
    if not isinstance(earlier, dict) or not isinstance(earlier.get("checkpoint"), str):
        return results
    same = ("step", "encoder", "random_init", "pool", "data")  # and the same file, however its path was written
    if (os.path.realpath(earlier["checkpoint"]) == os.path.realpath(results["checkpoint"])
            and all(earlier.get(k) == results.get(k) for k in same)):
        kept = sorted(set(earlier) - set(results))
        if kept:
            print(f"kept from the earlier evaluation in {path}: {', '.join(kept)}")
        return {**earlier, **results}
    print(f"note: {path} held an evaluation of other weights ({earlier['checkpoint']}, step {earlier.get('step')}); "
          f"replaced")
    return results


def markdown_table(rows):
    """One row per evaluated encoder, one column per result that any of them has."""
    def fmt(key, v):
        if isinstance(v, dict):
            return f"{v['mean']:.1f} ± {v['std']:.1f}"
        return "-" if v is None else f"{v:.3f}" if key.startswith(("kmeans", "device", "pretext")) else f"{v:.2f}"
    columns = [("knn_top1", "kNN top-1"), ("linear_top1", "linear top-1")]
    shots = sorted({k for r in rows for k in r if k.startswith("fewshot_")}, key=lambda k: ("pct" in k, float(k.split("_")[1].rstrip("shotpc"))))
    columns += [(k, k.split("_")[1].replace("shot", "-shot").replace("pct", "%")) for k in shots]
    columns += [("kmeans_nmi", "k-means NMI"), ("kmeans_ari", "ARI"), ("finetune_top1", "fine-tune")]
    columns += [("robust_knn", "kNN under corruption (% of clean)"), ("pretext_loss", "pretext loss")]
    columns += [("train_minutes", "training min"), ("device_hours", "device-hours")]
    for r in rows:  # the cost of each checkpoint's training run, beside its accuracies
        if r.get("efficiency"):
            r["train_minutes"], r["device_hours"] = r["efficiency"]["seconds"] / 60, r["efficiency"]["device_hours"]
        if isinstance(r.get("robustness"), dict):
            r["robust_knn"] = 100 * r["robustness"]["relative_knn"]
        if isinstance(r.get("pretext"), dict):
            r["pretext_loss"] = r["pretext"]["loss"]
    columns = [(k, name) for k, name in columns if any(k in r for r in rows)]
    lines = ["| encoder | method | weights | pool | " + " | ".join(name for _, name in columns) + " |",
             "|---" * (4 + len(columns)) + "|"]
    for r in rows:
        weights = "random init" if r["random_init"] else f"{r['encoder']}, step {r['step']}"
        cells = [fmt(k, r[k]) if k in r else "-" for k, _ in columns]
        lines.append(f"| {r['checkpoint']} | {r['method']} | {weights} | {r['pool']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluate(args):
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda was asked for but no GPU is visible; use --device cpu")
    auto = device.type == "cuda"  # bf16 autocast and torch.compile: on with CUDA, off on CPU unless asked for
    args = dataclasses.replace(args, amp=auto if args.amp is None else args.amp,
                               compile=auto if args.compile is None else args.compile)
    if isinstance(args.ckpt, str):  # Args(ckpt="a.pt") from Python
        args = dataclasses.replace(args, ckpt=(args.ckpt,) if args.ckpt else ())
    if isinstance(args.weights, str):
        args = dataclasses.replace(args, weights=(args.weights,) if args.weights else ())
    if not args.ckpt and not args.weights:
        raise DataError("--ckpt is required: a checkpoint.pt written by one of the method files (or --weights FILE)")
    if args.out:  # before the compute: a folder that cannot be written should not cost an evaluation
        try:
            os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        except OSError as e:
            raise DataError(f"cannot create the folder of --out {args.out}: {os.strerror(e.errno) if e.errno else e}") from None
    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    protocols = list(PROTOCOLS) if protocols == ["all"] else protocols
    unknown = set(protocols) - set(PROTOCOLS)
    if unknown:
        raise DataError(f"unknown protocol(s) {sorted(unknown)}; choose from {', '.join(PROTOCOLS)} or all")
    if args.pool not in ("cls", "mean", "cls-prenorm"):
        raise DataError(f"--pool must be 'cls', 'mean' or 'cls-prenorm', not {args.pool!r}")
    stamp = time.strftime('%Y%m%d-%H%M%S')
    if "curves" in protocols or len(args.ckpt) > 1:  # the kNN monitors of the runs in one figure, before the compute
        curves = curves_figure(args.ckpt, os.path.splitext(args.out)[0] + "-curves.png" if args.out else
                               os.path.join("runs", f"compare-{stamp}-curves.png"))
        if protocols == ["curves"]:
            return curves
    protocols = [p for p in protocols if p != "curves"]
    sources = [(c, "ckpt", args.random_init) for c in args.ckpt] + [(w, "weights", args.random_init) for w in args.weights]
    if args.with_random_init:
        sources.append((*sources[0][:2], True))
    rows = [evaluate_one(args, source, kind, protocols, random_init, device) for source, kind, random_init in sources]
    table = markdown_table(rows)
    print("\n" + table)
    if len(rows) > 1 or len(protocols) > 2:  # a comparison: one JSON and one Markdown file for all rows
        out = args.out or (rows[0]["json"] if len(rows) == 1 else
                           os.path.join("runs", f"compare-{stamp}.json"))
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:
            json.dump(rows if len(rows) > 1 else rows[0], f, indent=1)
        with open(os.path.splitext(out)[0] + ".md", "w") as f:
            f.write(table + "\n")
        print(f"\nwrote {out} and {os.path.splitext(out)[0]}.md")
    else:
        print(f"\nwrote {rows[0]['json']}")
    return rows[0] if len(rows) == 1 else rows


# ---- entry point (also in evaluate.py) ----
class ClosedPipeSafe:
    """stdout / stderr that outlive a closed pipe: when `| tee log` or `| head` ends first (Ctrl-C reaches the whole
    pipeline), writing raises BrokenPipeError; the output then goes to /dev/null and the run still saves its checkpoint."""
    def __init__(self, stream):
        self.stream = stream

    def __getattr__(self, name):
        return getattr(self.stream, name)

    def write(self, text):
        return self.guarded(self.stream.write, text) or len(text)

    def flush(self):
        self.guarded(self.stream.flush)

    def guarded(self, call, *args):
        try:
            return call(*args)
        except OSError:  # BrokenPipeError, or a terminal that went away: the file descriptor itself to /dev/null,
            try:  # so that Python's own flush at exit finds nothing wrong either
                os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
            except (OSError, ValueError):
                self.stream = open(os.devnull, "w")

def main(entry):
    """Run entry(); a DataError or a Ctrl-C ends it with one line (under torchrun: rank 0's, or the rank whose image failed)."""
    sys.stdout, sys.stderr = ClosedPipeSafe(sys.stdout), ClosedPipeSafe(sys.stderr)
    first = os.environ.get("RANK", "0") == "0"  # before the process group exists, every rank meets the same error
    try:
        entry()
    except DataError as e:
        if first or isinstance(e, BadImage):
            sys.exit("error: " + error_line(e))
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C during start-up (before the handlers that save), or a second Ctrl-C
        if first:
            sys.exit("interrupted (Ctrl-C): stopped before a checkpoint of the current step was written; the last "
                     "saved checkpoint, if any, is kept")
        sys.exit(130)

# ---- the command line ----
if __name__ == "__main__":
    main(lambda: evaluate(parse_args()))
