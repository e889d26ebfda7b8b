"""
Layer Grafted Pre-training: Bridging Contrastive Learning and Masked Image Modeling for
Label-Efficient Representations (Jiang, Chen, Wang, ... , Wang, ICLR 2023)
arXiv:2302.14138, official code github.com/VITA-Group/layerGraftedPretraining_ICLR23

Masked image modeling (MIM) suits the lower layers of a ViT, contrastive learning (CL) the higher
ones, and training one encoder on both losses at once makes their gradients conflict. So graft:
step 1 trains a MAE (mae.py); step 2 starts MoCo v3 from the MAE encoder, with the lower layers
learning at 1/10 of the lr (a soft "MIM -> CL" boundary) and the top third at the full lr.
This file is step 2, the multi-task baseline it is compared with, and the measurement of the
gradient conflict that motivates it.

Run:
    python mae.py --data imagenet/                                   # step 1 (or any mae.py run)
    python grafting.py --data imagenet/ --mae-ckpt runs/<mae-run>/checkpoint.pt   # step 2: MoCo v3 on top
    python grafting.py --mae-ckpt runs/<mae-run>/checkpoint.pt --freeze-lower    # hard "MIM -> CL" (seed Tab. 1)
    python grafting.py --mode mtl                                    # the baseline: L = L_MIM + L_CL, one encoder
    python grafting.py --analyze-gradients runs/<run>/checkpoint.pt  # per-block gradient conflict table + PNG
    python mae.py --data fake --device cpu --steps 10 --batch-size 16 --model-dims 64,3,4 --decoder-dim 32 --decoder-depth 1 --decoder-heads 2 --out-dir runs --run-name mae-smoke
    python grafting.py --data fake --device cpu --steps 10 --batch-size 16 --mlp-dim 128 --mae-ckpt runs/mae-smoke/checkpoint.pt   # seconds
    python evaluate.py --ckpt runs/<run>/checkpoint.pt --data cifar10   # kNN + linear probe (base encoder)
Expected result of the default run: not yet measured on a GPU (see README.md for measured runs).

Paper -> code
  1. Step 1, MIM: a MAE checkpoint written by mae.py                             -> --mae-ckpt, load_mae_checkpoint()
  2. Step 2 init: the MAE encoder in both the MoCo v3 base and momentum encoders -> build_model()
  3. Step 2 "smoothing the boundary": embeddings + lower 2/3 of the blocks at lr / 10,
     top 1/3, final norm and heads at the full lr (official --lr_layer_wise)      -> param_groups(), --lower-blocks, --lower-lr-ratio
     the hard version, lower layers frozen (seed Tab. 1 "MIM -> CL")             -> --freeze-lower
  4. Step 2 loss: MoCo v3 exactly (moco.py): 2 tau x InfoNCE, symmetric, momentum encoder -> contrastive_loss(), Grafting.contrastive()
  5. "MTL combination": one encoder, MIM on a minimally augmented view + CL on two strong views -> --mode mtl, Grafting.forward()
  6. Gradient conflict C(x) = <g_MIM / |g_MIM|, g_CL / |g_CL|> per sample x and per block -> analyze_gradients(), block_cosines()

Deviations from the paper
  - One GPU: batch 256 instead of 4096 (ViT-L: 2080); lr = blr x batch / 256 as in MoCo v3.
  - The official ViT-L run adds an L1 pull of the lower half toward its MAE weights
    (1e-5 x sum |theta - theta_MAE|); not implemented here (ViT-B does not use it).
  - Weight decay skips 1-D parameters (biases, norm weights) and nothing else, as the official grafting
    code does (main_pretrain.py passes no_weight_decay_list=[] to param_groups_lrd_moco), so CLS is
    decayed (moco.py decays every parameter, as the MoCo v3 code does).
  - The released main_pretrain.py never calls scaler.step() (REFERENCE §7.5); here the optimizer steps.
  - The seed gives no weights for the MTL loss: L = L_MIM + L_CL, 1 : 1. The MTL baseline is not in
    the released code; here it trains every layer at the full lr. Like MoCo v3, both modes freeze the
    patch embedding (--no-freeze-patch-embed trains it).
  - The gradient measurement is not in the released code (its eval_gradient.py saves supervised
    gradients); it is built from the seed's formula: per sample, L_MIM with that sample's own mask,
    L_CL as that sample's two query terms with the batch's keys as constants, the heads' BatchNorm
    in eval mode so that samples do not couple, and gradients w.r.t. one block's parameters at a time.
  - CIFAR-10 recipe (our choice, no official one): the MAE checkpoint's ViT, 100 epochs of step 2
    (the seed's Tab. 1 length), batch 256.
  - CPU recipe (--recipe cpu; what --recipe auto picks without a GPU, README "I only have a laptop"):
    step 2 on the checkpoint of mae.py's CPU recipe (a ViT 128 wide, 6 deep), MLP heads 1,024 wide,
    batch 128, blr 1.5e-3, momentum 0.99, crops of at least 20% of the image, a run of 70,000 images
    (--images) with a tenth of warm-up: about 15 minutes on 2 cores after MAE's, where the paper runs
    300 epochs of step 2 on ViT-B/16 at batch 4096.
  - Views are made in two halves (README "Input pipeline"): the data workers decode, crop and flip
    each image and draw its colour parameters under the sample's own seed; the device applies colour
    jitter, grayscale, blur and solarize to the whole batch (colour_augment(), device_views()), from
    the same distributions as the official torchvision / PIL transforms (tests/test_views.py). The
    blur is a true Gaussian (torchvision's GaussianBlur); the official code uses PIL's
    ImageFilter.GaussianBlur, a box-filter approximation of it with radius = sigma.
    PIL's colour jitter also rounds to 8 bits after each of its ops; ours stays in float until the
    normalisation (on average about 1 grey level apart, up to 18 where the hue turns).

Many GPUs (torchrun; README "Many GPUs")
  - MoCo v3's part as in moco.py: keys gathered from every GPU, each query's positive at its global
    index (official deit_utils/engine.py and moco builder: concat_all_gather) -> contrastive_loss(), all_gather()
  - BatchNorm of projector and predictor over the global batch, as main_moco.py's SyncBatchNorm (the
    grafting repository's main_pretrain.py does not convert them)           -> GlobalBatchNorm1d
  - --mode mtl: MAE's masks drawn for the global batch, each rank keeping its rows -> random_masking(), global_rand()
"""
# ---------------------------------------------------------------- imports (the machinery's own are at its start)
import copy
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from einops import repeat

from vit import Block, SIZES, ViT, sincos_pos_embed

METHOD = "grafting"


# ---------------------------------------------------------------- views
# MoCo v3's two colour recipes (each a Colour of the shared colour block, after train())
MOCO_COLOURS = [dict(jitter=(0.4, 0.4, 0.2, 0.1), blur_p=1.0),                  # view 1: always blurred
                dict(jitter=(0.4, 0.4, 0.2, 0.1), blur_p=0.1, solarize_p=0.2)]  # view 2: rarely blurred, solarised


def train_transform(args):
    """The two strong views of MoCo v3 (BYOL's asymmetric pair, as moco.py and the official
    utils/pretrain.py): random resized crop (0.08, 1) and a flip here, per image; on the device, colour
    jitter (0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale 0.2; view 1 always blurred; view 2 blurred with
    p 0.1 and solarised with p 0.2. --mode mtl adds a third, minimally augmented view for the MIM
    loss: MAE's crop (0.2, 1), bicubic, and flip, no colour."""
    crop = T.Compose([T.RandomResizedCrop(args.img_size, scale=(args.crop_min_scale, 1.0)), T.RandomHorizontalFlip(),
                      T.PILToTensor()])
    if args.mode == "graft":
        return CropViews(args.img_size, [crop, crop], [Colour(**c) for c in MOCO_COLOURS])
    minimal = T.Compose([
        T.RandomResizedCrop(args.img_size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.PILToTensor(),
    ])
    return CropViews(args.img_size, [crop, crop, minimal], [Colour(**c) for c in MOCO_COLOURS] + [None])


def device_views(batch, args):
    """The device side: each strong view's colour, then normalisation, on the whole batch (the minimal
    view of --mode mtl is only normalised)."""
    crops, params = batch
    return [normalize(colour_augment(x, params[:, i], blur_kernel_size(args.img_size)) if i < 2 else x.float() / 255)
            for i, x in enumerate(crops)]


# ---------------------------------------------------------------- model
# MAE pieces, the same text as in mae.py
def random_masking(x, mask_ratio, noise=None, n_keep=None):
    """MAE Sec. 3: "randomly shuffle the list of tokens and remove the last portion of the list".
    x: (B, N, D) patch tokens with positions. Every sample gets its own mask, but all keep the same
    number n_keep (default int(N * (1 - mask_ratio)), MAE's rounding), so the batch stays one dense
    tensor. noise (B, N): the shuffle keys, uniform by default.
    Returns x_visible (B, N_keep, D); mask (B, N) float, 1 = masked (predicted), 0 = visible;
    ids_restore (B, N), the permutation that puts the shuffled list back in raster order."""
    B, N, D = x.shape
    n_keep = int(N * (1 - mask_ratio)) if n_keep is None else n_keep
    if noise is None:
        noise = global_rand(B, N, device=x.device)    # (B, N) uniform noise per patch
    ids_shuffle = noise.argsort(dim=1)                # shuffle: patches with small noise come first
    ids_restore = ids_shuffle.argsort(dim=1)          # inverse permutation: argsort of a permutation
    ids_keep = ids_shuffle[:, :n_keep]                # keep the first part of the shuffled list
    x_visible = x.gather(1, repeat(ids_keep, "b n -> b n d", d=D))  # (B, N_keep, D)
    mask = torch.ones(B, N, device=x.device)
    mask[:, :n_keep] = 0                              # in shuffled order: kept first, removed last
    mask = mask.gather(1, ids_restore)                # (B, N) back in raster order
    return x_visible, mask, ids_restore


# MAE decoder specifics
class MAEDecoder(nn.Module):
    """Sec. 3 "MAE decoder": a linear projection of the encoded visible tokens, a shared learned
    [mask] token at every removed position, its own fixed sin-cos positions, a few Transformer
    blocks, and a linear layer to out_dim values per patch."""

    def __init__(self, enc_dim, dim, depth, heads, out_dim, grid):
        super().__init__()
        self.embed = nn.Linear(enc_dim, dim)  # "a single projection layer" (seed 003)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(sincos_pos_embed(dim, *grid).unsqueeze(0), requires_grad=False)
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, out_dim)
        nn.init.normal_(self.mask_token, std=0.02)  # MAE's initialisation (REFERENCE §0.4)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, latent, ids_restore):
        """latent (B, 1 + N_keep, D_enc) with CLS first -> predictions (B, N, out_dim) in raster order."""
        x = self.embed(latent)                                           # (B, 1 + N_keep, D_dec)
        B, N = ids_restore.shape
        mask_tokens = self.mask_token.expand(B, N + 1 - x.shape[1], -1)  # (B, N - N_keep, D_dec)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)                   # shuffled order: visible, then masked
        x_ = x_.gather(1, repeat(ids_restore, "b n -> b n d", d=x.shape[-1]))  # unshuffle to raster order
        x = torch.cat([x[:, :1], x_], dim=1) + self.pos_embed            # (B, 1 + N, D_dec)
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))[:, 1:]                            # drop CLS: (B, N, out_dim)


# MoCo v3 pieces, the same text as in moco.py
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


def momentum_at(progress, m0):
    """m = 1 - (1 - m0) (1 + cos(pi t / T)) / 2, t / T = progress: m0 at the start, 1 at the end."""
    return 1 - (1 - m0) * (1 + math.cos(math.pi * progress)) / 2


class Grafting(nn.Module):
    """MoCo v3 (moco.py) and MAE's decoder (mae.py) on one shared encoder. --mode graft trains the
    MoCo v3 part only and keeps the MAE decoder frozen, so that --analyze-gradients can still
    compute the MIM loss of a grafted checkpoint; --mode mtl trains both."""

    def __init__(self, encoder, proj_dim=256, mlp_dim=4096, tau=0.2, decoder_dim=512, decoder_depth=8,
                 decoder_heads=16, mask_ratio=0.75, norm_pix_loss=True):
        super().__init__()
        self.tau, self.mask_ratio, self.norm_pix_loss = tau, mask_ratio, norm_pix_loss
        # f_q: backbone + projector (3 layers) + predictor (2 layers), as in moco.py
        self.encoder = encoder
        self.projector = mlp(3, encoder.dim, mlp_dim, proj_dim)
        self.predictor = mlp(2, proj_dim, mlp_dim, proj_dim)
        # MAE's decoder, as in mae.py
        p = encoder.patch_size
        self.decoder = MAEDecoder(encoder.dim, decoder_dim, decoder_depth, decoder_heads, p * p * 3, encoder.grid)
        # f_k: a momentum copy of backbone + projector, never trained by gradients. Made here, after
        # the encoder got its MAE weights, so both encoders start from step 1's result.
        self.momentum_encoder = copy.deepcopy(encoder)
        self.momentum_projector = copy.deepcopy(self.projector)
        for p in self.momentum_parameters():
            p.requires_grad_(False)

    def momentum_parameters(self):
        return list(self.momentum_encoder.parameters()) + list(self.momentum_projector.parameters())

    @torch.no_grad()
    def momentum_update(self, m):
        """MoCo v3 Alg. 1: f_k.params = m * f_k.params + (1 - m) * f_q.params (parameters only).
        Parameters the online model does not train (the frozen patch embedding, frozen lower
        blocks, the sin-cos table) are skipped, so they stay at their MAE values in both encoders."""
        pairs = [(t, o) for t, o in zip(self.momentum_parameters(),
                                        list(self.encoder.parameters()) + list(self.projector.parameters()))
                 if o.requires_grad]
        target, online = [t for t, _ in pairs], [o for _, o in pairs]
        torch._foreach_mul_(target, m)
        torch._foreach_add_(target, online, alpha=1 - m)

    def queries(self, x1, x2):
        """q = predictor(projector(encoder(x))) for both views; the backbone sees both in one batch."""
        h1, h2 = self.encoder(torch.cat([x1, x2])).chunk(2)              # 2 x (B, D)
        return self.predictor(self.projector(h1)), self.predictor(self.projector(h2))

    @torch.no_grad()
    def keys(self, x1, x2):
        """k = momentum projector(momentum encoder(x)) for both views, no gradient."""
        g1, g2 = self.momentum_encoder(torch.cat([x1, x2])).chunk(2)
        return self.momentum_projector(g1), self.momentum_projector(g2)

    def contrastive(self, x1, x2):
        """L_CL: MoCo v3's symmetrised InfoNCE of two strong views (the momentum update comes first, in train_step)."""
        q1, q2 = self.queries(x1, x2)
        k1, k2 = self.keys(x1, x2)
        return moco_loss(q1, q2, k1, k2, self.tau)

    def masked_modeling(self, imgs, noise=None):
        """L_MIM: MAE's loss of one view: mask, encode the visible patches, decode, MSE on the masked ones."""
        x = self.encoder.embed(imgs)                                     # (B, N, D)
        x_visible, mask, ids_restore = random_masking(x, self.mask_ratio, noise)
        pred = self.decoder(self.encoder.forward_tokens(x_visible), ids_restore)  # (B, N, p*p*3)
        return mae_loss(pred, self.encoder.patchify(imgs), mask, self.norm_pix_loss)

    def forward(self, x1, x2, x_mim=None):
        """--mode graft: (x1, x2) -> L_CL. --mode mtl: (x1, x2, x_mim) -> L_MIM + L_CL (the seed's MTL
        combination, weights 1 : 1). Returns (loss, {"cl": L_CL[, "mim": L_MIM]})."""
        loss_cl = self.contrastive(x1, x2)
        if x_mim is None:
            return loss_cl, {"cl": loss_cl.detach()}
        loss_mim = self.masked_modeling(x_mim)
        return loss_mim + loss_cl, {"cl": loss_cl.detach(), "mim": loss_mim.detach()}


def read_checkpoint(path, what="checkpoint"):
    """(the checkpoint dict, its path) for a checkpoint.pt or its run folder, with one-line errors."""
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.pt")
    if not os.path.isfile(path):
        raise DataError(f"{what} {path!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True), path
    except Exception as e:
        raise DataError(f"cannot load {what} {path}: {e}") from None


def load_mae_checkpoint(path):
    """Step 1's result: a checkpoint written by mae.py, with a clear error for anything else."""
    if not path:
        raise DataError("--mode graft needs --mae-ckpt: a checkpoint.pt written by mae.py (step 1)")
    ckpt, path = read_checkpoint(path, "MAE checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("method") != "mae":
        found = ckpt.get("method") if isinstance(ckpt, dict) else None
        raise DataError(f"--mae-ckpt {path} is not a mae.py checkpoint (method: {found!r})")
    return ckpt


def adopt_mae_shape(args, mae):
    """The encoder and decoder shapes of this run are the MAE checkpoint's; a flag that asks for
    another shape is an error, not a silent change."""
    cfg, mae_args = mae["encoder_config"], mae["args"]
    dims = f"{cfg['dim']},{cfg['depth']},{cfg['heads']}"
    asked = args.model_dims or (",".join(map(str, SIZES[args.model])) if args.model in SIZES else None)
    if asked and asked.replace(" ", "") != dims:
        raise DataError(f"--mae-ckpt holds a ViT of width,depth,heads {dims} but --model/--model-dims asks for "
                        f"{asked}; drop the flag to use the checkpoint's shape")
    for name in ("img_size", "patch_size"):
        if getattr(args, name) not in (None, cfg[name]):
            raise DataError(f"--mae-ckpt was trained with {name.replace('_', '-')} {cfg[name]}, "
                            f"not {getattr(args, name)}; drop the flag to use the checkpoint's")
    args.model_dims, args.img_size, args.patch_size = dims, cfg["img_size"], cfg["patch_size"]
    for name in ("decoder_dim", "decoder_depth", "decoder_heads", "norm_pix_loss"):
        setattr(args, name, mae_args[name])


def lower_block_count(args, depth):
    """--lower-blocks, or the lower 2/3 of the blocks (official: 8 of 12, 16 of 24)."""
    n = round(depth * 2 / 3) if args.lower_blocks < 0 else args.lower_blocks
    if not 0 <= n <= depth:
        raise DataError(f"--lower-blocks {args.lower_blocks} is outside 0..{depth} (the encoder's depth)")
    return n


def lower_parameters(encoder, n_lower):
    """The slow (or frozen) part: patch embedding, CLS, positions and the first n_lower blocks."""
    return [encoder.patch_embed.proj.weight, encoder.patch_embed.proj.bias, encoder.cls_token, encoder.pos_embed,
            *[p for block in encoder.blocks[:n_lower] for p in block.parameters()]]


def build_model(args, mae=None):
    """Grafting model of args' shape; with a MAE checkpoint, its encoder goes into both the base and
    the momentum encoder and its decoder into the decoder. Then the parts that do not train are frozen."""
    encoder = build_encoder(args)
    if mae is not None:
        encoder.load_state_dict(mae["encoder"])
    model = Grafting(encoder, args.proj_dim, args.mlp_dim, args.tau, args.decoder_dim, args.decoder_depth,
                     args.decoder_heads, args.mask_ratio, args.norm_pix_loss)
    if mae is not None:
        model.decoder.load_state_dict({k.removeprefix("decoder."): v for k, v in mae["model"].items()
                                       if k.startswith("decoder.")})
    if args.freeze_patch_embed:  # official --stop-grad-conv1: the patch embedding keeps its MAE values
        encoder.patch_embed.requires_grad_(False)
    if args.mode == "graft":
        model.decoder.requires_grad_(False)  # kept for --analyze-gradients, not trained by MoCo v3
        if args.freeze_lower:  # seed Tab. 1 "MIM -> CL": the lower layers stay MAE's
            for p in lower_parameters(encoder, lower_block_count(args, len(encoder.blocks))):
                p.requires_grad_(False)
    return model


def param_groups(model, weight_decay, n_lower, lower_lr_ratio):
    """Layer-wise lrs (official utils_mae/lr_decay.py param_groups_lrd_moco): the embeddings and the
    first n_lower blocks get lr_scale = lower_lr_ratio, everything else (the top blocks, the final
    norm, projector and predictor) lr_scale = 1; train_step sets lr = lr_now x lr_scale. No weight
    decay on 1-D parameters only (official no_weight_decay_list=[]: CLS is decayed). Frozen parameters
    (the sin-cos table) are left out."""
    lower = {id(p) for p in lower_parameters(model.encoder, n_lower)}
    groups = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        scale = lower_lr_ratio if id(p) in lower else 1.0
        decay = 0.0 if p.ndim <= 1 else weight_decay
        groups.setdefault((scale, decay), {"params": [], "lr_scale": scale, "weight_decay": decay})["params"].append(p)
    return list(groups.values())


def encoders_to_save(model):
    """Both encoders; evaluate.py uses the base (online) encoder by default, as the official code (REFERENCE §8)."""
    return {"target_encoder": model.momentum_encoder.state_dict(), "default_encoder": "online"}


# ---------------------------------------------------------------- loss
def mae_loss(pred, target, mask, norm_pix_loss=True):
    """MAE Sec. 3: L = sum_{b,n} M_bn * mean_d (pred_bnd - t_bnd)^2 / sum_{b,n} M_bn, only masked
    patches count (M = 1). With norm_pix_loss, t = (x - mean) / sqrt(var + 1e-6) per patch, using the
    unbiased variance of that patch's p*p*3 values (as the official forward_loss does).
    pred, target: (B, N, p*p*3); mask: (B, N), 1 = masked."""
    pred = pred.float()  # the loss in fp32 even under bf16 autocast
    if norm_pix_loss:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(dim=-1)                     # (B, N)
    return (per_patch * mask).sum() / mask.sum()


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
    """One step of stage 2 in MoCo v3's order: the momentum update of the key encoder, then MoCo v3's loss on
    two strong views (plus MAE's loss on a third view with --mode mtl), backward, and the AdamW step with the
    lower layers at lower_lr_ratio x lr. train_model runs the forward (model itself, or its DDP / compiled
    wrapper); returns the loss and extra metrics, as tensors (no sync)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]  # the lower layers learn at lower_lr_ratio x lr
    m = momentum_at(progress, args.momentum)
    model.momentum_update(m)  # MoCo v3 Alg. 1: the key encoder is updated before the keys are computed
    with autocast(args):
        loss, parts = train_model(*views)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), {**parts, "m": torch.tensor(m)}


# ---------------------------------------------------------------- gradient conflict (seed 002, Sec. "Conflicts")
def block_cosines(loss_a, loss_b, blocks):
    """C = <g_a / |g_a|, g_b / |g_b|> for each block, g = the gradient of the loss w.r.t. all of
    that block's parameters, flattened into one vector. A block that one loss does not reach has
    g = 0 and C = 0. Returns (len(blocks),)."""
    params = [list(block.parameters()) for block in blocks]
    flat = [p for ps in params for p in ps]
    grads = []
    for loss in (loss_a, loss_b):
        g = torch.autograd.grad(loss, flat, allow_unused=True)
        g = [torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, flat)]
        per_block, start = [], 0
        for ps in params:
            per_block.append(torch.cat([gi.flatten().float() for gi in g[start:start + len(ps)]]))
            start += len(ps)
        grads.append(per_block)
    return torch.stack([F.cosine_similarity(a, b, dim=0, eps=1e-12) for a, b in zip(*grads)])


def sample_gradient_conflict(model, x_mim, x1, x2, k1, k2, i):
    """C_MIM,CL(x_i) for every encoder block. L_MIM(x_i): MAE's loss of sample i alone, with its own
    random mask. L_CL(x_i): sample i's two query terms of MoCo v3's loss, ctr(q1_i, k2) + ctr(q2_i, k1),
    against the keys of i's batch (constants). The keys are reordered so that i's own key comes
    first, which is where contrastive_loss() looks for the positive of a single query."""
    def own_first(k):
        return torch.cat([k[i:i + 1], k[:i], k[i + 1:]])
    loss_mim = model.masked_modeling(x_mim[i:i + 1])
    q1, q2 = model.queries(x1[i:i + 1], x2[i:i + 1])
    loss_cl = contrastive_loss(q1, own_first(k2), model.tau) + contrastive_loss(q2, own_first(k1), model.tau)
    return block_cosines(loss_mim, loss_cl, model.encoder.blocks)


def load_for_analysis(path, args):
    """A grafting.py checkpoint (any mode) as trained, or a mae.py checkpoint as grafting's starting
    point (its encoder and decoder, fresh MoCo v3 heads). Returns (model, its Args, description)."""
    ckpt, path = read_checkpoint(path)
    method = ckpt.get("method") if isinstance(ckpt, dict) else None
    if method == METHOD:
        run_args = Args(**ckpt["args"])
        model = build_model(run_args)
        model.load_state_dict(ckpt["model"])
        return model, run_args, path, f"{METHOD} (mode {run_args.mode}), step {ckpt['step']}"
    if method == "mae":
        run_args = dataclasses.replace(args, mae_ckpt=path, mode="mtl")
        adopt_mae_shape(run_args, ckpt)
        apply_recipe(run_args)
        torch.manual_seed(args.seed)
        return build_model(run_args, ckpt), run_args, path, f"mae step {ckpt['step']} (MoCo v3 heads at init)"
    raise DataError(f"--analyze-gradients needs a grafting.py or mae.py checkpoint; {path} is from {method!r}")


def analyze_gradients(args):
    """Measure C_MIM,CL(x) per sample and per block on --analyze-samples images of --data; print a
    table (mean, std, fraction below 0 per block), write gradient_conflict.json and a box plot PNG
    next to the checkpoint. One process measures: under torchrun the other ranks end at once (the analysis
    uses no collective, so none waits for them)."""
    if os.environ.get("RANK", "0") != "0":
        return None
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda was asked for but no GPU is visible; use --device cpu")
    model, run_args, path, what = load_for_analysis(args.analyze_gradients, args)
    model.to(device).eval()  # BN of the heads in eval mode: each sample's loss depends on it alone
    model.encoder.requires_grad_(True)  # frozen parts still have a gradient to measure
    view_args = dataclasses.replace(run_args, mode="mtl")  # two strong views and the minimal one
    dataset = build_dataset(args.data, "train", run_args.img_size)
    n = min(args.analyze_samples, len(dataset))
    if n < 2:
        raise DataError(f"--analyze-samples must be at least 2 (the CL loss needs other images' keys), got {n}")
    # each sample's CL loss sees the keys of its own batch of the run's --batch-size, as in training,
    # so the measurement does not change with --analyze-samples (which is rounded down to whole batches)
    batch = min(run_args.batch_size, n)
    n = n // batch * batch
    picks = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed))[:n].tolist()
    views = Augmented(dataset, train_transform(view_args))
    batch_of_views = torch.utils.data.default_collate([views[(j, args.seed + j)][0] for j in picks])
    x1, x2, x_mim = device_views(to_device(batch_of_views, device), view_args)
    torch.manual_seed(args.seed)  # the masks
    print(f"gradient conflict | {what} | {n} images of {args.data} in batches of {batch} | "
          f"{len(model.encoder.blocks)} blocks")
    t0 = time.perf_counter()
    cos = []
    for b in range(0, n, batch):
        x1_b, x2_b, x_mim_b = x1[b:b + batch], x2[b:b + batch], x_mim[b:b + batch]
        k1, k2 = model.keys(x1_b, x2_b)  # constants for every sample's CL loss in this batch
        cos += [sample_gradient_conflict(model, x_mim_b, x1_b, x2_b, k1, k2, i).cpu() for i in range(batch)]
    cos = torch.stack(cos)  # (n, depth)
    print(f"{n} samples in {time.perf_counter() - t0:.0f} s\n")
    print("| block | mean C | std | median | fraction C < 0 | min | max |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for b in range(cos.shape[1]):
        c = cos[:, b]
        row = {"block": b + 1, "mean": c.mean().item(), "std": c.std().item(), "median": c.median().item(),
               "frac_negative": (c < 0).float().mean().item(), "min": c.min().item(), "max": c.max().item()}
        rows.append(row)
        print(f"| {b + 1} | {row['mean']:+.4f} | {row['std']:.4f} | {row['median']:+.4f} | "
              f"{row['frac_negative']:.2f} | {row['min']:+.3f} | {row['max']:+.3f} |")
    folder = os.path.dirname(path)
    result = {"checkpoint": path, "model": what, "data": args.data, "samples": n, "batch": batch, "blocks": rows,
              "cosines": cos.tolist()}
    with open(os.path.join(folder, "gradient_conflict.json"), "w") as f:
        json.dump(result, f)
    png = os.path.join(folder, "gradient_conflict.png")
    box_plot(cos, png, f"{what}, {n} images")
    print(f"\nwrote {os.path.join(folder, 'gradient_conflict.json')} and {png}")
    return result


def box_plot(values, path, title):
    """A box plot per column of values (n, blocks), drawn with Pillow (torchvision's own dependency,
    so no plotting package is needed): box = quartiles, line = median, whiskers = 5th to 95th
    percentile, dot = mean; the dashed line is C = 0."""
    from PIL import Image, ImageDraw
    n_cols = values.shape[1]
    W, H, left, right, top, bottom = max(420, 80 + 56 * n_cols), 380, 60, 20, 56, 40
    width = (W - left - right) / n_cols  # the columns fill the plot
    lo = min(values.min().item(), 0.0)
    hi = max(values.max().item(), 0.0)
    lo, hi = lo - 0.05 * (hi - lo + 1e-6), hi + 0.05 * (hi - lo + 1e-6)
    def y(v):
        return top + (hi - v) / (hi - lo) * (H - top - bottom)
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    draw.text((left, 6), "cos(grad L_MIM, grad L_CL) per sample; box: quartiles, whiskers: 5-95%, dot: mean", fill="black")
    draw.text((left, 22), title, fill="black")
    draw.text((4, top - 16), "cosine C", fill="black")  # the y-axis
    draw.line([(left, top), (left, H - bottom), (W - right, H - bottom)], fill="black")
    raw = (hi - lo) / 5  # ticks at round multiples of a 1, 2 or 5 step, so 0 is one of them
    step = min(m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10) if m * 10 ** math.floor(math.log10(raw)) >= raw)
    for k in range(math.ceil(lo / step), math.floor(hi / step) + 1):
        t = k * step
        draw.line([(left - 4, y(t)), (left, y(t))], fill="black")
        draw.text((4, y(t) - 6), f"{t:+.2g}" if t else "0", fill="black")
    for x0 in range(left, W - right, 8):  # C = 0
        draw.line([(x0, y(0)), (x0 + 4, y(0))], fill="gray")
    q = torch.quantile(values.float(), torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95]), dim=0)  # (5, n_cols)
    for b in range(n_cols):
        cx = left + (b + 0.5) * width
        p5, p25, p50, p75, p95 = q[:, b].tolist()
        draw.line([(cx, y(p5)), (cx, y(p95))], fill="black")
        draw.rectangle([cx - 14, y(p75), cx + 14, y(p25)], outline="black", fill=(160, 190, 230))
        draw.line([(cx - 14, y(p50)), (cx + 14, y(p50))], fill="black", width=2)
        m = values[:, b].mean().item()
        draw.ellipse([cx - 3, y(m) - 3, cx + 3, y(m) + 3], fill=(200, 40, 40))
        draw.text((cx - 4, H - bottom + 6), str(b + 1), fill="black")
    draw.text((left + (W - left - right) // 2 - 40, H - 18), "block (input -> output)", fill="black")
    img.save(path)


@torch.no_grad()
def pretext_metrics(model, views, args):
    """Grafting's own task on images it did not train on (evaluate.py --protocols pretext): the loss of train_step,
    MoCo v3's L_CL (and with --mode mtl MAE's L_MIM, and their sum)."""
    loss, parts = model(*views)
    return {"loss": loss, **parts}


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
    # ==== Layer Grafting specific ====
    mode: str = "graft"
    """'graft': MoCo v3 on top of a MAE encoder with layer-wise lrs (the paper's step 2); 'mtl': the multi-task baseline, one encoder trained on L_MIM + L_CL from --mae-ckpt or from scratch"""
    mae_ckpt: str = ""
    """checkpoint.pt written by mae.py (step 1); its encoder initialises both MoCo v3 encoders, and its shape (width, depth, heads, image and patch size) becomes this run's. Required for --mode graft"""
    lower_blocks: int = -1
    """blocks in the slow lower group, counted from the input; -1 = the lower 2/3 (8 of 12, as the official code)"""
    lower_lr_ratio: float = 0.1
    """lr of the patch embedding, CLS, positions and lower blocks, as a fraction of the lr (official: 1.5e-5 / 1.5e-4)"""
    freeze_lower: bool = False
    """freeze the embeddings and lower blocks at their MAE values instead (the seed's hard "MIM -> CL" grafting, Tab. 1)"""
    tau: float = 0.2
    """softmax temperature of the InfoNCE loss (MoCo v3 and the official grafting runs: 0.2)"""
    momentum: float | None = None
    """momentum-encoder momentum at the start, raised to 1 by a half-cosine (official: 0.99)"""
    proj_dim: int | None = None
    """output width of the projection and prediction MLPs (MoCo v3: 256)"""
    mlp_dim: int | None = None
    """hidden width of the projection and prediction MLPs (MoCo v3: 4096)"""
    freeze_patch_embed: bool = True
    """keep the patch embedding fixed, at its MAE values when grafting (official --stop-grad-conv1); --no-freeze-patch-embed trains it"""
    crop_min_scale: float | None = None
    """smallest area of a random resized crop, as a fraction of the image (paper: 0.08; the CPU recipe's 32-px crops use 0.2, SimSiam's CIFAR-10 value)"""
    mask_ratio: float = 0.75
    """MIM loss of --mode mtl and --analyze-gradients: fraction of patches removed (MAE: 0.75)"""
    norm_pix_loss: bool = True
    """MIM targets are per-patch standardised pixels (taken from the MAE checkpoint when there is one)"""
    decoder_dim: int | None = None
    """MAE decoder width (taken from the MAE checkpoint when there is one)"""
    decoder_depth: int | None = None
    """MAE decoder blocks (taken from the MAE checkpoint when there is one)"""
    decoder_heads: int | None = None
    """MAE decoder attention heads (taken from the MAE checkpoint when there is one)"""
    analyze_gradients: str = ""
    """instead of training: a grafting.py or mae.py checkpoint whose per-sample, per-block cosine between the MIM and CL gradients is measured on --data; prints a table, writes JSON and a PNG next to it"""
    analyze_samples: int = 512
    """images for --analyze-gradients, rounded down to whole batches of the run's --batch-size (each image's contrastive loss uses its batch's keys, as in training); one forward and backward per image and loss"""

# Hyper-parameter presets. A field left at None above is filled from the recipe. With --mae-ckpt the
# encoder and decoder shapes come from the MAE checkpoint instead.
RECIPES = {
    # our small-data recipe (no official CIFAR-10 run): 100 epochs of step 2, as the seed's Tab. 1
    "cifar10": dict(model="tiny", img_size=32, patch_size=4, epochs=100, batch_size=256, blr=1.5e-4,
                    min_lr=0.0, weight_decay=0.1, warmup_epochs=10, decoder_dim=256, decoder_depth=4, decoder_heads=8,
                    momentum=0.99, proj_dim=256, mlp_dim=4096, crop_min_scale=0.08),
    # the official ViT-B run (cmds/shell_scripts/pretrain.sh: 300 epochs, 40 warm-up, wd 0.1, top lr
    # 1.5e-4 x batch / 256), at batch 256 on one GPU
    "imagenet": dict(model="base", img_size=224, patch_size=16, epochs=300, batch_size=256, blr=1.5e-4,
                     min_lr=0.0, weight_decay=0.1, warmup_epochs=40, decoder_dim=512, decoder_depth=8, decoder_heads=16,
                     momentum=0.99, proj_dim=256, mlp_dim=4096, crop_min_scale=0.08),
    # a laptop (picked by --recipe auto on the CPU): step 2 on top of mae.py's CPU run, about 15 minutes on 2 cores
    "cpu": dict(model="128,6,4", img_size=32, patch_size=4, images=70_000, batch_size=128, blr=1.5e-3, min_lr=0.0,
                weight_decay=0.1, decoder_dim=128, decoder_depth=2, decoder_heads=4, momentum=0.99,
                proj_dim=256, mlp_dim=1024, crop_min_scale=0.2),
}

# The paper's values of the shared flags (--help shows them): step 2 of the official ViT-B run (pretrain.sh)
PAPER = dict(model="base (ViT-B/16)", img_size="224", patch_size="16", epochs="300 (step 2, after 1600 MAE epochs)",
             batch_size="4096", blr="1.5e-4", min_lr="0", weight_decay="0.1", warmup_epochs="40")


def check_args(args):
    """The ranges of grafting's own flags (apply_recipe checks the shared ones), before anything is written."""
    require(args, "mode", args.mode in ("graft", "mtl"), "'graft' or 'mtl'")
    require(args, "lower_lr_ratio", args.lower_lr_ratio >= 0, "0 or more")
    require(args, "tau", args.tau > 0, "more than 0 (a temperature)")
    require(args, "momentum", 0 <= args.momentum <= 1, "in [0, 1]")
    n = (args.img_size // args.patch_size) ** 2
    require(args, "mask_ratio", 0 < args.mask_ratio < 1 and 1 <= int(n * (1 - args.mask_ratio)) < n,
            f"in (0, 1) and leave between 1 and {n - 1} of the {n} patches visible")
    for name in ("proj_dim", "mlp_dim", "decoder_dim", "decoder_depth", "decoder_heads"):
        require(args, name, getattr(args, name) >= 1, "at least 1")
    require(args, "decoder_dim", args.decoder_dim % args.decoder_heads == 0, "a multiple of --decoder-heads")
    require(args, "analyze_samples", args.analyze_samples >= 2, "at least 2 (the CL loss needs other images' keys)")


# ---------------------------------------------------------------- train
def train(args):
    if args.analyze_gradients:  # seed 002 "Conflicts": measure, do not train
        return analyze_gradients(args)
    if args.mode not in ("graft", "mtl"):
        raise DataError(f"--mode must be 'graft' or 'mtl', not {args.mode!r}")
    mae = None
    if (args.mae_ckpt or args.mode == "graft") and not args.resume:  # step 1: its encoder decides our shape
        mae = load_mae_checkpoint(args.mae_ckpt)
        adopt_mae_shape(args, mae)
    args, device, resumed = setup(args)  # --resume, the recipe, the seed, the device, torchrun
    model = build_model(args, mae).to(device)
    n_lower = lower_block_count(args, len(model.encoder.blocks))
    lower_lr_ratio = args.lower_lr_ratio if args.mode == "graft" else 1.0  # the MTL baseline: one lr
    lr = args.blr * args.batch_size * WORLD / 256  # the top layers' lr, by MoCo v3's linear scaling rule
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay, n_lower, lower_lr_ratio), lr=lr,
                                  fused=device.type == "cuda")
    frozen = "frozen" if args.freeze_lower and args.mode == "graft" else f"at lr x {lower_lr_ratio:g}"
    print(f"{METHOD} | mode {args.mode} | {'from ' + args.mae_ckpt if args.mae_ckpt else 'from scratch'} | "
          f"embeddings + blocks 1-{n_lower} {frozen}")
    # a synthetic batch and one step on it, what the CPU probe in prepare() (and .ci/benchmark.py) times
    views = [torch.zeros(args.batch_size, 3, args.img_size, args.img_size, device=device)
             for _ in range(2 if args.mode == "graft" else 3)]
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
