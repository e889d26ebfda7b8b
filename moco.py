"""
MoCo v3: An Empirical Study of Training Self-Supervised Vision Transformers (Chen, Xie, He, ICCV 2021)
arXiv:2104.02057, official code github.com/facebookresearch/moco-v3

Two augmented views of each image. A query encoder (backbone, projection MLP, prediction MLP)
embeds one view; a key encoder, a momentum (EMA) copy of backbone and projector, embeds the other.
An InfoNCE loss asks each query to pick its own image's key among the keys of the whole batch,
symmetrised over the two views. For ViTs the paper freezes a random patch projection, which
removes the training instability it traces to the first layer.

Run:
    python moco.py                                 # CIFAR-10 recipe (ViT-Tiny/4 at 32 px), 1 GPU
    python moco.py --data imagenet/                # ViT-S/16 at 224 px, the paper's ViT recipe at batch 256
    python moco.py --data fake --device cpu --steps 20 --batch-size 16 --model-dims 64,2,4 --mlp-dim 256   # seconds
    python evaluate.py --ckpt runs/<run>/checkpoint.pt --data cifar10   # kNN + linear probe (online encoder)
Expected result of the default run: not yet measured on a GPU (see README.md for measured runs).

Paper -> code
  1. Sec. 3 / BYOL augmentation: two asymmetric views (blur on one, solarize on the other) -> train_transform(), device_views()
  2. Alg. 1 f_q = backbone + projection MLP + prediction MLP, BN in the heads      -> mlp(), MoCo
  3. Alg. 1 f_k = momentum copy of backbone + projector, updated before the keys   -> MoCo.momentum_update()
     m from 0.99 to 1 by a half-cosine (official --moco-m-cos)                     -> momentum_at()
  4. Alg. 1 ctr(q, k) = 2 tau x CE(q k^T / tau, own index); L = ctr(q1, k2) + ctr(q2, k1) -> contrastive_loss(), moco_loss()
  5. Sec. 4.2 "random patch projection": a frozen patch embedding                  -> --freeze-patch-embed
  6. Sec. 5 recipe: AdamW, lr 1.5e-4 x batch/256, wd 0.1, warm-up 40 epochs, cosine -> RECIPES, param_groups()

Deviations from the paper
  - One GPU: batch 256 instead of 4096, so each query sees 255 negatives instead of 4095; lr
    follows the paper's rule lr = blr x batch / 256. On many GPUs the heads' BN uses the global batch, as
    the official SyncBN does (below).
  - ViT-S has 6 heads here (the shared vit.py, as DeiT and MSN); the official ViT-S has 12.
  - Initialisation: the shared MAE scheme, not MoCo v3's xavier over separate q, k, v and CLS std
    1e-6 (REFERENCE §0.4).
  - The fixed 2-D sin-cos position table is vit.py's (MAE's channel order: the column coordinate in
    the first half of the channels, the row in the second). The official vits.py
    build_2d_sincos_position_embedding puts the row first. Training is the same (a fixed permutation
    of channels that the first layer absorbs), but a pos_embed here differs from an official MoCo v3
    one; evaluate.py --weights always uses the weights file's own table.
  - CIFAR-10 recipe (our choice, no official one): ViT-Tiny, patch 4, 200 epochs. Gaussian blur
    kernel about 10% of the side and sigma scaled by img_size / 224, the same relative blur as at 224.
  - CPU recipe (--recipe cpu; what --recipe auto picks without a GPU, README "I only have a laptop"):
    a ViT 128 wide, 4 deep (4 heads) with patch 8 at 32 px (16 tokens: at equal minutes it sees twice
    the images of patch 4 and its kNN ends higher, README), MLP heads 1,024 wide, batch 128, blr 2e-3,
    a run of 200,000 images (--images) with a tenth of warm-up, crops of at least 20% of the image
    (--crop-min-scale; 8% in the paper, 20% is SimSiam's CIFAR-10 value): about 15 minutes on 2 cores
    on a folder of any size, where the paper trains ViT-S/B for 300 epochs at batch 4096.
  - The backbones run both views in one batch (a ViT has no BatchNorm, so the result is the same);
    the MLP heads see each view on its own, so their BN statistics stay per view as officially.
  - Views are made in two halves (README "Input pipeline"): the data workers decode, crop and flip
    each image and draw its colour parameters under the sample's own seed; the device applies colour
    jitter, grayscale, blur and solarize to the whole batch (colour_augment(), device_views()), from
    the same distributions as the official torchvision / PIL transforms (tests/test_views.py). The
    blur is a true Gaussian (torchvision's GaussianBlur); the official code uses PIL's
    ImageFilter.GaussianBlur, a box-filter approximation of it with radius = sigma.
    PIL's colour jitter also rounds to 8 bits after each of its ops; ours stays in float until the
    normalisation (on average about 1 grey level apart, up to 18 where the hue turns).

Many GPUs (torchrun; README "Many GPUs")
  - Keys gathered from every GPU without gradient, each query's positive at its global index
    (official builder.py: concat_all_gather, labels + N x rank)            -> contrastive_loss(), all_gather()
  - BatchNorm of projector and predictor over the global batch (official main_moco.py:
    SyncBatchNorm)                                                           -> GlobalBatchNorm1d
"""
# ---------------------------------------------------------------- imports (the machinery's own are at its start)
import copy
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T

from vit import ViT

METHOD = "moco"


# ---------------------------------------------------------------- views
# MoCo v3's two colour recipes (each a Colour of the shared colour block, after train())
MOCO_COLOURS = [dict(jitter=(0.4, 0.4, 0.2, 0.1), blur_p=1.0),                  # view 1: always blurred
                dict(jitter=(0.4, 0.4, 0.2, 0.1), blur_p=0.1, solarize_p=0.2)]  # view 2: rarely blurred, solarised


def train_transform(args):
    """BYOL's asymmetric pair, as in MoCo v3 (main_moco.py): both views get a random resized crop
    (0.08, 1) and a flip here, per image; on the device, colour jitter (0.4, 0.4, 0.2, 0.1) with p 0.8
    and grayscale 0.2; view 1 is always blurred; view 2 is blurred with p 0.1 and solarised with p 0.2."""
    crop = T.Compose([T.RandomResizedCrop(args.img_size, scale=(args.crop_min_scale, 1.0)), T.RandomHorizontalFlip(),
                      T.PILToTensor()])
    return CropViews(args.img_size, [crop, crop], [Colour(**c) for c in MOCO_COLOURS])


def device_views(batch, args):
    """The device side of MoCo v3's two views: each view's colour, then normalisation, on the whole batch."""
    crops, params = batch
    return [normalize(colour_augment(x, params[:, i], blur_kernel_size(args.img_size))) for i, x in enumerate(crops)]


# ---------------------------------------------------------------- model
# MoCo v3 head specifics: projection and prediction MLPs
def mlp(num_layers, in_dim, mlp_dim, out_dim):
    """moco/builder.py _build_mlp: hidden layers are Linear (no bias), BN, ReLU; the output layer is
    Linear (no bias) then BN without affine. For ViT both heads end in that BN (last_bn=True)."""
    layers = []
    for i in range(num_layers):
        d_in, d_out = (in_dim if i == 0 else mlp_dim), (out_dim if i == num_layers - 1 else mlp_dim)
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [GlobalBatchNorm1d(d_out), nn.ReLU(inplace=True)]
        else:
            layers.append(GlobalBatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


# MoCo v3 momentum encoder specifics
def momentum_at(progress, m0):
    """m = 1 - (1 - m0) (1 + cos(pi t / T)) / 2, t / T = progress: m0 at the start, 1 at the end."""
    return 1 - (1 - m0) * (1 + math.cos(math.pi * progress)) / 2


class MoCo(nn.Module):
    def __init__(self, encoder, proj_dim=256, mlp_dim=4096, tau=0.2):
        super().__init__()
        self.tau = tau
        # f_q: backbone + projector (3 layers) + predictor (2 layers)
        self.encoder = encoder
        self.projector = mlp(3, encoder.dim, mlp_dim, proj_dim)
        self.predictor = mlp(2, proj_dim, mlp_dim, proj_dim)
        # f_k: a momentum copy of backbone + projector (no predictor), never trained by gradients
        self.momentum_encoder = copy.deepcopy(encoder)
        self.momentum_projector = copy.deepcopy(self.projector)
        for p in self.momentum_parameters():
            p.requires_grad_(False)

    def momentum_parameters(self):
        return list(self.momentum_encoder.parameters()) + list(self.momentum_projector.parameters())

    @torch.no_grad()
    def momentum_update(self, m):
        """Alg. 1: f_k.params = m * f_k.params + (1 - m) * f_q.params (parameters only, not BN
        statistics), as two fused kernels over all tensors. Parameters the online model does not
        train (the frozen patch embedding, the sin-cos table) are equal in both and are skipped, so
        rounding cannot make them drift apart."""
        pairs = [(t, o) for t, o in zip(self.momentum_parameters(),
                                        list(self.encoder.parameters()) + list(self.projector.parameters()))
                 if o.requires_grad]
        target, online = [t for t, _ in pairs], [o for _, o in pairs]
        torch._foreach_mul_(target, m)
        torch._foreach_add_(target, online, alpha=1 - m)

    def forward(self, x1, x2):
        """Two views (B, 3, H, W) -> (loss, (q1, q2, k1, k2)). The momentum update comes first, in train_step."""
        # 1. queries: backbone on both views in one batch, then projector and predictor per view
        h1, h2 = self.encoder(torch.cat([x1, x2])).chunk(2)              # 2 x (B, D)
        q1, q2 = self.predictor(self.projector(h1)), self.predictor(self.projector(h2))  # 2 x (B, proj_dim)

        # 2. keys: the momentum encoder, no gradient
        with torch.no_grad():
            g1, g2 = self.momentum_encoder(torch.cat([x1, x2])).chunk(2)
            k1, k2 = self.momentum_projector(g1), self.momentum_projector(g2)  # 2 x (B, proj_dim)

        # 3. symmetrised InfoNCE: each query against the other view's keys
        return moco_loss(q1, q2, k1, k2, self.tau), (q1, q2, k1, k2)


def param_groups(model, weight_decay):
    """The official MoCo v3 AdamW decays every parameter, norms and biases included (the other files
    here exclude 1-D parameters). Frozen ones (patch embedding, momentum encoder) are left out."""
    return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]


def encoders_to_save(model):
    """Both encoders; evaluate.py uses the online (base) encoder by default, as the official code (REFERENCE §8)."""
    return {"target_encoder": model.momentum_encoder.state_dict(), "default_encoder": "online"}


# ---------------------------------------------------------------- loss
def contrastive_loss(q, k, tau):
    """Alg. 1 ctr(q, k) = 2 tau x CE(logits, labels), logits_ij = <q_i/|q_i|, k_j/|k_j|> / tau: query i's
    positive is key i (the same image, other view), the other B - 1 keys are its negatives.
    Why 2 tau (moco-v3 builder.py, issue #31): the gradient of CE with respect to a cosine carries a
    1/tau; multiplying by tau cancels it, so the loss and gradient scale do not change with tau. The
    2 is the official constant (with tau = 0.5 the factor is 1).
    On many GPUs the keys of every GPU are gathered (official concat_all_gather, no gradient: they come
    from the momentum encoder), so each query has the global batch's keys, and its positive sits at its
    global index RANK x B + i."""
    q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
    k = all_gather(k)                                                    # (WORLD * B, d)
    logits = q @ k.T / tau                                               # (B, WORLD * B)
    labels = torch.arange(len(q), device=q.device) + RANK * len(q)       # positives: one's own key
    return F.cross_entropy(logits, labels) * (2 * tau)


def moco_loss(q1, q2, k1, k2, tau):
    """Alg. 1: L = ctr(q1, k2) + ctr(q2, k1), symmetric and summed (not averaged)."""
    return contrastive_loss(q1, k2, tau) + contrastive_loss(q2, k1, tau)


# ---------------------------------------------------------------- the training step
def lr_at(step, total_steps, warmup_steps, peak_lr, min_lr, start_lr=0.0):
    """The lr schedule, per step: a linear warm-up from start_lr (0 unless a method says) to peak_lr, then a
    half-cosine down to min_lr (MAE util/lr_sched.py; the recipes give each method's values)."""
    if step < warmup_steps:
        return start_lr + (peak_lr - start_lr) * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_step(model, train_model, optimizer, views, lr, progress, args):
    """One MoCo v3 step in Alg. 1's order: the momentum update of the key encoder (m from its cosine schedule),
    queries and keys of both views, the symmetric InfoNCE loss, backward, the AdamW step at this step's lr.
    train_model runs the forward (model itself, or its DDP / compiled wrapper); returns the loss and extra
    metrics, as tensors (no sync)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    m = momentum_at(progress, args.momentum)
    model.momentum_update(m)  # Alg. 1: the key encoder is updated before the keys are computed
    with autocast(args):
        loss, _ = train_model(*views)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), {"m": torch.tensor(m)}


def build_model(args):
    """The MoCo v3 of a run's settings (train() builds it so, and evaluate.py's pretext protocol from a checkpoint)."""
    encoder = build_encoder(args)
    if args.freeze_patch_embed:  # Sec. 4.2: a fixed random patch projection stabilises ViT training
        encoder.patch_embed.requires_grad_(False)
    return MoCo(encoder, args.proj_dim, args.mlp_dim, args.tau)


@torch.no_grad()
def pretext_metrics(model, views, args):
    """MoCo v3's own task on images it did not train on (evaluate.py --protocols pretext): the loss of train_step,
    and how often (in %) a query's positive key (its image's other view) is the most similar of the batch's keys."""
    loss, (q1, q2, k1, k2) = model(*views)
    def positive_first(q, k):
        sims = F.normalize(q.float(), dim=1) @ F.normalize(k.float(), dim=1).T
        return (sims.argmax(dim=1) == torch.arange(len(q), device=q.device)).float().mean()
    return {"loss": loss, "positive_first_pct": 100 * (positive_first(q1, k2) + positive_first(q2, k1)) / 2}


# ---------------------------------------------------------------- config
@dataclass
class Args:
    # ==== SHARED fields: the same in every method file ====
    data: str = "cifar10"
    """'cifar10' (torchvision downloads it), 'fake' (1,000 synthetic images, for smoke runs) or a folder: PATH/train/<class>/*.jpg (ImageNet layout), PATH/<class>/*.jpg, or a flat folder of images"""
    recipe: str = "auto"
    """hyper-parameter preset: 'cpu' (a small ViT at 32 px for a laptop, sized in images seen), or the GPU recipes 'cifar10' and 'imagenet'; 'auto' picks cpu without a GPU, and on a GPU imagenet when the images are 64 px or larger. Any flag you pass overrides the preset"""
    model: str | None = None
    """ViT size: tiny (192 wide, 12 deep, 3 heads), small (384/12/6), base (768/12/12), large (1024/24/16)"""
    model_dims: str = ""
    """a custom ViT as 'width,depth,heads' (e.g. 64,2,4 for smoke runs); overrides --model"""
    img_size: int | None = None
    """training resolution in pixels (recipe: 32 for CIFAR-10, 224 for ImageNet)"""
    patch_size: int | None = None
    """patch size in pixels; must divide img-size (recipe: 4 at 32 px, 16 at 224 px)"""
    epochs: float | None = None
    """passes over the training set (a fraction is allowed, e.g. 1.5); overrides --images"""
    images: int | None = None
    """the run's length in training images instead of epochs: epochs = images / the data set's size, so that a run takes about the same minutes on a folder of any size (the CPU recipe is sized so)"""
    steps: int = 0
    """total optimizer steps; if set, overrides --epochs and the schedule is compressed into these steps"""
    batch_size: int | None = None
    """images per step and GPU: the global batch is this times the number of GPUs (torchrun), and the lr rule uses it"""
    blr: float | None = None
    """base learning rate: the lr at batch 256. Effective lr = blr * batch-size / 256 (printed at start)"""
    min_lr: float | None = None
    """lr at the end of the cosine schedule (recipe: the official code's final lr, 0 for most methods)"""
    weight_decay: float | None = None
    """AdamW weight decay, not applied to biases and norm weights"""
    warmup_epochs: float | None = None
    """epochs of linear lr warm-up before the cosine decay (from 0, or from a method's official start lr); a run sized by --images warms up over its first tenth"""
    seed: int = 0
    """seeds every random draw: data order, augmentations, masks, initialisation"""
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    """'cuda' or 'cpu'"""
    compile: bool | None = None
    """torch.compile the model (auto: on with CUDA, off on CPU; the first steps are slow while it compiles)"""
    amp: bool | None = None
    """bf16 autocast (auto: on with CUDA, off on CPU); no grad scaler is needed with bf16"""
    num_workers: int = min(8, os.cpu_count() or 1)
    """data-loading processes; 0 loads in the main process"""
    out_dir: str = "runs"
    """each run writes to OUT_DIR/RUN_NAME: checkpoint.pt, log.jsonl, args.json, a copy of this file, pictures"""
    run_name: str = ""
    """run folder name (default: <method>-<data>-s<seed>-<date>-<time>); an existing folder is refused, continue it with --resume"""
    resume: str = ""
    """a checkpoint.pt (or its run folder) to continue; the run's own settings are kept (other flags given are named and ignored)"""
    stop_after: int = 0
    """end this process after this many steps, saving a checkpoint (the schedule still spans the whole run); continue with --resume"""
    log_every: int = 50
    """steps between log lines"""
    knn_every: float | None = None
    """epochs between kNN accuracies in the log (also at step 0 and at the end): evaluate.py's kNN (k 20, T 0.07) of the encoder it evaluates, on --knn-train / --knn-val fixed images; 0 turns it off (default: 1, or a fifth of a run sized by --images)"""
    knn_train: int = 5000
    """training images of the kNN monitor (a fixed random subset, evaluate.py --max-train-images)"""
    knn_val: int = 1000
    """val images of the kNN monitor (a fixed random subset, evaluate.py --max-val-images)"""
    save_minutes: float = 10.0
    """minutes between checkpoints, so a hard kill (SIGKILL, a power cut) loses at most this much; one is also written at the end and on Ctrl-C, SIGTERM or SIGHUP (to the main process or its whole process group)"""
    # ==== MoCo v3 specific ====
    tau: float = 0.2
    """softmax temperature of the InfoNCE loss (paper: 0.2 for ViT)"""
    momentum: float | None = None
    """key-encoder momentum at the start, raised to 1 by a half-cosine (paper: 0.99)"""
    proj_dim: int | None = None
    """output width of the projection and prediction MLPs (paper: 256)"""
    mlp_dim: int | None = None
    """hidden width of the projection and prediction MLPs (paper: 4096)"""
    freeze_patch_embed: bool = True
    """keep the random patch projection fixed (paper Sec. 4.2, official --stop-grad-conv1); --no-freeze-patch-embed trains it"""
    crop_min_scale: float | None = None
    """smallest area of a random resized crop, as a fraction of the image (paper: 0.08; the CPU recipe's 32-px crops use 0.2, SimSiam's CIFAR-10 value)"""

# Hyper-parameter presets. A field left at None above is filled from the recipe.
RECIPES = {
    # our small-data recipe (no official CIFAR-10 MoCo v3 exists)
    "cifar10": dict(model="tiny", img_size=32, patch_size=4, epochs=200, batch_size=256, blr=1.5e-4,
                    min_lr=0.0, weight_decay=0.1, warmup_epochs=10,
                    momentum=0.99, proj_dim=256, mlp_dim=4096, crop_min_scale=0.08),
    # the paper's ViT-S recipe (CONFIG.md: 300 epochs, 40 warm-up, wd 0.1), at batch 256 on one GPU
    "imagenet": dict(model="small", img_size=224, patch_size=16, epochs=300, batch_size=256, blr=1.5e-4,
                     min_lr=0.0, weight_decay=0.1, warmup_epochs=40,
                     momentum=0.99, proj_dim=256, mlp_dim=4096, crop_min_scale=0.08),
    # a laptop (picked by --recipe auto on the CPU): about 15 minutes on 2 cores, measured in README.md
    "cpu": dict(model="128,4,4", img_size=32, patch_size=8, images=200_000, batch_size=128, blr=2e-3, min_lr=0.0,
                weight_decay=0.1, momentum=0.99, proj_dim=256, mlp_dim=1024, crop_min_scale=0.2),
}

# The paper's values of the shared flags (--help shows them): the ViT recipe of CONFIG.md
PAPER = dict(model="small or base (ViT-S/16, ViT-B/16)", img_size="224", patch_size="16", epochs="300",
             batch_size="4096", blr="1.5e-4", min_lr="0", weight_decay="0.1", warmup_epochs="40")


def check_args(args):
    """The ranges of MoCo v3's own flags (apply_recipe checks the shared ones), before anything is written."""
    require(args, "tau", args.tau > 0, "more than 0 (a temperature)")
    require(args, "momentum", 0 <= args.momentum <= 1, "in [0, 1]")
    for name in ("proj_dim", "mlp_dim"):
        require(args, name, getattr(args, name) >= 1, "at least 1")


# ---------------------------------------------------------------- train
def train(args):
    args, device, resumed = setup(args)  # --resume, the recipe, the seed, the device, torchrun
    model = build_model(args).to(device)
    lr = args.blr * args.batch_size * WORLD / 256  # the paper's linear scaling rule, on the global batch
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=lr, fused=device.type == "cuda")
    # a synthetic batch and one step on it, what the CPU probe in prepare() (and .ci/benchmark.py) times
    views = [torch.zeros(args.batch_size, 3, args.img_size, args.img_size, device=device) for _ in range(2)]
    step = lambda train_model: train_step(model, train_model, optimizer, views, lr, 0.0, args)
    run = Run(args, model, optimizer, train_transform(args), device)  # the data and the schedule's length
    train_model = prepare(model, optimizer, args, device, lr, step, run.total_steps)  # bf16? compile? DDP on many GPUs
    run.start(resumed)  # a new run folder, or the resumed run's weights, optimizer and RNG

    for views in run.batches():
        lr_now = lr_at(run.step, run.total_steps, run.warmup_steps, lr, args.min_lr)
        loss, extras = train_step(model, train_model, optimizer, device_views(views, args), lr_now,
                                  run.step / run.total_steps, args)
        run.after_step(loss, lr_now, extras)  # log, and save every --save-minutes, at the end, on a signal
    return run.ckpt_path


# ==== SHARED: colour augmentation on the device, identical in every file with colour views ====
# The data workers only decode, crop and flip (per image, in PIL) and draw each view's colour
# parameters; the device then applies colour jitter, grayscale, blur and solarize to the whole batch
# at once. Each sample keeps its own parameters, drawn from the same distributions as torchvision's
# RandomApply(ColorJitter), RandomGrayscale, RandomApply(GaussianBlur) and RandomSolarize, and drawn
# under the sample's own seed, so a run is the same with any number of workers or GPUs, and resumes
# exactly. One view's parameters are a row of 13 numbers:
#   [jitter on, brightness, contrast, saturation, hue, order of the 4 jitter ops (4), gray on, blur on,
#    blur sigma, solarize on]
@dataclass
class Colour:
    """One view's photometric recipe, in torchvision's terms."""
    jitter: tuple = (0.4, 0.4, 0.4, 0.1)  # ColorJitter(brightness, contrast, saturation, hue)
    jitter_p: float = 0.8                 # RandomApply([ColorJitter(...)], p)
    gray_p: float = 0.2                   # RandomGrayscale(p)
    blur_p: float = 0.0                   # RandomApply([GaussianBlur(sigma ~ U(0.1, 2.0) at 224 px)], p)
    solarize_p: float = 0.0               # RandomSolarize(threshold 128 of 255, p)

    def draw(self, img_size):
        """This view's parameters for one image (CPU side, under the sample's seed): a (13,) tensor."""
        b, c, s, h = self.jitter
        u = torch.rand(8)
        factors = [1 - b + 2 * b * u[0], 1 - c + 2 * c * u[1], 1 - s + 2 * s * u[2], -h + 2 * h * u[3]]
        sigma = (0.1 + 1.9 * u[4]) * img_size / 224  # the blur scales with the image (23-px kernel at 224)
        return torch.tensor([float(torch.rand(()) < self.jitter_p), *factors, *torch.randperm(4).tolist(),
                             float(u[5] < self.gray_p), float(u[6] < self.blur_p), sigma, float(u[7] < self.solarize_p)])

def gray(x):
    """ITU-R 601-2 luma, as torchvision's rgb_to_grayscale: (B, 3, H, W) -> (B, 1, H, W)."""
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)

def blend(x, y, f):
    """f x + (1 - f) y, clipped to [0, 1]; f is one factor per sample."""
    return (f.view(-1, 1, 1, 1) * x + (1 - f.view(-1, 1, 1, 1)) * y).clamp(0, 1)

def adjust_hue(x, shift):
    """Rotate each pixel's hue by `shift` turns of the colour circle, keeping its HSV saturation and
    value: RGB -> HSV, h <- (h + shift) mod 1, HSV -> RGB with f(n) = v - v s clip(min(k, 4 - k), 0, 1),
    k = (n + 6 h) mod 6, n = 5, 3, 1 for R, G, B."""
    r, g, b = x.unbind(1)
    v, m = x.amax(dim=1), x.amin(dim=1)
    chroma = v - m
    c = torch.where(chroma > 0, chroma, torch.ones_like(chroma))        # no division by 0 for grays
    h = torch.where(v == r, (g - b) / c, torch.where(v == g, 2 + (b - r) / c, 4 + (r - g) / c)) / 6
    h = (h + shift.view(-1, 1, 1)) % 1.0
    s = chroma / torch.where(v > 0, v, torch.ones_like(v))
    k = (torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1) + 6 * h.unsqueeze(1)) % 6
    return v.unsqueeze(1) - (v * s).unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1)

JITTER_OPS = [
    lambda x, f: blend(x, torch.zeros_like(x), f),                               # brightness
    lambda x, f: blend(x, gray(x).mean(dim=(1, 2, 3), keepdim=True), f),         # contrast: toward the mean gray
    lambda x, f: blend(x, gray(x), f),                                           # saturation: toward the gray image
    adjust_hue,                                                                  # hue
]

def gaussian_blur(x, sigma, kernel_size):
    """Separable Gaussian blur, one sigma per sample: the kernel is exp(-t^2 / (2 sigma^2)) at
    t = -(k-1)/2 ... (k-1)/2, normalised to sum 1, with reflected borders (as torchvision's)."""
    B, C, H, W = x.shape
    t = torch.arange(kernel_size, device=x.device, dtype=x.dtype) - (kernel_size - 1) / 2
    kernel = torch.exp(-0.5 * (t / sigma.view(-1, 1)) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(C, dim=0)  # (B*C, k), one per channel
    pad = kernel_size // 2
    x = x.reshape(1, B * C, H, W)
    x = F.conv2d(F.pad(x, (pad, pad, 0, 0), mode="reflect"), kernel.view(B * C, 1, 1, -1), groups=B * C)  # rows
    x = F.conv2d(F.pad(x, (0, 0, pad, pad), mode="reflect"), kernel.view(B * C, 1, -1, 1), groups=B * C)  # columns
    return x.view(B, C, H, W)

def colour_augment(x, p, kernel_size):
    """The device side of one view: x (B, 3, H, W) uint8 crops, p (B, 13) their parameters (Colour.draw)
    -> (B, 3, H, W) float in [0, 1]. Every op is computed for the whole batch and kept where a sample
    drew it (torch.where), so nothing waits on the GPU."""
    x = x.float() / 255
    on = lambda column: (p[:, column] > 0).view(-1, 1, 1, 1)
    for position in range(4):  # ColorJitter applies its four ops in a random order per image
        for op_index, op in enumerate(JITTER_OPS):
            chosen = (p[:, 0] > 0) & (p[:, 5 + position] == op_index)
            x = torch.where(chosen.view(-1, 1, 1, 1), op(x, p[:, 1 + op_index]), x)
    x = torch.where(on(9), gray(x).expand_as(x), x)
    if kernel_size > 1:
        x = torch.where(on(10), gaussian_blur(x, p[:, 11], kernel_size), x)
    return torch.where(on(12) & (x >= 128 / 255), 1 - x, x)  # solarize: invert the bright values

def blur_kernel_size(img_size):
    """About 10% of the image side, odd: 23 px at 224 (BYOL's), 5 px at 32."""
    return 2 * round(0.05 * img_size) + 1

class CropViews:
    """The CPU side of several views of one image: each view's crop (and flip) as a uint8 tensor, and
    a (views, 13) tensor of their colour parameters (zeros for a view without colour)."""

    def __init__(self, img_size, crops, colours):
        self.img_size, self.crops, self.colours = img_size, crops, colours

    def __call__(self, img):
        params = [c.draw(self.img_size) if c else torch.zeros(13) for c in self.colours]
        return [crop(img) for crop in self.crops], torch.stack(params)
# ==== end SHARED ====


# ==== SHARED: many GPUs, the helpers a two-view method calls on its split batch (identical in the six files) ====
# Under torchrun (WORLD > 1, set up by the machinery); with one process each is the plain operation. What each
# method does with them is in its own code; its docstring's "Many GPUs" list says where.
class AllReduceSum(torch.autograd.Function):
    """x summed over all ranks. The backward pass sums the gradient over the ranks as well: every rank's loss
    depends on the sum, so each rank's own x gets the gradient of all the ranks' losses."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad

def all_reduce_sum(x):
    """x summed over the ranks: a statistic of the global batch from this rank's part of it (differentiable,
    see AllReduceSum)."""
    return AllReduceSum.apply(x) if WORLD > 1 else x

def all_gather(x):
    """Every rank's rows of x in rank order, (B, ...) -> (WORLD * B, ...), without gradient (the official
    concat_all_gather); this rank's rows are RANK * B to RANK * B + B - 1."""
    if WORLD == 1:
        return x
    rows = [torch.empty_like(x) for _ in range(WORLD)]
    dist.all_gather(rows, x.contiguous())
    return torch.cat(rows)

class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of all ranks' rows together (the official
    SyncBatchNorm, written so that it also runs on the CPU); on one process, nn.BatchNorm1d."""

    def forward(self, x):
        if WORLD == 1 or not self.training:
            return super().forward(x)
        n, xf = x.shape[0] * WORLD, x.float()
        mean = all_reduce_sum(xf.sum(dim=0)) / n
        var = all_reduce_sum(((xf - mean) ** 2).sum(dim=0)) / n  # biased, as BatchNorm normalises
        with torch.no_grad():  # the running statistics of one large batch (unbiased variance)
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)
        y = (xf - mean) / torch.sqrt(var + self.eps)
        return (y * self.weight + self.bias if self.affine else y).to(x.dtype)
# ==== end SHARED ====


# ==== SHARED: machinery, identical in every method file (tests/test_shared_blocks.py); the method ends above ====
# What no method does differently: flags, data, torchrun, the run around train(), the kNN monitor, the entry point.
# It expects from the method part: METHOD, Args (with the SHARED fields), RECIPES (with "cpu"), PAPER, check_args(),
# encoders_to_save(model), a model with .encoder (a vit.ViT), and a train() that calls setup(), Run(), prepare(),
# run.start(), run.batches() and run.after_step() (mae.py's is the shortest). Its imports are here so that the file
# opens on the method (Python runs them before any function is called).
import argparse
import ast
import atexit
import dataclasses
import datetime
import inspect
import itertools
import json
import math
import multiprocessing
import pathlib
import re
import shutil
import signal
import sys
import time
import typing

import torch.distributed as dist
import torchvision
import torchvision.transforms as T
from vit import count_params, knn_predict

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

# ---- many GPUs (torchrun): the set-up, and what every method calls (a two-view method's helpers: before the machinery) ----
RANK, WORLD = 0, 1  # this process's rank and the number of processes: (0, 1) without torchrun

def init_distributed(device):
    """Under torchrun: one process per GPU, joined by NCCL (gloo on the CPU); only rank 0 prints."""
    global RANK, WORLD
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return device
    RANK, WORLD = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    atexit.register(dist.destroy_process_group)
    if RANK > 0:  # errors still reach stderr
        sys.stdout = open(os.devnull, "w")
    return device

def rank_mean(x):
    """The mean of x over the ranks (for the log: the global batch's loss)."""
    if WORLD > 1:
        x = x.detach().clone()
        dist.all_reduce(x)
    return x / WORLD

def rank0(value):
    """Rank 0's value on every rank: the folder rank 0 made, a choice made from timings (which differ between ranks)."""
    box = [value]
    if WORLD > 1:
        dist.broadcast_object_list(box)
    return box[0]

def sync_stop(stop, device):
    """A signal that reached any rank stops every rank after the same step."""
    if WORLD > 1:
        flag = torch.tensor([float(bool(stop))], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not stop:
            stop.append("another rank")

def global_rand(batch, *shape, device=None):
    """Uniform noise (masks) for this rank's rows of the global batch's: a mask does not depend on the number of GPUs."""
    return torch.rand(batch * WORLD, *shape, device=device)[RANK * batch:(RANK + 1) * batch]

# ---- the run around train(): set-up, recipe, schedule, step, resume, log, checkpoints, signals ----
def setup(args):
    """Before the model: the device, torchrun, --resume (the run keeps its own settings), the recipe, the seed; bf16 and
    compile left at auto are on with CUDA (on the CPU prepare() times them). Returns (args, device, resumed or None)."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        raise DataError(f"unknown --device {args.device!r}; use 'cuda', 'cuda:N' or 'cpu'")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise DataError("--device cuda was asked for but no GPU is visible; use --device cpu")
    device = init_distributed(torch.device(args.device))  # under torchrun: this rank's GPU; only rank 0 prints
    resumed = None
    if args.resume:
        args, resumed = resume_settings(args)
    args.recipe = apply_recipe(args)
    torch.manual_seed(args.seed)  # CPU runs are bit-exact; GPU kernels and torch.compile may differ slightly
    if device.type == "cuda":
        args.amp = True if args.amp is None else args.amp
        args.compile = True if args.compile is None else args.compile
    before = resumed["world_size"] if resumed else WORLD
    if before != WORLD:  # keep the run's global batch, and so its lr and the order of its samples
        global_batch = args.batch_size * before
        if global_batch % WORLD:
            raise DataError(f"this run trained on {before} processes with a global batch of {global_batch}, which "
                            f"{WORLD} processes cannot split evenly: resume it with torchrun --nproc_per_node {before}")
        args.batch_size = global_batch // WORLD
        print(f"note: the run trained on {before} process(es); on {WORLD} each takes {args.batch_size} images, so the "
              f"global batch stays {global_batch}")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return args, device, resumed

def resume_settings(args):
    """--resume: the run's own settings, but this machine's --device, --amp, --compile, --num-workers, --stop-after, and
    --log-every, --save-minutes, --knn-every when given again. Other flags given are named and ignored."""
    resumed, path = load_checkpoint(args.resume)
    settings, ignored = Args(**{**resumed["args"], "resume": path}), []
    for f in dataclasses.fields(Args):
        given = getattr(args, f.name)
        if f.name in ("device", "amp", "compile", "num_workers", "stop_after"):  # this machine's
            setattr(settings, f.name, given)
        elif f.name in ("log_every", "save_minutes", "knn_every") and given != f.default:  # given again
            setattr(settings, f.name, given)
        elif f.name != "resume" and given not in (f.default, resumed["args"].get(f.name)):
            ignored.append("--" + f.name.replace("_", "-"))
    if ignored:
        print(f"warning: --resume continues the run with its own settings; ignored: {', '.join(ignored)}")
    if resumed.get("fresh"):  # a folder whose run stopped before its first checkpoint: start it again, there
        print(f"note: {os.path.dirname(path)} holds no checkpoint (its run stopped before the first save): "
              "starting that run afresh in it", flush=True)
        resumed = None
    return settings, resumed

def apply_recipe(args):
    """Fill the fields left at None from the recipe, check the values, say which recipe, return its name. 'auto' is the
    CPU recipe without a GPU; on a GPU it looks at the median short side of 16 images (one odd image does not decide)."""
    recipe, note = args.recipe, ""
    if args.data not in ("fake", "cifar10"):
        check_folder(args.data)  # a missing folder, or a file: the only line
    if recipe == "auto" and args.device == "cpu":  # a laptop: a small model and schedule, whatever the images' size
        recipe, note = "cpu", ("recipe auto: no GPU -> cpu (a small ViT at 32 px, sized for about 15 minutes on 2 cores; "
                               "--recipe cifar10 or imagenet for the GPU recipes)")
    elif recipe == "auto" and args.data in ("fake", "cifar10"):
        recipe = "cifar10"
    elif recipe == "auto":  # 16 images spread over the training set
        samples = build_dataset(args.data).samples
        sides = sorted(min(read_image(path).size) for path, _ in samples[::max(1, len(samples) // 16)][:16])
        recipe = "imagenet" if sides[len(sides) // 2] >= 64 else "cifar10"
        note = (f"recipe auto: {len(sides)} images looked at, short sides {sides[0]} to {sides[-1]} px, median "
                f"{sides[len(sides) // 2]} px -> {recipe} (64 px or more: imagenet)")
    if recipe not in RECIPES:
        raise DataError(f"unknown --recipe {recipe!r}; choose one of {sorted(RECIPES)} or 'auto'")
    epochs_given, images_given = args.epochs is not None, args.images is not None
    for name, value in RECIPES[recipe].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if epochs_given and not args.resume:  # a run is sized by --epochs, else by --images, else by its recipe
        args.images = None
    elif images_given and not epochs_given:
        args.epochs = None
    positive = ("img_size", "patch_size", "batch_size", "epochs", "images", "blr", "log_every")
    for name in positive + ("steps", "stop_after", "num_workers", "min_lr", "weight_decay", "warmup_epochs",
                            "save_minutes", "knn_every", "knn_train", "knn_val"):
        value = getattr(args, name)
        if value is not None and (value <= 0 if name in positive else value < 0):
            raise DataError(f"--{name.replace('_', '-')} must be {'more than 0' if name in positive else '0 or more'}, not {value}")
    check_args(args)  # the method's own flags
    if note:  # after the checks, so that an error is the only line
        print(note)
    return recipe

def require(args, name, ok, rule):
    """One line naming the flag when a setting is out of its range, before anything is written."""
    if not ok:
        raise DataError(f"--{name.replace('_', '-')} {getattr(args, name)} is out of range: it must be {rule}")

def build_encoder(args, **kwargs):
    """The ViT of --model-dims (width,depth,heads) or --model, at --img-size and --patch-size."""
    if args.img_size % args.patch_size:
        raise DataError(f"--img-size {args.img_size} is not divisible by --patch-size {args.patch_size}")
    try:
        return ViT.from_name(args.model_dims or args.model, img_size=args.img_size, patch_size=args.patch_size, **kwargs)
    except ValueError as e:  # vit.py checks the size
        raise DataError(f"--model{'-dims' if args.model_dims else ''} {e}") from None

def decode_side(transform):
    """How large an image must stay for each view to keep its resolution: the smallest crop a RandomResizedCrop of the
    transform (or of its .crops) can take, scale[0] of the area at aspect 3:4, must still be as large as its output."""
    crops = [part for crop in getattr(transform, "crops", [transform])
             for part in (crop.transforms if isinstance(crop, T.Compose) else [crop])]
    return max([c.size[0] / math.sqrt(c.scale[0] * min(c.ratio[0], 1 / c.ratio[1]))
                for c in crops if isinstance(c, T.RandomResizedCrop)], default=0)

def plan(args, num_images, global_batch):
    """(steps per epoch, steps, warm-up steps, whether the warm-up was cut) on num_images. A run sized by --images (the CPU
    recipe) gets its --epochs here, the same images on a folder of any size; its warm-up (a tenth) and monitor follow."""
    steps_per_epoch = num_images // global_batch  # whole batches: the rest of an epoch is left for the next
    if steps_per_epoch == 0:
        raise DataError(f"{args.data} has {num_images} images, fewer than one batch of {global_batch}")
    if args.epochs is None:
        args.epochs = args.images / (steps_per_epoch * global_batch)
    if args.warmup_epochs is None:
        args.warmup_epochs = args.epochs / 10
    if args.knn_every is None:
        args.knn_every = args.epochs / 5 if args.images else 1.0
    total = args.steps or max(1, round(args.epochs * steps_per_epoch))
    warmup = round(total * args.warmup_epochs / args.epochs)
    cut = warmup > total // 2  # a warm-up longer than half the run (--epochs 5, 10 of warm-up): cut, so the lr peaks
    return steps_per_epoch, total, min(warmup, total // 2), cut

def prepare(model, optimizer, args, device, lr, step, total_steps=0):
    """bf16 and compile left at auto on the CPU chosen by timing (cpu_step_probe), the run's first line, and the model to
    train: in DDP on many GPUs, compiled with --compile. step(train_model) is one training step on a synthetic batch."""
    if args.amp is None or args.compile is None:  # only on the CPU: setup() turns both on with CUDA
        cpu_step_probe(model, optimizer, args, step, total_steps)
    print(f"{METHOD} | recipe {args.recipe} | ViT-{args.model_dims or args.model}/{args.patch_size} at {args.img_size} px "
          f"({count_params(model.encoder) / 1e6:.1f} M encoder, {count_params(model) / 1e6:.1f} M total) | batch "
          f"{WORLD * args.batch_size} = {WORLD} x {args.batch_size} | lr {lr:.2e} (blr {args.blr:.2e} x "
          f"{args.batch_size * WORLD}/256) | wd {args.weight_decay} | {device} bf16={args.amp} compile={args.compile}")
    if WORLD > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    return torch.compile(model) if args.compile else model

def cpu_step_probe(model, optimizer, args, step, total_steps):
    """bf16 autocast is faster on CPUs that compute bf16 natively and slower on others (and per method): time the step in
    fp32 and bf16, interleaved, and take bf16 only if 5% faster. Compiling (inductor) costs about a minute on 2 cores:
    tried for runs of 30 minutes or more, kept if faster. A run under 2 minutes is not probed (fp32, eager). Weights,
    optimizer and RNG are put back (the run is the one it would be without the probe); every rank takes rank 0's choice."""
    weights, optimizer_state = {k: v.clone() for k, v in model.state_dict().items()}, optimizer.state_dict()
    cpu, seconds, compile_auto = torch.device("cpu"), {}, args.compile is None
    amps = [False, True] if args.amp is None else [args.amp]
    args.amp, args.compile = amps[0], bool(args.compile)
    with torch.random.fork_rng(devices=[]):
        if rank0(total_steps * timed(lambda: step(model), 1, cpu) >= 120):  # (the first step also warms up)
            for amp in amps * 2:  # interleaved: the machine's speed drifts
                args.amp = amp
                seconds[amp] = min(seconds.get(amp, math.inf), timed(lambda: step(model), 1, cpu))
            args.amp = rank0(seconds[True] < 0.95 * seconds[False] if len(amps) == 2 else amps[0])
            if compile_auto and rank0(total_steps * seconds[args.amp] >= 30 * 60):
                args.compile, compiled = True, torch.compile(model)
                timed(lambda: step(compiled), 2, cpu)  # compiles
                seconds["compiled"] = timed(lambda: step(compiled), 2, cpu)
                args.compile = rank0(seconds["compiled"] < seconds[args.amp])
    model.load_state_dict(weights)
    optimizer.load_state_dict(optimizer_state)  # a new optimizer's: no state
    optimizer.zero_grad(set_to_none=True)
    if seconds:
        times = ", ".join(f"{ {False: 'fp32', True: 'bf16'}.get(k, k)} {v:.2f} s" for k, v in seconds.items())
        print(f"cpu step probe: {times} per step -> bf16={args.amp} compile={args.compile}"
              + ("" if "compiled" in seconds or not compile_auto else " (compile: tried for runs of 30 min or more)"))

def timed(fn, n, device):
    """Seconds per call of fn() over n calls, the device's queue drained before and after."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t) / n

def autocast(args):
    """bf16 autocast with --amp (bf16 needs no gradient scaler)."""
    return torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.amp)

def collate(samples):
    """torch's default_collate, except that images of different sizes (crops the device resamples) stay a list."""
    if isinstance(samples[0], torch.Tensor) and any(s.shape != samples[0].shape for s in samples):
        return list(samples)
    if isinstance(samples[0], (list, tuple)):
        return [collate(list(parts)) for parts in zip(*samples)]
    return torch.utils.data.default_collate(samples)

def to_device(batch, device):
    """A tensor, or a nested list of them (uint8 crops, colour parameters), moved without blocking."""
    if isinstance(batch, (list, tuple)):
        return [to_device(b, device) for b in batch]
    return batch.to(device, non_blocking=True)

class Run:
    """The loop's bookkeeping: data, schedule length, run folder or resumed state, log, checkpoints, signals."""
    def __init__(self, args, model, optimizer, transform, device):
        self.started = time.monotonic()  # the run's clock: the data set, the CPU probe and compilation count
        self.args, self.model, self.optimizer, self.device = args, model, optimizer, device
        self.dataset = Augmented(build_dataset(args.data, "train", args.img_size), transform)
        if isinstance(self.dataset.base, ImageFiles):  # photographs much larger than the crops: a smaller decode
            self.dataset.base.decode_side = decode_side(transform)
        self.global_batch = args.batch_size * WORLD  # --batch-size is per GPU
        self.steps_per_epoch, self.total_steps, self.warmup_steps, self.warmup_cut = plan(args, len(self.dataset),
                                                                                          self.global_batch)
        self.sampler = EpochSampler(len(self.dataset), args.seed, args.batch_size, RANK, WORLD)
        self.loader = torch.utils.data.DataLoader(
            self.dataset, args.batch_size, sampler=self.sampler, drop_last=True, collate_fn=collate,
            num_workers=args.num_workers, pin_memory=device.type == "cuda", persistent_workers=args.num_workers > 0,
            worker_init_fn=worker_ignores_signals,
            generator=torch.Generator().manual_seed(args.seed))  # its own generator: the global RNG (masks) is untouched
        self.step, self.stop, self.losses, self.seconds_before, self.knn = 0, [], [], 0.0, None

    def start(self, resumed=None):
        """The resumed run's weights, optimizer, RNG and folder, or a new folder; then the signals, the log, the monitor."""
        args = self.args
        if resumed:
            self.model.load_state_dict(resumed["model"])
            self.optimizer.load_state_dict(resumed["optimizer"])
            torch.set_rng_state(resumed["rng"]["torch"])
            if self.device.type == "cuda" and resumed["rng"]["cuda"] is not None:
                torch.cuda.set_rng_state(resumed["rng"]["cuda"], self.device)
            self.step, self.seconds_before = resumed["step"], resumed["efficiency"]["seconds"]  # the earlier processes'
            print(f"resumed from {args.resume} at step {self.step}")
            if resumed["num_images"] != len(self.dataset):
                print(f"warning: {args.data} now has {len(self.dataset)} images, the run started with "
                      f"{resumed['num_images']}: from here on the samples are drawn from the changed data set")
        run_dir = None
        if args.resume:
            run_dir = os.path.dirname(args.resume)
        elif RANK == 0:
            run_dir = make_run_dir(args)
        self.dir = rank0(run_dir)  # under torchrun: the folder rank 0 made
        self.ckpt_path = os.path.join(self.dir, "checkpoint.pt")
        if RANK == 0:  # the settings and the code that produced this run
            try:
                pathlib.Path(self.dir, "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=1))
                shutil.copyfile(__file__, os.path.join(self.dir, f"{METHOD}.py"))
            except OSError as e:
                if not args.resume:  # a new folder that holds nothing yet
                    shutil.rmtree(self.dir, ignore_errors=True)
                raise DataError(f"cannot write to run folder {self.dir}: {os.strerror(e.errno) if e.errno else e}"
                                f"{' (disk full?)' if e.errno == 28 else ''}; nothing was trained") from None
        budget = f" = {args.images:,} images (--images)" if args.images and not args.steps else ""
        print(f"{len(self.dataset)} images | {self.steps_per_epoch} steps/epoch | {self.total_steps} steps{budget} "
              f"({self.total_steps / self.steps_per_epoch:.4g} epochs, warm-up {self.warmup_steps} steps"
              f"{' = half the run' if self.warmup_cut else ''}) | writing to {self.dir}")
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self.request_stop)
        self.end_step = min(self.total_steps, self.step + args.stop_after) if args.stop_after else self.total_steps
        self.logger, self.last_save = Logger(self.dir, self.total_steps, self.global_batch, self.step, args.compile), time.monotonic()
        if args.knn_every:
            with torch.random.fork_rng(devices=[]):  # its loader draws a seed: not from the run's RNG
                self.knn = KnnMonitor.build(args, self.device)
            if self.knn and not resumed:
                self.monitor()  # the untrained encoder: the baseline every later value is read against

    def seconds(self):
        """Wall-clock seconds of the run so far, over every process of it (--resume adds up)."""
        return self.seconds_before + time.monotonic() - self.started

    def request_stop(self, signum, frame):  # finish the step, save, exit
        self.stop.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step (Ctrl-C again to quit now)", flush=True)

    def batches(self):
        """Each step's views on the device (the wait timed); an unreadable image ends the run with a checkpoint."""
        while self.step < self.end_step and not self.stop:
            self.sampler.set_epoch(self.step // self.steps_per_epoch, skip=self.step % self.steps_per_epoch * self.global_batch)
            it = iter(self.loader)
            while True:
                t = time.perf_counter()
                try:
                    batch = next(it, None)
                except BadImage as e:
                    self.save()
                    raise BadImage(f"{error_line(e)}; saved a checkpoint at step {self.step}: replace or remove that "
                                   f"file, then continue with --resume {self.dir}") from None
                self.logger.waited += time.perf_counter() - t
                if batch is None:
                    break
                yield to_device(batch[0], self.device)  # the views; the labels are not used
                if self.step == self.end_step or self.stop or self.step % self.steps_per_epoch == 0:
                    break  # the next epoch reshuffles
        if os.path.exists(self.ckpt_path):
            print(f"{'stopped' if self.step < self.total_steps else 'finished'} at step {self.step}/{self.total_steps}; "
                  f"checkpoint: {self.ckpt_path}")
        else:  # stopped before the first step: nothing to save
            print(f"stopped before the first step; no checkpoint: --resume {self.dir} starts this run afresh")

    def after_step(self, loss, lr, extras):
        """Count the step; log every --log-every steps; save every --save-minutes, at the end and on a signal."""
        self.losses.append(loss)
        self.step += 1
        sync_stop(self.stop, self.device)
        if self.step % self.args.log_every == 0 or self.step == self.end_step or self.stop:
            mean_loss = check_finite(self.losses, self.step - len(self.losses) + 1)
            self.logger.log(self.step, (self.step - 1) // self.steps_per_epoch, mean_loss, lr,
                            {k: rank_mean(v).item() for k, v in extras.items()}, self.seconds())
            self.losses = []
        every = max(1, round(self.args.knn_every * self.steps_per_epoch))  # (none just before the one at the end)
        if self.knn and (self.step == self.total_steps or self.step % every == 0 and self.total_steps - self.step > every / 2):
            self.monitor()
        if time.monotonic() - self.last_save > 60 * self.args.save_minutes or self.step == self.end_step or self.stop:
            self.save()

    def monitor(self):
        """kNN top-1 of the encoder evaluate.py uses by default, logged; its time is left out of img/s and ETA."""
        t = time.perf_counter()
        with torch.random.fork_rng(devices=[]):  # a fresh ViT's init must not move the run's RNG (resume is exact)
            acc = self.knn.accuracy(encoders_to_save(self.model), self.model.encoder)
        print(f"knn  {self.step:>7d}/{self.total_steps} | epoch {self.step // self.steps_per_epoch:>3d} | kNN top-1 {acc:.2f}% "
              f"(k=20, {self.knn.sizes[0]} train / {self.knn.sizes[1]} val images) | {time.perf_counter() - t:.1f} s", flush=True)
        self.logger.write(self.step, self.step // self.steps_per_epoch, self.seconds(),
                          **{"knn": acc, "knn/seconds": time.perf_counter() - t})
        plot_curves(self.logger.path)
        self.logger.t0 += time.perf_counter() - t  # the kNN and the plot are not training time

    def save(self):  # rank 0 writes; every rank holds the same weights
        if RANK == 0:
            names = {id(p): name for name, p in self.model.named_parameters()}  # what the optimizer's indices are
            save_checkpoint(self.ckpt_path, {
                "method": METHOD, "args": dataclasses.asdict(self.args), "step": self.step, "num_images": len(self.dataset),
                "world_size": WORLD, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "optimizer_param_names": [[names[id(p)] for p in g["params"]] for g in self.optimizer.param_groups],
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None},
                "encoder": self.model.encoder.state_dict(), "encoder_config": self.model.encoder.config,
                **encoders_to_save(self.model), "efficiency": self.efficiency()})
            plot_curves(self.logger.path)  # with every checkpoint: a run without a monitor has its curves too
        self.last_save = time.monotonic()

    def efficiency(self):
        """What the run cost so far: wall-clock, device-hours, steps, images, img/s and peak memory."""
        seconds, cuda = self.seconds(), self.device.type == "cuda"
        import resource  # on the CPU the process's peak resident memory (Linux reports KiB, macOS bytes)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**30 if sys.platform == "darwin" else 2**20)
        return {"seconds": seconds, "device_hours": seconds * WORLD / 3600, "devices": WORLD,
                "device": torch.cuda.get_device_name(self.device) if cuda else "CPU", "steps": self.step,
                "images_seen": self.step * self.global_batch, "img_per_s": self.step * self.global_batch / max(seconds, 1e-9),
                "peak_memory_gib": torch.cuda.max_memory_allocated(self.device) / 2**30 if cuda else rss,
                "peak_memory_of": "GPU (allocated)" if cuda else "process (RSS)"}

def save_checkpoint(path, state):
    """Write, then rename: a kill mid-save, NaN weights or a full disk leave the previous checkpoint in place."""
    if not all(t.isfinite().all() for t in state["model"].values() if t.is_floating_point()):
        raise DataError(f"the weights are NaN or inf at step {state['step']}: training diverged; the last good "
                        f"checkpoint {path} is kept; try a lower --blr or a longer warm-up")
    try:
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)
    except (OSError, RuntimeError) as e:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        reason = os.strerror(e.errno) if isinstance(e, OSError) and e.errno else str(e).splitlines()[0]
        raise DataError(f"cannot write checkpoint {path}: {reason} (disk full?); the previous checkpoint is kept") from None

def load_checkpoint(path):
    """(this method's checkpoint, its path); a run folder without one gives its settings, marked "fresh"."""
    path = os.path.join(path, "checkpoint.pt") if os.path.isdir(path) else path
    settings = os.path.join(os.path.dirname(path), "args.json")
    if not os.path.isfile(path) and os.path.isfile(settings):  # the run was stopped before its first checkpoint
        return {"fresh": True, "args": json.loads(pathlib.Path(settings).read_text()), "method": METHOD}, path
    if not os.path.isfile(path):
        raise DataError(f"checkpoint {path!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DataError(f"cannot load checkpoint {path}: not a PyTorch checkpoint, or a truncated or damaged "
                        f"one ({type(e).__name__})") from None
    method = ckpt.get("method") if isinstance(ckpt, dict) else None
    if method != METHOD:
        raise DataError(f"{path} is not a {METHOD}.py checkpoint (method: {method!r})")
    return ckpt, path

def make_run_dir(args):
    """A new folder OUT_DIR/RUN_NAME (default <method>-<data>-s<seed>-<date>-<time>, then -2, -3, ...)."""
    if os.path.isfile(args.out_dir):
        raise DataError(f"--out-dir {args.out_dir!r} is a file, not a folder")
    name = args.run_name or f"{METHOD}-{os.path.basename(os.path.normpath(args.data))}-s{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    for attempt in itertools.count(1):
        run_dir = os.path.join(args.out_dir, name if attempt == 1 else f"{name}-{attempt}")
        try:
            os.makedirs(args.out_dir, exist_ok=True)
            os.mkdir(run_dir)  # atomic: of two runs that start at once, one gets the folder
            return run_dir
        except FileExistsError:
            if args.run_name:
                raise DataError(f"run folder {run_dir} already exists: continue that run with --resume {run_dir}, "
                                "or choose another --run-name") from None
        except OSError as e:
            raise DataError(f"cannot create run folder {run_dir}: {os.strerror(e.errno) if e.errno else e}") from None

class Logger:
    """A fixed-format line every --log-every steps, and the same values (and the monitor's) as JSON lines in log.jsonl."""
    def __init__(self, run_dir, total_steps, batch_size, start_step, compiling=False):
        self.path, self.total, self.batch = os.path.join(run_dir, "log.jsonl"), total_steps, batch_size
        self.compiling = compiling  # the first window includes torch.compile's start-up: no ETA from it
        self.t0, self.step0, self.waited = time.perf_counter(), start_step, 0.0  # waited: for data, in this window
        if RANK == 0 and os.path.exists(self.path):  # a resumed run: drop what was logged after its checkpoint
            lines = pathlib.Path(self.path).read_text().splitlines(keepends=True)
            pathlib.Path(self.path).write_text("".join(l for l in lines if l.endswith("}\n") and json.loads(l)["step"] <= start_step))

    def log(self, step, epoch, loss, lr, extras, seconds):
        now = time.perf_counter()
        ips, wait = (step - self.step0) * self.batch / (now - self.t0), self.waited / (now - self.t0)  # wait: for data
        eta = str(datetime.timedelta(seconds=round((self.total - step) * self.batch / ips))) if ips > 0 else "--:--"
        eta, self.compiling = "--:-- (compiling)" if self.compiling else eta, False
        self.t0, self.step0, self.waited = now, step, 0.0
        print(f"step {step:>7d}/{self.total} | epoch {epoch:>3d} | loss {loss:.4f} | lr {lr:.2e} | {ips:>6.0f} img/s | "
              f"ETA {eta} | data wait {100 * wait:.0f}%{' (data-bound)' if wait > 0.1 else ''}"
              + "".join(f" | {k} {v:.4g}" for k, v in extras.items()), flush=True)
        self.write(step, epoch, seconds, **{"train/loss": loss, "train/lr": lr, "train/img_per_s": ips,
                                            "train/data_wait": wait, **{f"train/{k}": v for k, v in extras.items()}})

    def write(self, step, epoch, seconds, **values):
        if RANK == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, "epoch": epoch, **values, "minutes": seconds / 60}) + "\n")

def check_finite(losses, first_step):
    """The window's mean loss (over all ranks); stops at the first step whose loss is not finite."""
    values = rank_mean(torch.stack(losses).float()).cpu()
    bad = (~torch.isfinite(values)).nonzero()
    if len(bad):
        raise DataError(f"loss is {values[bad[0]].item()} at step {first_step + int(bad[0])}: training diverged; "
                        "try a lower --blr or a longer warm-up")
    return values.mean().item()

# ---- kNN monitor: are the features getting better? ----
class KnnMonitor:
    """kNN top-1 (k 20, T 0.07) of the encoder evaluate.py uses by default, on fixed random subsets of the train and val
    splits (seed 0: evaluate.py's --max-train-images / --max-val-images), centre crops decoded once. Each rank embeds a
    contiguous share of the images and the features are gathered: one answer, whatever the number of GPUs."""
    def __init__(self, args, device, train, val, labels):
        self.args, self.device, self.sizes, self.labels, self.images = args, device, (len(train), len(val)), labels, {}
        for split, ds in (("train", train), ("val", val)):
            share = -(-len(ds) // WORLD)  # rows per rank, the last rank's padded
            mine = torch.utils.data.Subset(ds, range(RANK * share, min(len(ds), RANK * share + share)))
            loader = torch.utils.data.DataLoader(mine, batch_size=256, worker_init_fn=worker_ignores_signals,
                                                 num_workers=min(args.num_workers, 4) if len(mine) > 2000 else 0)
            images = torch.cat([x for x, _ in loader] + [torch.zeros(0, 3, args.img_size, args.img_size, dtype=torch.uint8)])
            self.images[split] = torch.cat([images, images.new_zeros(share - len(images), *images.shape[1:])])

    @classmethod
    def build(cls, args, device):
        """The monitor, or None (with a note) when the data has no labels or no val split."""
        try:
            train, val = build_dataset(args.data, "train", args.img_size), build_dataset(args.data, "val", args.img_size)
        except DataError as e:
            return print(f"kNN monitor off: {error_line(e)}")
        if isinstance(train, ImageFiles) and (not train.classes or set(val.classes) - set(train.classes)):
            return print("kNN monitor off: the data has no class folders, or val/ has classes that train/ lacks")
        subsets, labels = [], []
        for ds, n in ((train, args.knn_train), (val, args.knn_val)):
            keep = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n].tolist()
            subsets.append(torch.utils.data.Subset(Augmented(ds, eval_transform(args.img_size, uint8=True)), keep))
            y = [ds.samples[i][1] for i in keep] if isinstance(ds, ImageFiles) else [int(ds[i][1]) for i in keep]
            if isinstance(ds, ImageFiles) and ds is val:  # val's classes matched to train's by folder name
                y = [train.classes.index(val.classes[label]) for label in y]
            labels.append(torch.tensor(y))
        return cls(args, device, *subsets, labels)

    @torch.no_grad()
    def features(self, encoder, split):
        """The CLS features of this split's subset: every rank's share (padded to the same rows), gathered in rank order."""
        mine = self.images[split]
        feats = torch.cat([encoder(normalize(mine[i:i + 256].to(self.device).float() / 255)).float()
                           for i in range(0, len(mine), 256)])
        if WORLD > 1:
            parts = [torch.empty_like(feats) for _ in range(WORLD)]
            dist.all_gather(parts, feats)
            feats = torch.cat(parts)
        return feats[:self.sizes[split == "val"]].cpu()

    def accuracy(self, saved, online):
        """saved: the method's encoders_to_save(); online: its encoder (for the shape and the online weights)."""
        encoder = ViT(**online.config).to(self.device)
        encoder.load_state_dict(saved["target_encoder"] if saved["default_encoder"] == "target" else online.state_dict())
        encoder.eval()
        with autocast(self.args):
            train_f, val_f = self.features(encoder, "train"), self.features(encoder, "val")
        train_y, val_y = self.labels
        preds = knn_predict(train_f, train_y, val_f, 20, 0.07, int(max(train_y.max(), val_y.max())) + 1)
        return 100.0 * (preds == val_y).float().mean().item()

# ---- pictures ----
def plot_curves(log_path):
    """curves.png next to log.jsonl: the loss and the kNN accuracy against minutes (needs matplotlib, optional).
    Returns what it drew, {"train/loss": [(minutes, loss), ...], "knn": [...]}, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not os.path.exists(log_path):  # nothing logged yet
        return None
    rows = [json.loads(line) for line in pathlib.Path(log_path).read_text().splitlines() if line.endswith("}")]
    drawn = {key: [(r["minutes"], r[key]) for r in rows if key in r] for key in ("train/loss", "knn")}
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, (key, points), label in zip(axes, drawn.items(), ("training loss", "kNN top-1 (%)")):
        if points:
            ax.plot(*zip(*points), marker="o" if key == "knn" or len(points) < 20 else None)
        ax.set(xlabel="minutes of training", ylabel=label, title=f"{METHOD}: {label}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(os.path.dirname(log_path), "curves.png"), dpi=100)
    plt.close(fig)
    return drawn

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
    main(lambda: train(parse_args()))
# ==== end SHARED ====
