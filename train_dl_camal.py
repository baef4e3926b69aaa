# Classifiers trained with CAMAL (Class Activation Map Attention Learning) on segmentation datasets, in CleanRL's
# single-file style; defaults follow the paper's Table 7. The Grad-CAM of the ground-truth logits, summed over the
# batch (one backward, Eq. 4), is pulled into each image's mask and pushed off the rest:
#     L = CE + lambda * mean_b(beta_b - alpha_b)
# Read top to bottom: Args, the CAMAL core and the training step, the data, the models, evaluation, the training loop.
# Below one banner, the run's plumbing (files, checkpoints, signals, progress, pictures), reached through a `Run`.
import errno
import importlib.util
import json
import logging
import math
import os
import pickle
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Literal, Optional, Union, get_args, get_origin, get_type_hints

import cv2
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms.v2.functional as TF
import tyro
from PIL import Image
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

_spec = importlib.util.spec_from_file_location(
    "download", os.path.join(os.path.dirname(os.path.abspath(__file__)), "download.py")
)
download = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(download)  # the datasets' archives and torchvision's ImageNet weights, fetched and verified

MODELS = ("resnet18", "convnext_tiny", "efficientnet_b0", "vit_b_16", "swin_v2_t", "maxvit_t")
DATASETS = ("shapes", "pets", "flowers", "busi")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet normalisation
RESIZE, CROP = 256, 224

# what an epoch sums over its batches (one device tensor, one all_reduce under torchrun)
EPOCH_SUMS = ("loss", "ce", "reg", "alpha", "beta", "valid", "correct", "seen", "empty", "mask_empty")


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (initialisation, batch order)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """use the GPU when there is one (the CPU otherwise)"""
    track: bool = False
    """track the run with Weights and Biases (pip install -r requirements-cluster.txt)"""
    wandb_project_name: str = "camal"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""

    # Data
    dataset: Literal[DATASETS] = "shapes"
    """shapes (built in), pets (Oxford-IIIT-Pet), flowers (Oxford-Flower-102) or busi"""
    data_dir: Optional[str] = None
    """the folder that holds the dataset's own folder (oxford-iiit-pet/, flowers-102/, Dataset_BUSI_with_GT/)"""
    download: bool = False
    """fetch --dataset into --data-dir first, checksum-verified (download.py); busi says where to get it"""
    download_mirror: Optional[str] = None
    """fetch datasets and ImageNet weights from this server (the same paths) instead of their own"""
    folds: int = 10
    """k of the stratified k-fold split over the whole dataset"""
    fold: str = "0"
    """the held-out fold, 0 to folds-1, or `all` to run every fold in turn"""
    split_seed: int = 0
    """seed of the k-fold split (the same for every model and method, so folds pair up)"""
    num_workers: int = 0
    """DataLoader worker processes"""
    shapes_classes: int = 4
    """shapes: number of classes (one shape each, at most 6)"""
    shapes_per_class: int = 40
    """shapes: images per class"""
    shapes_cue: Literal["background", "corner"] = "background"
    """shapes: the shortcut, a class-coloured background or a 24 x 24 corner square"""
    shapes_cue_prob: float = 0.95
    """shapes: share of training images that carry their class's colour cue (held out: another class's)"""
    resize: Literal["square", "shorter-side"] = "square"
    """square: resize to 256 x 256 as Appendix C says; shorter-side: the shorter side to 256 (torchvision's)"""
    image_size: int = CROP
    """side of the centre crop the model sees; images are resized to image_size x 8/7 first"""

    # Model
    model: Literal[MODELS] = "resnet18"
    """the torchvision classifier"""
    pretrained: bool = True
    """start from torchvision's ImageNet weights (the paper); shapes trains from scratch unless given"""
    weights: Optional[str] = None
    """a local ImageNet weights file for --model (default: torchvision's, from torch's hub cache)"""

    # Method
    method: Literal["camal", "vanilla", "suppress", "prior"] = "camal"
    """camal: CE + lambda mean(beta - alpha); vanilla: CE; suppress: CE + lambda mean(beta); prior: CLIP's masks"""
    camal_coef: float = 1.0
    """lambda, the weight of the regulariser (Eq. 2)"""
    tau: float = 0.7
    """the threshold on H for the attention IoU"""
    collapse_patience: int = 5
    """warn when over half the training CAMs are empty for this many epochs in a row"""
    prior_model: str = "ViT-B-16"
    """prior: the open_clip architecture whose Grad-CAM gives the pseudo-masks"""
    prior_weights: Optional[str] = None
    """prior: a local open_clip weights file, or `random` for an untrained encoder (tests)"""
    prior_pretrained: Optional[str] = None
    """prior: an open_clip pretrained tag of --prior-model (e.g. openai), fetched into open_clip's cache"""
    prior_threshold: float = 0.5
    """prior: the pseudo-mask is the CLIP CAM above this value"""
    prior_cache: str = "prior_cache"
    """prior: folder where the CLIP CAMs are cached (once per dataset, model and weights)"""

    # Training (the paper's Table 7)
    epochs: Optional[int] = None
    """epochs (default 500 as in Table 7; 8 for shapes)"""
    learning_rate: Optional[float] = None
    """AdamW learning rate (default 1e-3; 1e-4 for vit_b_16, swin_v2_t and maxvit_t)"""
    weight_decay: float = 0.01
    """AdamW weight decay"""
    batch_size: int = 32
    """the mini-batch size (over all processes under torchrun)"""
    amp: bool = False
    """bf16 autocast on the GPU (ignored on the CPU)"""

    # Outputs
    checkpoint_every: int = 0
    """save a checkpoint every this many epochs (0: only when stopped)"""
    faithfulness_per_class: int = 1
    """held-out images per class kept for eval_faithfulness.py (the paper's 1; 0: every held-out image)"""
    resume: Optional[str] = None
    """a run folder (runs/{run_name}) to continue from its last checkpoint"""


# ---------------------------------------------------------------------------------------------
# CAMAL: the attention map and the loss (Eq. 1-4), copied unchanged from ppo_camal_vizdoom.py
# (tests/test_shared_helpers.py checks), then what each --method adds to the cross-entropy, and the step
# ---------------------------------------------------------------------------------------------


def grad_cam(activations, score, size, *, create_graph, to_nchw=None, rectify="relu"):
    """Grad-CAM of every sample in a batch from one backward pass (the paper's Eq. 3 and 4).

    activations: the feature map in the graph that `score` was computed from.
    score: one target per sample (B or B x 1), e.g. the ground-truth logit or V(s).
    size: (H, W) of the returned maps. to_nchw: maps activations and gradients to B x K x h x w
    when the model's layout differs. rectify: "relu" is Grad-CAM (Eq. 3); "abs" keeps the evidence that
    lowers the score too, |sum_k w_k A_k|, so a map is empty only where no feature moves the score.
    create_graph: True for a map a loss will be differentiated through (CAMAL's double backward); False for a
    measurement, which keeps no graph. Returns B x H x W in [0, 1].
    """
    # d(sum_b score_b)/dA: one backward gives every sample's gradient (Proposition 1).
    ones = torch.ones_like(score)
    grads = torch.autograd.grad(score, activations, grad_outputs=ones, create_graph=create_graph, retain_graph=True)[0]
    # the arithmetic joins the graph only for a map a loss will differentiate, whatever the ambient grad mode
    with torch.set_grad_enabled(create_graph):
        if to_nchw is not None:
            activations, grads = to_nchw(activations), to_nchw(grads)
        activations, grads = activations.float(), grads.float()
        weights = grads.mean(dim=(2, 3), keepdim=True)  # w_k: spatial mean of the gradient
        cam = (weights * activations).mean(dim=1)  # mean over k, as in Appendix C
        cam = torch.relu(cam) if rectify == "relu" else cam.abs()
        cam = cam / (cam.amax(dim=(1, 2), keepdim=True) + 1e-8)  # each map scaled to [0, 1]
        # Bilinear upsampling (align_corners=False) is separable and linear: R_y @ cam @ R_x^T with PyTorch's own
        # weights gives F.interpolate's numbers, and its backward is two matmuls (faster: docs/benchmarks.md).
        h, w = cam.shape[1:]
        eye = lambda n: torch.eye(n, device=cam.device, dtype=cam.dtype)[None]  # noqa: E731
        r_y = F.interpolate(eye(h), size=size[0], mode="linear", align_corners=False)[0].T  # H x h
        r_x = F.interpolate(eye(w), size=size[1], mode="linear", align_corners=False)[0].T  # W x w
        return r_y @ cam @ r_x.T


def camal_terms(cam, mask):
    """alpha (mean of H inside the mask) and beta (mean outside) per sample, Eq. 1.

    A sample whose mask is empty or covers the whole map has neither: valid is False there and its
    alpha and beta are 0 (never NaN).
    """
    mask = mask.to(cam.dtype)
    n_in = mask.sum(dim=(1, 2))
    n_out = mask[0].numel() - n_in
    valid = (n_in > 0) & (n_out > 0)
    alpha = (cam * mask).sum(dim=(1, 2)) / n_in.clamp(min=1)
    beta = (cam * (1 - mask)).sum(dim=(1, 2)) / n_out.clamp(min=1)
    zero = torch.zeros_like(alpha)
    return torch.where(valid, alpha, zero), torch.where(valid, beta, zero), valid


def camal_loss(cam, mask):
    """mean over valid samples of (beta - alpha), the CAMAL term of Eq. 2 before lambda; 0 if none is valid."""
    alpha, beta, valid = camal_terms(cam, mask)
    return ((beta - alpha) * valid).sum() / valid.sum().clamp(min=1)


def attention_iou(cam, mask, tau=0.7):
    """IoU of (H > tau) with the mask per sample (Eq. 8); valid as in camal_terms."""
    mask = mask.bool()
    pred = cam > tau
    inter = (pred & mask).sum(dim=(1, 2)).float()
    union = (pred | mask).sum(dim=(1, 2)).float()
    n_in = mask.sum(dim=(1, 2))
    valid = (n_in > 0) & (n_in < mask[0].numel())
    return torch.where(valid, inter / union.clamp(min=1), torch.zeros_like(inter)), valid


def empty_cams(cam):
    """Per sample, True where the CAM is zero everywhere: CAMAL has no gradient there and IoU says nothing."""
    return cam.flatten(1).amax(1) <= 0


# What each --method adds to the cross-entropy, decided here only: the attention term's kind (None: CE alone, the
# term still reported as CAMAL's would be) and whether the masks are CLIP's pseudo-masks instead of the dataset's.
METHODS = {
    "camal": dict(term="camal", clip_masks=False),  # lambda * mean(beta - alpha), Eq. 2
    "vanilla": dict(term=None, clip_masks=False),
    "suppress": dict(term="suppress", clip_masks=False),  # lambda * mean(beta): only push attention off the background
    "prior": dict(term="camal", clip_masks=True),  # Eq. 2 on pseudo-masks from CLIP's Grad-CAM, no annotations
}


def regularizer(cam, mask, kind):
    """An attention term before lambda: mean(beta - alpha) for camal, mean(beta) for suppress."""
    if kind == "camal":
        return camal_loss(cam, mask)
    alpha, beta, valid = camal_terms(cam, mask)
    return (beta * valid).sum() / valid.sum().clamp(min=1)


def train_step(model, optimizer, batch, term, camal_coef, autocast, forward=None):
    """One optimiser step on batch = (images, masks, labels): CE + camal_coef x the attention term `term` (METHODS).

    With no term the CAM is still made, without the double-backward graph, to report what CAMAL's term would be.
    Returns (loss, ce, reg, cam, logits) for the epoch's figures. benchmarks/gradcam_overhead.py times this function.
    """
    images, masks, labels = batch
    logits, cam = class_cam(model, images, labels, double_backward=term is not None, autocast=autocast, forward=forward)
    ce = F.cross_entropy(logits, labels)
    reg = regularizer(cam, masks, term or "camal")
    loss = ce + camal_coef * reg if term else ce
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss, ce, reg, cam, logits


# ---------------------------------------------------------------------------------------------
# Data: records of (image path or shapes index, mask paths, label); geometry shared by all
# ---------------------------------------------------------------------------------------------


class DataError(RuntimeError):
    """A dataset file that is there but unusable (corrupt, wrong size): the message names it."""


def load_rgb(path):
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:  # a clear message that names the file, whatever PIL raised
        raise DataError(f"cannot read image {path}: {e}") from e


def load_gray(path):
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L"))
    except Exception as e:
        raise DataError(f"cannot read mask {path}: {e}") from e


def require(path):
    if not os.path.exists(path):
        raise FileNotFoundError(f"missing file: {path}")
    return path


def pets_records(data_dir):
    """Oxford-IIIT-Pet, torchvision's layout; mask = trimap foreground (1) plus boundary (3)."""
    root = os.path.join(data_dir, "oxford-iiit-pet")
    entries, names = [], {}
    for split in ("trainval.txt", "test.txt"):  # official lists pooled: the k-fold split decides
        path = require(os.path.join(root, "annotations", split))
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip() or line.startswith("#"):
                    continue
                fields = line.split()
                if len(fields) < 2 or not fields[1].isdigit() or int(fields[1]) < 1:
                    raise DataError(f"{path}, line {n}: expected 'IMAGE CLASS-ID ...', CLASS-ID from 1: {line!r}")
                stem, class_id = fields[0], int(fields[1])
                names[class_id] = stem.rsplit("_", 1)[0].replace("_", " ")  # "american_bulldog_1" -> "american bulldog"
                image = require(os.path.join(root, "images", f"{stem}.jpg"))
                trimap = require(os.path.join(root, "annotations", "trimaps", f"{stem}.png"))
                entries.append((image, (trimap,), class_id))
    # a tree that keeps some of the 37 breeds under their official CLASS-IDs: labels 0..n-1 in CLASS-ID order
    label = {class_id: i for i, class_id in enumerate(sorted(names))}
    return [(image, masks, label[c]) for image, masks, c in entries], [names[c] for c in sorted(names)]


def flowers_records(data_dir):
    """Oxford-Flower-102 with the segmentation archive (segmim/: background painted blue)."""
    from scipy.io import loadmat

    root = os.path.join(data_dir, "flowers-102")
    labels = loadmat(require(os.path.join(root, "imagelabels.mat")))["labels"].ravel()
    setid = loadmat(require(os.path.join(root, "setid.mat")))
    ids = np.sort(np.concatenate([setid[k].ravel() for k in ("trnid", "valid", "tstid")]))
    records = []
    for i in ids:
        image = require(os.path.join(root, "jpg", f"image_{i:05d}.jpg"))
        seg = require(os.path.join(root, "segmim", f"segmim_{i:05d}.jpg"))
        records.append((image, (seg,), int(labels[i - 1]) - 1))
    from torchvision.datasets import Flowers102

    if labels.min() < 1 or labels.max() > len(Flowers102.classes):
        raise DataError(f"{root}/imagelabels.mat: labels must lie in [1, {len(Flowers102.classes)}]")
    return records, list(Flowers102.classes[: int(labels.max())])  # the real names (for CLIP's prompts), in label order


def busi_records(data_dir):
    """BUSI: 'benign (N).png' with 'benign (N)_mask.png' and sometimes _mask_1, _mask_2 (unioned)."""
    root = os.path.join(data_dir, "Dataset_BUSI_with_GT")
    classes = ["benign", "malignant", "normal"]
    records = []
    for label, name in enumerate(classes):
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"missing folder: {folder}")
        files = sorted(os.listdir(folder))
        for f in files:
            if not f.endswith(".png") or "_mask" in f:
                continue
            stem = f[: -len(".png")]
            masks = tuple(
                os.path.join(folder, m)
                for m in files
                if m == f"{stem}_mask.png" or (m.startswith(f"{stem}_mask_") and m.endswith(".png"))
            )
            if not masks:
                raise FileNotFoundError(f"missing mask for {os.path.join(folder, f)} (expected '{stem}_mask.png')")
            records.append((os.path.join(folder, f), masks, label))
    return records, classes


def read_mask(dataset, paths):
    """The discriminative region as a bool H x W array, from the dataset's own mask files."""
    if dataset == "pets":
        t = load_gray(paths[0])
        return (t == 1) | (t == 3)
    if dataset == "flowers":
        with Image.open(paths[0]) as im:  # the background painted (0, 0, 254), then JPEG-compressed
            rgb = np.asarray(im.convert("RGB")).astype(np.float32)
        paint = np.sqrt(((rgb - np.array([0, 0, 254], np.float32)) ** 2).sum(-1))  # distance to the paint
        # the paint itself within JPEG's noise, and within 2 px of it the fringe JPEG blends into the flower; a blue
        # petal is farther from the paint than the noise (the old rule, "blue channel high", took it for background)
        core = (paint < 40).astype(np.uint8)
        fringe = cv2.dilate(core, np.ones((3, 3), np.uint8), iterations=2).astype(bool) & (paint < 130)
        return ~(core.astype(bool) | fringe)
    masks = [load_gray(p) > 127 for p in paths]  # busi
    if any(m.shape != masks[0].shape for m in masks):
        raise DataError(f"masks of different sizes: {paths}")
    return np.logical_or.reduce(masks)


SHAPE_NAMES = ("circle", "square", "triangle", "cross", "diamond", "ring")

CUE_COLOURS = ((255, 0, 0), (0, 200, 0), (0, 0, 255), (255, 200, 0), (255, 0, 255), (0, 220, 220))


def render_shape(index, label, seed, cue_label, cue, classes):
    """One 256 x 256 shapes image: a class object on a texture, plus a colour cue of `cue_label` (None: no cue).

    Deterministic in (seed, index). The object lies inside the centre 224 crop. cue "corner": a 24 x 24 square of the
    cue's colour in the corner farthest from the object; "background": the texture is tinted with the cue's colour.
    The object is the class's shape filled with stripes at the class's angle (label x 180 / classes degrees, a few
    degrees of jitter) in a random colour: evidence a small CNN learns from a few hundred images, unlike the outline.
    """
    rng = np.random.default_rng([seed, index])
    size = RESIZE
    coarse = rng.uniform(60, 200, (6, 6, 3)).astype(np.float32)
    img = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC) + rng.normal(0, 18, (size, size, 3))
    if cue == "background" and cue_label is not None:  # the tint dominates, the texture still varies
        img = 0.35 * img + 0.65 * np.array(CUE_COLOURS[cue_label], np.float32)
    mask = np.zeros((size, size), np.uint8)
    r = int(rng.integers(28, 44)) if cue == "corner" else int(rng.integers(40, 60))
    cx, cy = (int(v) for v in rng.integers(16 + r + 8, size - 16 - r - 8, 2))
    if label == 0:
        cv2.circle(mask, (cx, cy), r, 1, -1)
    elif label == 1:
        cv2.rectangle(mask, (cx - r, cy - r), (cx + r, cy + r), 1, -1)
    elif label == 2:
        cv2.fillPoly(mask, [np.array([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], np.int32)], 1)
    elif label == 3:
        cv2.rectangle(mask, (cx - r, cy - r // 3), (cx + r, cy + r // 3), 1, -1)
        cv2.rectangle(mask, (cx - r // 3, cy - r), (cx + r // 3, cy + r), 1, -1)
    elif label == 4:
        cv2.fillPoly(mask, [np.array([(cx, cy - r), (cx - r, cy), (cx, cy + r), (cx + r, cy)], np.int32)], 1)
    else:
        cv2.circle(mask, (cx, cy), r, 1, -1)
        cv2.circle(mask, (cx, cy), r // 2, 0, -1)
    inside = mask.astype(bool)
    angle = np.pi * label / classes + rng.uniform(-0.15, 0.15)
    y, x = np.nonzero(inside)
    phase = 2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / 14 + rng.uniform(0, 2 * np.pi)  # 14 px period
    img[inside] = rng.uniform(70, 190, 3) + 60 * np.sign(np.sin(phase))[:, None]  # the colour says nothing
    if cue == "corner" and cue_label is not None:
        corners = [(24, 24), (size - 48, 24), (24, size - 48), (size - 48, size - 48)]
        far = max(corners, key=lambda c: (c[0] + 12 - cx) ** 2 + (c[1] + 12 - cy) ** 2)
        img[far[1] : far[1] + 24, far[0] : far[0] + 24] = CUE_COLOURS[cue_label]
    return np.clip(img, 0, 255).astype(np.uint8), mask.astype(bool)


def shapes_records(args):
    n = args.shapes_classes
    if not 2 <= n <= len(SHAPE_NAMES):
        raise ValueError(f"--shapes-classes must lie in [2, {len(SHAPE_NAMES)}], got {n}")
    records = [(i, (), i % n) for i in range(n * args.shapes_per_class)]
    return records, list(SHAPE_NAMES[:n])


def dataset_records(args):
    if args.dataset == "shapes":
        return shapes_records(args)
    if args.data_dir is None:
        raise ValueError(f"--dataset {args.dataset} needs --data-dir (the folder that holds its files)")
    if not os.path.isdir(args.data_dir):
        raise FileNotFoundError(
            f"--data-dir {args.data_dir} " + ("is not a folder" if os.path.exists(args.data_dir) else "does not exist")
        )
    return {"pets": pets_records, "flowers": flowers_records, "busi": busi_records}[args.dataset](args.data_dir)


class SegmentationDataset(Dataset):
    """Items: uint8 image 3 x 224 x 224 (normalised on the device), bool mask 224 x 224, label.

    Resize 256, centre crop 224 for the image; the mask goes through the same geometry with nearest neighbour.
    For shapes, `train` decides the cue: the class's own (in most images) or, held out, another class's.
    """

    def __init__(self, records, args, train, prior_cams=None):
        self.records, self.args, self.train = records, args, train
        self.prior_cams = prior_cams  # method prior: low-res CLIP CAMs aligned with records replace the masks

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        path, mask_paths, label = self.records[i]
        if self.args.dataset == "shapes":
            rng = np.random.default_rng([self.args.split_seed, path, 1])
            n = self.args.shapes_classes
            if self.train:
                cue = label if rng.random() < self.args.shapes_cue_prob else None
            else:
                cue = (label + 1 + int(rng.integers(0, n - 1))) % n  # always another class's cue
            img, mask = render_shape(
                path, label, self.args.split_seed, cue, self.args.shapes_cue, self.args.shapes_classes
            )
            image = torch.from_numpy(img).permute(2, 0, 1)
        else:
            image = TF.pil_to_tensor(load_rgb(path))
            mask = read_mask(self.args.dataset, mask_paths)
            if mask.shape != tuple(image.shape[1:]):
                raise DataError(f"mask {mask_paths[0]} is {mask.shape}, its image {path} is {tuple(image.shape[1:])}")
        mask = torch.from_numpy(np.ascontiguousarray(mask))[None].to(torch.uint8)
        resize, crop = resize_for(self.args.image_size), self.args.image_size
        image = resize_crop(image, resize, crop, how=self.args.resize)
        mask = resize_crop(mask, resize, crop, nearest=True, how=self.args.resize)[0].bool()
        if self.prior_cams is not None:  # already in crop coordinates: computed on this 224 x 224 crop
            mask = prior_mask(self.prior_cams[i], self.args.prior_threshold, crop)
        return image, mask, label


def resize_crop(image, resize, crop, nearest=False, how="square"):
    """Appendix C's geometry for a C x H x W tensor: resized to resize x resize (how="square": both sides, whatever the
    aspect ratio), or its shorter side to resize (how="shorter-side", torchvision's convention), then centre-cropped to
    crop x crop. nearest: for masks."""
    mode = TF.InterpolationMode.NEAREST if nearest else TF.InterpolationMode.BILINEAR
    size = [resize, resize] if how == "square" else resize
    return TF.center_crop(TF.resize(image, size, interpolation=mode, antialias=not nearest), crop)


def resize_for(image_size):
    """The resize before the centre crop, in the paper's proportion (256 for a 224 crop)."""
    return round(image_size * RESIZE / CROP)


def stratified_folds(labels, folds, split_seed):
    """Fold index per sample: each class shuffled with split_seed and dealt round-robin over the folds."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(split_seed)
    fold_of = np.empty(len(labels), dtype=int)
    offset = 0
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        fold_of[idx] = (np.arange(len(idx)) + offset) % folds
        offset += len(idx)  # start the next class where this one stopped, so fold sizes stay even
    return fold_of


def fold_sets(args, fold, records, prior_cams):
    """(train_set, test_set): every fold but `fold` to train on, `fold` held out (always with the true masks)."""
    fold_of = stratified_folds([r[2] for r in records], args.folds, args.split_seed)
    train_cams = None if prior_cams is None else prior_cams[torch.from_numpy(fold_of != fold)]
    train_set = SegmentationDataset(
        [r for r, f in zip(records, fold_of) if f != fold], args, train=True, prior_cams=train_cams
    )
    test_set = SegmentationDataset([r for r, f in zip(records, fold_of) if f == fold], args, train=False)
    if not len(test_set) or not len(train_set):
        raise ValueError(f"fold {fold} of {args.folds} leaves an empty train or test set ({len(records)} samples)")
    return train_set, test_set


def loaders(args, train_set, test_set):
    """(train_loader, test_loader); under torchrun each process takes its share of every global batch. The training
    order is drawn from the loader's own generator, which the loop seeds at every epoch (a resumed run draws the
    same)."""
    distributed = dist.is_available() and dist.is_initialized()
    world_size = dist.get_world_size() if distributed else 1
    sampler = None
    if distributed:
        sampler = DistributedSampler(
            train_set, num_replicas=world_size, rank=dist.get_rank(), shuffle=True, seed=args.seed
        )
    train_loader = DataLoader(
        train_set,
        batch_size=args.batch_size // world_size,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=args.num_workers,
        generator=torch.Generator(),
        drop_last=len(train_set) > args.batch_size,
    )
    return train_loader, DataLoader(test_set, batch_size=args.batch_size, num_workers=args.num_workers)


# ---------------------------------------------------------------------------------------------
# The prior method: pseudo-masks from a CLIP image encoder's Grad-CAM (open_clip, optional)
# ---------------------------------------------------------------------------------------------


def prior_mask(low_res_cam, threshold, crop):
    """Upsample a cached CLIP CAM to the crop (bilinear, as grad_cam does) and binarise it."""
    cam = F.interpolate(low_res_cam.float()[None, None], size=(crop, crop), mode="bilinear", align_corners=False)
    return cam[0, 0] > threshold


# CLIP's zero-shot prompts per dataset: its own templates for pets and flowers; BUSI's class names alone
# ("a photo of a benign") name no object, so they say what the image shows.
PROMPTS = {
    "pets": lambda c: f"a photo of a {c}, a type of pet.",
    "flowers": lambda c: f"a photo of a {c}, a type of flower.",
    "busi": lambda c: (
        "an ultrasound image of normal breast tissue."
        if c == "normal"
        else f"an ultrasound image of a {c} breast lesion."
    ),
    "shapes": lambda c: f"a photo of a {c}.",
}


def prior_cache_path(args, records, prompts):
    """Where --prior-cache keeps these CLIP CAMs: named by everything they depend on (images, prompts, geometry,
    weights)."""
    import hashlib

    ids = (
        "|".join(str(r[0]) for r in records) + "|" + "|".join(prompts) + f"|{args.resize} {resize_for(CROP)}"
    )  # geometry too
    if args.prior_pretrained is not None:
        weights_id = f"pretrained:{args.prior_pretrained}"
    elif args.prior_weights == "random":
        weights_id = "random"
    else:
        weights_id = f"{os.path.abspath(args.prior_weights)}:{os.path.getsize(args.prior_weights)}"
    key = hashlib.sha1(f"{args.dataset}|{args.prior_model}|{weights_id}|{args.split_seed}|{ids}".encode()).hexdigest()[
        :16
    ]
    return os.path.join(args.prior_cache, f"{args.dataset}__{args.prior_model}__{key}.pt")


@contextmanager
def hub_offline_when_unreachable():
    """Hugging Face's hub told it is offline when its host does not resolve, so that it looks in its cache only (it
    retried for a minute and wrote 47 lines before failing); its and open_clip's log lines held back meanwhile (the
    caller's message says what failed and what to do)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        constants = None
    before = getattr(constants, "HF_HUB_OFFLINE", True)
    if not before:
        try:
            socket.getaddrinfo(constants.ENDPOINT.split("//")[-1].split("/")[0], 443)
        except OSError:  # no name service, or no network at all
            constants.HF_HUB_OFFLINE = True
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)
        if constants is not None:
            constants.HF_HUB_OFFLINE = before


def load_clip(args, device):
    """(the CLIP model of --prior-model with its weights, its Grad-CAM layer, that layer's output as NCHW or None)."""
    try:
        import open_clip
    except ImportError as e:
        raise ValueError("--method prior needs open_clip: pip install -r requirements-prior.txt") from e
    logging.disable(logging.WARNING)  # open_clip's "initialized randomly": the weights come next
    try:
        clip = open_clip.create_model(args.prior_model, pretrained=None)
    except RuntimeError as e:
        raise ValueError(f"--prior-model {args.prior_model}: {e}") from e
    finally:
        logging.disable(logging.NOTSET)
    if args.prior_pretrained is not None:  # open_clip's own mechanism: its hub or URL, its cache, its checks
        try:
            with hub_offline_when_unreachable():
                clip = open_clip.create_model(args.prior_model, pretrained=args.prior_pretrained)
        except Exception as e:  # offline, or a download that failed
            raise ValueError(
                f"cannot get open_clip's {args.prior_model} weights '{args.prior_pretrained}' ({first_line(e)}): on a "
                "machine with a "
                "network they are fetched into open_clip's cache (Hugging Face's, ~/.cache/huggingface); without one, "
                "pass --prior-weights PATH"
            ) from None
    if args.prior_weights not in (None, "random"):
        open_clip.load_checkpoint(clip, args.prior_weights)
    clip = clip.to(device).eval()
    visual = clip.visual
    if hasattr(visual, "transformer"):  # ViT: the input of the last block, class token dropped (as for vit_b_16)
        layer = visual.transformer.resblocks[-2]
        side = visual.grid_size[0]
        to_nchw = lambda t: t[:, 1:].reshape(t.shape[0], side, side, -1).permute(0, 3, 1, 2)  # noqa: E731
    elif hasattr(visual, "layer4"):  # ModifiedResNet
        layer, to_nchw = visual.layer4, None
    else:
        raise ValueError(f"--prior-model {args.prior_model}: no Grad-CAM layer known for {type(visual).__name__}")
    return clip, layer, to_nchw


def clip_prior_cams(args, records, classes, device):
    """Per record, the Grad-CAM of the CLIP image encoder for the zero-shot logit of the prompt (PROMPTS) of its
    ground-truth class, at the encoder's grid resolution (float16). Computed once and cached in --prior-cache."""
    prompts = [PROMPTS[args.dataset](c) for c in classes]
    path = prior_cache_path(args, records, prompts)
    if os.path.isfile(path):
        print(f"prior: CLIP CAMs from the cache {path}")
        cams = read_torch(path)
        if not isinstance(cams, torch.Tensor) or len(cams) != len(records):
            raise RunFileError(f"{path} is not this dataset's CLIP CAMs: delete it, and it is computed again")
        return cams

    clip, layer, to_nchw = load_clip(args, device)
    import open_clip  # load_clip said how to install it if it is missing

    acts = {}
    hook = layer.register_forward_hook(lambda m, i, o: acts.__setitem__("a", o))
    with torch.no_grad():
        text = clip.encode_text(open_clip.get_tokenizer(args.prior_model)(prompts).to(device))
        text = F.normalize(text, dim=-1)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD, device=device).view(1, 3, 1, 1)
    loader = DataLoader(
        SegmentationDataset(records, args, train=True), batch_size=args.batch_size, num_workers=args.num_workers
    )
    cams, start = [], time.time()
    for images, _, labels in loader:
        images, labels = images.to(device), labels.to(device)
        emb = F.normalize(clip.encode_image((images.float() / 255.0 - mean) / std), dim=-1)
        logits = clip.logit_scale.exp() * emb @ text.T
        score = logits.gather(1, labels[:, None]).squeeze(1)
        a = acts.pop("a")
        grid = a.shape[-2:] if to_nchw is None else (clip.visual.grid_size[0],) * 2
        with torch.no_grad():
            cams.append(grad_cam(a, score, grid, create_graph=False, to_nchw=to_nchw).half().cpu())
        print(f"prior: CLIP CAMs {sum(len(c) for c in cams)}/{len(records)} ({time.time() - start:.0f} s)", flush=True)
    hook.remove()
    cams = torch.cat(cams)
    make_folder(args.prior_cache)
    atomic_write(path, lambda f: torch.save(cams, f))
    return cams


# ---------------------------------------------------------------------------------------------
# Models and their Grad-CAM layers
# ---------------------------------------------------------------------------------------------

CAM_LAYERS = {
    "resnet18": "layer4",
    "convnext_tiny": "features[-1]",
    "efficientnet_b0": "features[-1]",
    "vit_b_16": "encoder.layers[-2] (patch tokens, 14 x 14)",
    "swin_v2_t": "features[-1] (B x H x W x C)",
    "maxvit_t": "blocks[-1]",
}


def build_model(name, num_classes, imagenet=None):
    """A torchvision classifier with its head replaced; returns (model, cam_layer, to_nchw).

    imagenet: ImageNet weights to start from (a state dict), or None for a random start.
    """
    model = getattr(torchvision.models, name)(weights=None)
    if imagenet is not None:
        model.load_state_dict(imagenet)
    if name == "resnet18":
        model.fc = nn.Linear(model.fc.in_features, num_classes)
        return model, model.layer4, None
    if name in ("convnext_tiny", "efficientnet_b0"):
        model.classifier[-1] = nn.Linear(model.classifier[-1].in_features, num_classes)
        return model, model.features[-1], None
    if name == "vit_b_16":
        model.heads.head = nn.Linear(model.heads.head.in_features, num_classes)
        side = model.image_size // model.patch_size
        # the input of the last block: the final block's patch tokens never reach the class token
        return (
            model,
            model.encoder.layers[-2],
            lambda t: t[:, 1:].reshape(t.shape[0], side, side, -1).permute(0, 3, 1, 2),
        )
    if name == "swin_v2_t":
        model.head = nn.Linear(model.head.in_features, num_classes)
        return model, model.features[-1], lambda t: t.permute(0, 3, 1, 2)  # B x H x W x C
    model.classifier[-1] = nn.Linear(model.classifier[-1].in_features, num_classes, bias=False)  # maxvit_t
    return model, model.blocks[-1], None


class CamModel(nn.Module):
    """Wraps a classifier so a forward also returns the Grad-CAM layer's output, still in the graph. The hooks are
    bound methods, not closures over self, so a deep copy records and computes with its own layers."""

    def __init__(self, name, num_classes, imagenet=None):
        super().__init__()
        self.name = name
        self.net, layer, self.to_nchw = build_model(name, num_classes, imagenet)
        self._acts = None
        layer.register_forward_hook(self._keep_acts)
        self._double_backward = False
        if name == "vit_b_16":
            # CAMAL's loss differentiates the CAM's gradient, which runs back through the block after the CAM layer
            # only. Fused attention kernels have no double backward, so that one block uses the math kernel under
            # attention_context(double_backward=True); the other eleven keep the fused, faster one (same function).
            self.net.encoder.layers[-1].forward = self._last_block_forward

    def _keep_acts(self, module, inputs, output):
        self._acts = output

    def _last_block_forward(self, x):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        block = self.net.encoder.layers[-1]
        with sdpa_kernel(SDPBackend.MATH) if self._double_backward else nullcontext():
            return type(block).forward(block, x)

    def forward(self, x):
        logits = self.net(x)
        acts, self._acts = self._acts, None
        return logits, acts

    @contextmanager
    def attention_context(self, double_backward):
        """Forwards inside it can be differentiated twice (ViT: its last block's attention runs the math kernel)."""
        self._double_backward = double_backward
        try:
            yield
        finally:
            self._double_backward = False


def normalise(images, dtype=torch.float32):
    mean = torch.tensor(MEAN, device=images.device, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device, dtype=dtype).view(1, 3, 1, 1)
    return (images.to(dtype) / 255.0 - mean) / std


def class_cam(model, images, labels, double_backward, autocast, forward=None):
    """Logits and the Grad-CAM of the ground-truth logits (summed over the batch: one backward).

    forward: what runs the batch, when it is not `model` itself (its DistributedDataParallel wrapper).
    """
    with model.attention_context(double_backward), autocast:
        logits, acts = (forward or model)(normalise(images, next(model.parameters()).dtype))
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    score = logits.gather(1, labels[:, None]).squeeze(1)
    cam = grad_cam(acts, score, images.shape[-2:], create_graph=double_backward, to_nchw=model.to_nchw)
    return logits, cam


# ---------------------------------------------------------------------------------------------
# Evaluation: the training's figures per batch, and the held-out fold's
# ---------------------------------------------------------------------------------------------


def batch_sums(step, masks, labels):
    """One batch's share of the epoch's figures, in EPOCH_SUMS order (summed on the device: no sync per batch);
    step: what train_step returned."""
    loss, ce, reg, cam, logits = step
    with torch.no_grad():
        alpha, beta, valid = camal_terms(cam.detach(), masks)
        n = len(labels)
        sums = {
            "loss": loss.detach() * n,
            "ce": ce.detach() * n,
            "reg": reg.detach() * n,
            "alpha": alpha.sum(),
            "beta": beta.sum(),
            "valid": valid.sum(),
            "correct": (logits.argmax(1) == labels).sum(),
            "seen": torch.tensor(n, device=labels.device),
            "empty": empty_cams(cam).sum(),
            "mask_empty": (masks.flatten(1).sum(1) == 0).sum(),  # after the crop: no CAMAL term, no IoU
        }
        return torch.stack([sums[k].float() for k in EPOCH_SUMS])


def evaluate(model, loader, device, num_classes, tau, autocast):
    """Accuracy, per-class accuracy, attention IoU, alpha and beta on the held-out fold."""
    model.eval()
    correct = torch.zeros(num_classes)
    total = torch.zeros(num_classes)
    sums = dict.fromkeys(("iou", "alpha", "beta", "valid", "empty", "mask_empty"), 0.0)  # over the held-out samples
    for images, masks, labels in loader:
        images, masks, labels = images.to(device), masks.to(device), labels.to(device)
        logits, cam = class_cam(model, images, labels, double_backward=False, autocast=autocast)
        pred = logits.argmax(1)
        total += torch.bincount(labels, minlength=num_classes).cpu()  # per class, no sync per class
        correct += torch.bincount(labels[pred == labels], minlength=num_classes).cpu()
        alpha, beta, valid = camal_terms(cam, masks)
        iou, _ = attention_iou(cam, masks, tau)
        no_mask = (masks.flatten(1).sum(1) == 0).sum()
        batch = torch.stack(
            [(iou * valid).sum(), alpha.sum(), beta.sum(), valid.sum(), empty_cams(cam).sum(), no_mask]
        ).tolist()  # one sync
        for key, value in zip(sums, batch):
            sums[key] += value
    n_valid = sums["valid"]
    return {
        "accuracy": (correct.sum() / total.sum().clamp(min=1)).item(),
        "per_class_accuracy": [(correct[c] / total[c]).item() if total[c] else None for c in range(num_classes)],
        "iou": sums["iou"] / n_valid if n_valid else None,
        "alpha": sums["alpha"] / n_valid if n_valid else None,
        "beta": sums["beta"] / n_valid if n_valid else None,
        "cam_empty_fraction": sums["empty"] / total.sum().clamp(min=1).item(),
        "mask_empty_fraction": sums["mask_empty"] / total.sum().clamp(min=1).item(),
    }


# ---------------------------------------------------------------------------------------------
# The training loop: one fold, then each fold asked for
# ---------------------------------------------------------------------------------------------
def train_fold(args, fold, records, classes, run, checkpoint=None, prior_cams=None):
    """Train on every fold but `fold` and evaluate on `fold` (always against the true masks); a resumed fold continues
    from its `checkpoint`. prior_cams: the prior method's CLIP CAMs, aligned with records."""
    train_set, test_set = fold_sets(args, fold, records, prior_cams)

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic

    model = CamModel(args.model, len(classes), run.imagenet).to(run.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    start_epoch, forward = run.start_fold(fold, model, optimizer, checkpoint, train_set, test_set)  # DDP: its wrapper
    train_loader, test_loader = loaders(args, train_set, test_set)
    term = METHODS[args.method]["term"]  # what --method adds to the cross-entropy

    result = None
    for epoch in range(start_epoch, args.epochs + 1):
        model.train()
        train_loader.generator.manual_seed(args.seed * 1000 + epoch)  # each epoch's order, whatever came before
        if isinstance(train_loader.sampler, DistributedSampler):
            train_loader.sampler.set_epoch(epoch)
        sums = torch.zeros(len(EPOCH_SUMS), device=run.device)  # the epoch's figures, read once at its end
        for images, masks, labels in run.progress(train_loader, epoch):
            images, masks, labels = images.to(run.device), masks.to(run.device), labels.to(run.device)
            step = train_step(model, optimizer, (images, masks, labels), term, args.camal_coef, run.autocast, forward)
            sums += batch_sums(step, masks, labels)
        result = evaluate(model, test_loader, run.device, len(classes), args.tau, run.autocast)
        run.end_epoch(epoch, sums, result, model, optimizer)  # curves, progress, checkpoints, a stop (every process)
    if result is None:  # a resumed fold whose training was done: its results are what is left
        result = evaluate(model, test_loader, run.device, len(classes), args.tau, run.autocast)
    run.end_fold(model, result, test_set)  # metrics.json, model.pt and the samples eval_faithfulness.py scores


def main(args, checkpoint, records, classes):
    """Train and evaluate --fold, or every fold (`all`); a resumed run finishes its own fold first."""
    run = Run(args, classes)  # torchrun's processes, the device, the stop signals (below the banner)
    prior_cams = run.prior_cams(records) if METHODS[args.method]["clip_masks"] else None
    for fold in range(args.folds) if args.fold == "all" else [int(args.fold)]:
        if checkpoint is None or fold >= checkpoint["fold"]:
            train_fold(args, fold, records, classes, run, checkpoint, prior_cams)
            checkpoint = None


# ---------------------------------------------------------------------------------------------
# Run plumbing: everything below serves the run, not the method (files, checkpoints, resume, stop signals,
# progress, tracking, pictures, results). The method and its loop are all above this line.
# ---------------------------------------------------------------------------------------------
class Run:
    """The run around the loop: torchrun's processes, the device and the stop signals, then per fold its folder, logs,
    progress, checkpoints and results. Rank 0 alone writes; every process takes part in a stop. The loop calls it to
    start a fold, for its progress bar, at the end of each epoch, and to finish the fold."""

    active = None  # the fold being trained in this process, whose logs the command line's error handler closes

    def __init__(self, args, classes):
        self.args, self.classes, self.writer, self.tracked = args, classes, None, None
        if "LOCAL_RANK" in os.environ:  # started by torchrun: a process group even for one, so DDP runs as at scale
            backend = "nccl" if args.cuda and torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            dist.init_process_group(backend)
            if args.batch_size % dist.get_world_size():
                exit_error(f"--batch-size {args.batch_size} does not split over {dist.get_world_size()} processes")
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank, self.world_size = (dist.get_rank(), dist.get_world_size()) if self.distributed else (0, 1)
        if self.distributed and self.rank == 0:
            per = args.batch_size // self.world_size
            print(f"distributed: {self.world_size} processes ({dist.get_backend()}), {per} samples each per batch")
        self.device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
        if self.device.type == "cuda" and self.distributed:  # torchrun's LOCAL_RANK picks the GPU
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        cuda_amp = args.amp and self.device.type == "cuda"
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda_amp else nullcontext()
        pretrained = args.pretrained and download.imagenet_state_dict(args.model, args.weights, args.download_mirror)
        self.imagenet = pretrained or None
        self.stop = StopRequest("saving a checkpoint and stopping at the end of this epoch", "epoch").catch()

    def prior_cams(self, records):
        """The prior method's CLIP CAMs: rank 0 computes and caches them, the other processes read its cache."""
        cams = clip_prior_cams(self.args, records, self.classes, self.device) if self.rank == 0 else None
        if self.world_size > 1:
            dist.barrier()
            if self.rank != 0:
                cams = clip_prior_cams(self.args, records, self.classes, torch.device("cpu"))
        return cams

    def start_fold(self, fold, model, optimizer, checkpoint, train_set, test_set):
        """(first epoch, the DDP wrapper or None): the fold's folder and logs; a resumed fold gets its weights,
        optimiser and generators back."""
        args = self.args
        if checkpoint is not None:
            self.run_dir = args.resume.rstrip("/")
            self.run_name = os.path.basename(self.run_dir)
        else:
            stamp = [int(time.time())]
            if self.distributed:
                dist.broadcast_object_list(stamp, src=0)  # one run name for all processes
            self.run_name = f"{args.dataset}__{args.model}__{args.method}__fold{fold}__{args.seed}__{stamp[0]}"
            self.run_dir = f"runs/{self.run_name}"
        if self.rank == 0:
            make_folder(self.run_dir)
        start_epoch = 1
        if checkpoint is not None:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            restore_rng(checkpoint["rng"])
            start_epoch = checkpoint["epoch"] + 1
            print(f"resuming {self.run_name} at epoch {start_epoch}/{args.epochs}")
        forward = None
        if self.distributed:  # all ranks start from rank 0's weights; gradients are averaged in backward
            forward = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if self.rank == 0:  # one W&B run per fold; a resumed fold redoes the epochs from start_epoch on
            purge = None if checkpoint is None else start_epoch
            self.writer, self.tracked = open_logs(args, self.run_name, self.run_dir, purge_step=purge)
            record_environment(self.run_dir, self.device)  # which code and packages made this run (stats.py)
        Run.active = self
        # held-out pictures, taken by index: a DataLoader would draw a seed from the generators a resume restored
        grid = [test_set[i] for i in range(min(8, len(test_set)))]
        self.grid = (
            torch.stack([g[0] for g in grid]),
            torch.stack([g[1] for g in grid]),
            torch.tensor([g[2] for g in grid]),
        )
        self.fold, self.sizes, self.start_epoch, self.announced = (
            fold,
            (len(train_set), len(test_set)),
            start_epoch,
            False,
        )
        self.start_time, self.collapsed_for, self.train_empty, self.train_mask_empty = time.time(), 0, None, None
        return start_epoch, forward

    def progress(self, loader, epoch):
        """The epoch's batches, with a bar on a terminal; the first call also says what the run is."""
        args = self.args
        if not self.announced and self.rank == 0:
            start = "ImageNet weights" if self.imagenet else "random start"
            print(
                f"{self.run_name}: {describe_device(self.device)}, {args.model} ({start}), {self.sizes[0]} training "
                f"and {self.sizes[1]} held-out images, {args.epochs} epochs of {len(loader)} batches\n  run folder: "
                f"{self.run_dir}   watch: tensorboard --logdir {os.path.dirname(self.run_dir) or '.'}   "
                f"stop: Ctrl-C (saves a checkpoint; --resume {self.run_dir} continues)",
                flush=True,
            )
        self.announced, self.epoch_start = True, time.perf_counter()
        kw = dict(unit="batch", leave=False, dynamic_ncols=True, disable=None if self.rank == 0 else True)
        return tqdm(loader, desc=f"epoch {epoch}/{args.epochs}", **kw)

    def end_epoch(self, epoch, sums, result, model, optimizer):
        """The epoch's curves and progress line, the collapse watch, checkpoints, and a stop any process asked for."""
        args = self.args
        votes = torch.tensor(float(bool(self.stop)), device=self.device)
        if self.distributed:
            dist.all_reduce(sums)  # epoch statistics over every process's samples
            dist.all_reduce(votes)  # one stop decision for all: any process asked to stop
        total = dict(zip(EPOCH_SUMS, sums.tolist()))
        stopping = votes.item() > 0 and epoch < args.epochs
        if self.rank == 0:
            writer, seen, valid = self.writer, total["seen"], total["valid"]
            writer.add_scalar("train/loss", total["loss"] / seen, epoch)
            writer.add_scalar("train/ce", total["ce"] / seen, epoch)
            writer.add_scalar("train/regularizer", total["reg"] / seen, epoch)
            writer.add_scalar("train/accuracy", total["correct"] / seen, epoch)
            writer.add_scalar("train/cam_empty_fraction", total["empty"] / seen, epoch)
            writer.add_scalar("train/mask_empty_fraction", total["mask_empty"] / seen, epoch)
            if valid:
                writer.add_scalar("train/alpha", total["alpha"] / valid, epoch)
                writer.add_scalar("train/beta", total["beta"] / valid, epoch)
            writer.add_scalar("test/accuracy", result["accuracy"], epoch)
            writer.add_scalar("test/cam_empty_fraction", result["cam_empty_fraction"], epoch)
            writer.add_scalar("test/mask_empty_fraction", result["mask_empty_fraction"], epoch)
            for key in ("iou", "alpha", "beta"):
                if result[key] is not None:
                    writer.add_scalar(f"test/{'attention_iou' if key == 'iou' else key}", result[key], epoch)
            images, masks, labels = self.grid  # image | mask | CAM for a few held-out samples
            _, cams = class_cam(model, images.to(self.device), labels.to(self.device), False, self.autocast)
            writer.add_image("test/image_mask_cam", overlay_grid(images, masks, cams.cpu()), epoch, dataformats="HWC")
            per_epoch = (time.time() - self.start_time) / (epoch - self.start_epoch + 1)
            writer.add_scalar("charts/epoch_seconds", per_epoch, epoch)
            writer.flush()
            self.stop.last_pass_seconds = time.perf_counter() - self.epoch_start
            later = args.folds - 1 - self.fold if args.fold == "all" else 0  # --fold all: the folds after this one
            eta = per_epoch * (args.epochs - epoch + later * args.epochs)
            iou = f"{result['iou']:.3f}" if result["iou"] is not None else "-"
            print(
                f"fold {self.fold} epoch {epoch}/{args.epochs} loss={total['loss'] / seen:.4f} "
                f"train_acc={total['correct'] / seen:.3f} test_acc={result['accuracy']:.3f} test_iou={iou} "
                f"cam_empty={total['empty'] / seen:.2f} mask_empty={total['mask_empty'] / seen:.2f} "
                f"eta={duration(eta)}",
                flush=True,
            )
            self.train_empty, self.train_mask_empty = total["empty"] / seen, total["mask_empty"] / seen
            if epoch == self.start_epoch and self.train_mask_empty > 0.05:
                warn(
                    f"{self.train_mask_empty:.0%} of the training images have an empty mask after the crop: CAMAL has "
                    "no term there and attention IoU skips them (check the dataset's masks: docs/train_dl_camal.md)"
                )
            self.collapsed_for = self.collapsed_for + 1 if self.train_empty > 0.5 else 0
            if self.collapsed_for == args.collapse_patience:  # the regulariser has no gradient on an all-zero map
                warn(
                    f"the CAM has been empty for over half the training samples for {self.collapsed_for} epochs "
                    f"({self.train_empty:.0%} now): the regulariser has no gradient there and attention IoU measures "
                    "nothing"
                )
            if (args.checkpoint_every and epoch % args.checkpoint_every == 0) or stopping:
                path = os.path.join(self.run_dir, "checkpoint.pt")
                save_checkpoint(path, model, optimizer, args, self.fold, epoch)
        if stopping:
            self.close()
            if self.rank == 0:
                print(
                    f"stopped at epoch {epoch}; continue with: python {os.path.basename(__file__)} --resume "
                    f"{self.run_dir}"
                )
            sys.exit(self.stop.exit_code())

    def end_fold(self, model, result, test_set):
        """metrics.json (the mark of a finished fold, written last), model.pt and the held-out samples (rank 0)."""
        if self.rank == 0:
            facts = dict(train_cam_empty_fraction=self.train_empty, train_mask_empty_fraction=self.train_mask_empty)
            facts.update(train_size=self.sizes[0], test_size=self.sizes[1])
            facts.update(processes=self.world_size, wall_time=time.time() - self.start_time)
            metrics = fold_metrics(self.args, self.fold, result, self.classes, self.run_name, facts)
            save_results(self.run_dir, metrics, self.classes, model, test_set, self.args)
            print(f"fold {self.fold}: results in {self.run_dir}")
        self.close()

    def close(self):
        close_logs(self.writer, self.tracked)
        self.writer = self.tracked = Run.active = None


def overlay_grid(images, masks, cams):
    """Rows of image | mask (red) | CAM overlay (jet), labelled, as one H x W x 3 uint8 array."""
    return np.concatenate(
        [attention_panel(img.permute(1, 2, 0).numpy(), m.numpy(), c.numpy()) for img, m, c in zip(images, masks, cams)]
    )


def attention_panel(image, mask, cam, titles=("image", "mask", "CAM")):
    """H x 3W x 3 uint8 RGB, each part labelled: the image, the mask in red over it, the CAM as a jet overlay.
    image: H x W (gray) or H x W x 3 uint8; mask: H x W, non-zero inside; cam: H x W in [0, 1]."""
    rgb = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else np.ascontiguousarray(image)
    inside = np.asarray(mask).astype(bool)
    masked = rgb.copy()
    masked[inside] = (0.5 * masked[inside] + 0.5 * np.array([255, 0, 0])).astype(np.uint8)
    heat = cv2.cvtColor(cv2.applyColorMap(np.uint8(255 * np.clip(cam, 0, 1)), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    parts = [rgb.copy(), masked, np.uint8(0.5 * rgb + 0.5 * heat)]
    scale = max(0.3, rgb.shape[0] / 400)  # readable at 60 x 80 and at 224 x 224
    for part, title in zip(parts, titles):
        for colour, thickness in (((0, 0, 0), 2), ((255, 255, 255), 1)):  # white on a dark edge: readable on any image
            org, font = (2, 2 + int(22 * scale)), cv2.FONT_HERSHEY_SIMPLEX
            cv2.putText(part, title, org, font, scale, colour, thickness, cv2.LINE_AA)
    return np.concatenate(parts, axis=1)


def faithfulness_samples(test_set, classes, seed, fold, per_class=1):
    """per_class held-out images per class (0: all; a seeded choice that differs between folds), uint8, for
    eval_faithfulness.py."""
    rng = np.random.default_rng([seed, fold])
    by_class = {}
    for i, (_, _, label) in enumerate(test_set.records):
        by_class.setdefault(label, []).append(i)
    images, masks, labels = [], [], []
    for c in sorted(by_class):
        if per_class == 1:  # the paper's protocol, drawn as before so earlier runs keep their samples
            chosen = [int(rng.choice(by_class[c]))]
        elif per_class == 0 or per_class >= len(by_class[c]):
            chosen = by_class[c]
        else:
            chosen = sorted(int(i) for i in rng.choice(by_class[c], size=per_class, replace=False))
        for i in chosen:
            img, m, y = test_set[i]
            images.append(img)
            masks.append(m.to(torch.uint8))
            labels.append(y)
    return {
        "images": torch.stack(images),
        "masks": torch.stack(masks),
        "labels": torch.tensor(labels),
        "classes": classes,
        "per_class": per_class,  # eval_faithfulness.py pairs the samples of runs that drew them alike
        "fold": fold,  # eval_faithfulness.py checks these against the run's metrics.json: another fold's samples are
        "seed": seed,  # in this fold's training set
    }


def fold_metrics(args, fold, result, classes, run_name, facts):
    """metrics.json's content: the held-out figures, the run's settings, and `facts` (sizes, processes, wall time)."""
    return {
        "dataset": args.dataset,
        "model": args.model,
        "method": args.method,
        "fold": fold,
        "folds": args.folds,
        "seed": args.seed,
        "split_seed": args.split_seed,
        "test_accuracy": result["accuracy"],
        "test_iou": result["iou"],
        "test_alpha": result["alpha"],
        "test_beta": result["beta"],
        "test_cam_empty_fraction": result["cam_empty_fraction"],
        "test_mask_empty_fraction": result["mask_empty_fraction"],
        **facts,
        "image_size": args.image_size,
        "per_class_accuracy": dict(zip(classes, result["per_class_accuracy"])),
        "epochs": args.epochs,
        "tau": args.tau,
        "camal_coef": args.camal_coef,
        "run_name": run_name,
        "args": asdict(args),  # every setting, so stats.py never takes runs of two experiments for one
    }


def save_results(run_dir, metrics, classes, model, test_set, args):
    """metrics.json (stats.py), model.pt (a plain torchvision state dict with its preprocessing) and the held-out
    samples eval_faithfulness.py scores."""
    run_name, fold = metrics["run_name"], metrics["fold"]
    saved = {
        "state_dict": model.net.state_dict(),
        "architecture": args.model,
        "num_classes": len(classes),
        "classes": classes,
        # what eval_faithfulness.py checks against the run's metrics.json, so a model.pt from another run is refused
        "dataset": args.dataset,
        "method": args.method,
        "run_name": run_name,
        "preprocessing": {
            "resize": resize_for(args.image_size),
            "resize_mode": args.resize,
            "crop": args.image_size,
            "mean": MEAN,
            "std": STD,
        },
        "cam_layer": CAM_LAYERS[args.model],
    }
    samples = {
        **faithfulness_samples(test_set, classes, args.seed, fold, args.faithfulness_per_class),
        "run_name": run_name,
    }
    atomic_write(os.path.join(run_dir, "model.pt"), lambda f: torch.save(saved, f))
    atomic_write(os.path.join(run_dir, "faithfulness_samples.pt"), lambda f: torch.save(samples, f))
    write_json(os.path.join(run_dir, "metrics.json"), metrics, indent=2)  # last: the mark of a finished run


def check_files(records):
    """Every image and mask readable as an image, each mask the size of its image: from the file headers, before any
    output is written (a few seconds for a whole dataset). A file broken past its header is still named when it is
    read."""
    for path, mask_paths, _ in records:
        if not isinstance(path, str):
            continue  # shapes: drawn, not read
        sizes = []
        for p in (path, *mask_paths):
            try:
                with Image.open(p) as im:
                    sizes.append(im.size)
            except Exception as e:
                raise DataError(f"{p} is not an image ({type(e).__name__}: {e})") from e
        if any(size != sizes[0] for size in sizes[1:]):
            raise DataError(
                f"mask {mask_paths[0]} is {sizes[1][1]} x {sizes[1][0]}, its image {path} is {sizes[0][1]} x "
                f"{sizes[0][0]}"
            )


# Files: every file a run writes goes through atomic_write, every file it reads through read_json or read_torch.
# Copied unchanged from ppo_camal_vizdoom.py; tests/test_shared_helpers.py keeps the copies identical.


class RunFileError(ValueError):
    """A file that cannot be written or read as it should be; the message names the file and says what is wrong."""


def first_line(e):
    """An exception's first line, whole (a cut one once ended "Last error: An err"), or its type's name when it has no
    message (an EOFError from an empty file)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


WRITE_FAILURES = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "its folder is not writable",
    errno.EPERM: "its folder is not writable",
}


def atomic_write(path, write, previous=None):
    """Write `path` all at once: write(f) into `path`.tmp beside it (binary), fsync, rename. A crash, a full disk or a
    read-only folder leaves what was there whole and no .tmp behind, and raises RunFileError saying which file and why.
    previous: where the file it replaces is kept (checkpoint.prev.pt), so a whole copy exists at every moment."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # on disk before it replaces anything
        if previous is not None and os.path.isfile(path):
            os.replace(path, previous)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # RuntimeError: torch.save's zip writer when the disk fills
        try:
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        except OSError:
            free = None
        full = free is not None and free < 2**20
        why = WRITE_FAILURES.get(getattr(e, "errno", None)) or ("the disk is full" if full else first_line(e))
        room = f" ({free / 2**20:.0f} MB free there)" if free is not None else ""
        raise RunFileError(f"cannot write {path}: {why}{room}") from None
    finally:
        if os.path.lexists(tmp):  # whatever stopped the write: no half file is left behind
            try:
                os.remove(tmp)
            except OSError:
                pass


def write_json(path, obj, **kw):
    """JSON through atomic_write: a reader never sees half a file, a crash never leaves one."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, **kw).encode()))


def read_json(path, kind=dict):
    """A JSON file that should hold a `kind` (dict or list); RunFileError naming the file and what is wrong with it."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise RunFileError(f"cannot read {path}: {e.strerror or first_line(e)}") from None
    if not data.strip():
        raise RunFileError(f"{path} is empty (a write that was cut short?)")
    try:
        obj = json.loads(data)
    except ValueError as e:  # not JSON, cut short, or not text at all
        raise RunFileError(f"{path} is not whole JSON, truncated or corrupt ({first_line(e)})") from None
    if not isinstance(obj, kind):
        raise RunFileError(f"{path} holds a JSON {type(obj).__name__}, where a {kind.__name__} belongs")
    return obj


def read_torch(path):
    """torch.load with weights only (tensors and plain values: a file from elsewhere cannot run code); RunFileError
    naming the file and what is wrong: missing, unreadable, empty, truncated, random bytes or pickled code."""
    try:
        with open(path, "rb") as f:  # missing, a folder, no permission: said as such, before torch sees the file
            empty = not f.read(1)
    except OSError as e:
        raise RunFileError(f"cannot read {path}: {e.strerror or first_line(e)}") from None
    if empty:
        raise RunFileError(f"{path} is empty (a write that was cut short?)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):
            raise RunFileError(
                f"{path} holds pickled Python objects, not only tensors (an older version of this script wrote it, or "
                "something else did); loading it could run code, so it is refused"
            ) from None
        raise RunFileError(f"{path} is not a file torch.save wrote (random or corrupt bytes)") from None
    except Exception as e:  # truncated or corrupt: zip, pickle, storage and OS errors of every kind (a cut zip: EINVAL)
        raise RunFileError(f"{path} is truncated or corrupt ({type(e).__name__}: {first_line(e)})") from None


def make_folder(path):
    """os.makedirs, or a RunFileError that says why not: a file in the way, a folder that is not writable."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        parts = os.path.normpath(path).split(os.sep)
        files = [p for p in (os.sep.join(parts[:i]) for i in range(1, len(parts) + 1)) if os.path.isfile(p)]
        why = f"{files[0]} is a file" if files else WRITE_FAILURES.get(e.errno) or e.strerror or first_line(e)
        raise RunFileError(f"cannot make the folder {path}: {why}") from None


def unwritable(path):
    """Why the folder `path` could not be made or written in (a file in the way, no permission), or None. Checked before
    any work, so an output never fails once the work is done; nothing is created."""
    here = os.path.abspath(path)
    while not os.path.exists(here):
        here = os.path.dirname(here)
    if not os.path.isdir(here):
        return f"{here} is a file"
    return None if os.access(here, os.W_OK) else f"{here} is not writable"


def state_bytes(obj):
    """The bytes of the tensors in a (nested) state: about what torch.save writes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    return 0


# Checkpoints and resume: copied unchanged from ppo_camal_vizdoom.py (tests/test_shared_helpers.py)


def rng_state():
    """Every random generator's state, in types torch.load(weights_only=True) accepts (numpy's as plain lists)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng(state):
    """Put back the generators saved by rng_state()."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(path, state):
    """Save `state` to path atomically and keep the one before as checkpoint.prev.pt beside it: a crash, a full disk or
    a copy cut short leaves at least one whole checkpoint. A save briefly holds three checkpoints, so the room for one
    more is checked first: RunFileError, before anything is written, when it is not there."""
    need, folder = state_bytes(state) + 2**20, os.path.dirname(os.path.abspath(path))
    free = shutil.disk_usage(folder).free
    if free < need:
        raise RunFileError(
            f"no room for a checkpoint in {folder}: it needs about {need / 2**20:.0f} MB beside the two kept "
            f"(checkpoint.pt and checkpoint.prev.pt), and {free / 2**20:.0f} MB are free"
        )
    atomic_write(path, lambda f: torch.save(state, f), previous=previous_checkpoint(path))


def previous_checkpoint(path):
    root, ext = os.path.splitext(path)
    return f"{root}.prev{ext}"  # checkpoint.pt -> checkpoint.prev.pt


def read_checkpoint(path, keys):
    """The checkpoint at path, or the previous one (checkpoint.prev.pt) when path is missing or unreadable (with a
    warning); RunFileError if neither is whole. Loaded through read_torch: a file from elsewhere cannot run code.
    `keys`: the entries a checkpoint of this script holds."""
    problems = []
    for p in (path, previous_checkpoint(path)):
        if not os.path.lexists(p):
            continue
        try:
            state = read_torch(p)
        except RunFileError as e:
            problems.append(str(e))
            continue
        if not isinstance(state, dict) or not set(keys) <= set(state) or not isinstance(state["args"], dict):
            problems.append(f"{p} is not a checkpoint of this script (it needs {sorted(keys)})")
            continue
        if p != path:
            every = state["args"].get("checkpoint_every")
            lost = f"up to {every} iterations or epochs of progress" if every else "the progress since the one before"
            why = problems[-1] if problems else f"{path} is missing"
            warn(f"{why}; resuming from the previous checkpoint {p}: {lost} will be redone")
        return state
    names = f"neither {os.path.basename(path)} nor {os.path.basename(previous_checkpoint(path))}"
    raise RunFileError("; ".join(problems) or f"no checkpoint in {os.path.dirname(path) or '.'} ({names})")


def ignored_flags(cli, saved, keep):
    """The flags given with --resume that the run does not take (it continues with its own settings), as text."""
    default = type(cli)()
    return [
        f"--{k.replace('_', '-')} {getattr(cli, k)} (the run's: {saved.get(k)})"
        for k in cli.__dataclass_fields__
        if k not in keep and getattr(cli, k) != getattr(default, k) and getattr(cli, k) != saved.get(k)
    ]


def read_resume(args, finished, keys, keep, retired=()):
    """(the run's own Args, its checkpoint) for --resume RUN; the flags given beside it, other than `keep`, are ignored
    with a warning. finished: (the file a finished run has, a hint). retired: settings of older versions that did not
    change what was computed, dropped. Raises FileNotFoundError, ValueError or RunFileError with a message that says
    why the run cannot resume."""
    if not os.path.isdir(args.resume):
        exists = os.path.exists(args.resume)
        raise FileNotFoundError(
            f"--resume {args.resume} " + ("is a file, not a run folder" if exists else "does not exist")
        )
    try:
        entries = set(os.listdir(args.resume))
    except OSError as e:
        raise RunFileError(f"--resume {args.resume} cannot be read: {e.strerror}") from None
    if finished[0] in entries:
        raise ValueError(
            f"--resume {args.resume}: this run finished (its {finished[0]} is there); there is nothing to "
            f"resume{finished[1]}"
        )
    if not entries & {
        "checkpoint.pt",
        "checkpoint.prev.pt",
    }:  # the previous one alone is whole (a crash between renames)
        raise FileNotFoundError(
            f"--resume {args.resume}: no checkpoint.pt there (a run saves one every --checkpoint-every and when it is "
            "stopped)"
        )
    try:
        checkpoint = read_checkpoint(os.path.join(args.resume, "checkpoint.pt"), keys)
    except RunFileError as e:
        raise RunFileError(f"--resume {args.resume}: {e}") from None
    # the run continues with the settings it was started with
    saved = {k: v for k, v in checkpoint["args"].items() if k not in retired}
    ignored = ignored_flags(args, saved, keep=keep)
    if ignored:
        warn(f"--resume continues with the run's own settings; ignored: {', '.join(ignored)}")
    saved.update({k: getattr(args, k) for k in keep})
    unknown = set(saved) - set(type(args).__dataclass_fields__)
    if unknown:
        raise ValueError(
            f"--resume {args.resume}: the checkpoint has settings this version does not know: {sorted(unknown)}"
        )
    hints = get_type_hints(type(args))
    wrong = [f"{k}={v!r}" for k, v in saved.items() if not fits_type(v, hints[k])]
    if wrong:
        raise RunFileError(f"--resume {args.resume}: the checkpoint's settings are damaged: {', '.join(wrong)}")
    return type(args)(**saved), checkpoint


def fits_type(value, hint):
    """Whether a saved setting is a value of its Args field's type (bool, int, float, str, Optional, Literal)."""
    if get_origin(hint) is Literal:
        return value in get_args(hint)
    if get_origin(hint) is Union:
        return any(fits_type(value, h) for h in get_args(hint))
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


DL_CHECKPOINT_KEYS = ("args", "fold", "model", "optimizer", "epoch", "rng")


def save_checkpoint(path, model, optimizer, args, fold, epoch):
    state = {"args": asdict(args), "fold": fold, "model": model.state_dict(), "optimizer": optimizer.state_dict()}
    write_checkpoint(path, {**state, "epoch": epoch, "rng": rng_state()})  # fold: the one in progress (args.fold: all?)


# Stops, logs, the record of the environment: copied unchanged from ppo_camal_vizdoom.py (tests/test_shared_helpers.py)


class StopRequest:
    """The stop the signals ask for, as one object: the handler sets it, the training loop reads it (no globals).

    Ctrl-C, SIGTERM, or SIGUSR1/SIGUSR2 (what SLURM and submitit send before pre-empting or timing out a job) ask for
    a stop at the next safe point, which `point` describes. Only a second Ctrl-C stops at once: schedulers repeat their
    signal (SLURM signals every process of the job, and benchmark.py forwards one more), and that is still one stop.
    """

    def __init__(self, point, unit):
        self.point, self.unit = (
            point,
            unit,
        )  # what the run does when asked, and what it calls one pass (for the message)
        self.signum = None  # the signal that asked, once one has
        self.last_pass_seconds = None  # how long the last pass took, set by the loop

    def __bool__(self):
        return self.signum is not None

    def exit_code(self):
        return 128 + (self.signum or signal.SIGTERM)  # SIGTERM: another DDP process was asked

    def handle(self, signum, frame):
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signum = signum
        pace = f" (the last {self.unit} took {self.last_pass_seconds:.0f} s)" if self.last_pass_seconds else ""
        name = signal.Signals(signum).name
        print(f"\n{name}: {self.point}{pace}; Ctrl-C again stops at once, without saving", flush=True)

    def catch(self):
        # the stops of a terminal, a scheduler
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(s, self.handle)
        return self


def start_tracking(args, run_name, run_dir):
    """CleanRL's --track: a Weights and Biases run that mirrors the TensorBoard events (scalars, images). Its id comes
    from the run's name, so a resumed run continues the same W&B run. WANDB_MODE=offline keeps it on disk."""
    try:
        import wandb
    except ImportError:
        raise ValueError("--track needs wandb: pip install -r requirements-cluster.txt") from None
    import hashlib

    try:
        return wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity,
            sync_tensorboard=True,
            config=vars(args),
            name=run_name,
            id=hashlib.sha1(run_name.encode()).hexdigest()[:16],
            resume="allow",
            save_code=True,
            dir=run_dir,
        )
    except Exception as e:  # no API key, no network, a bad entity: W&B's own errors
        raise ValueError(
            f"--track: Weights and Biases did not start ({first_line(e)}); run `wandb login` or set WANDB_API_KEY, "
            "or WANDB_MODE=offline to keep the run on disk"
        ) from None


def open_logs(args, run_name, run_dir, purge_step):
    """(TensorBoard writer, W&B run or None). purge_step: where a resumed run's curves restart, so events a stopped or
    crashed run logged from there on are dropped, not doubled; None for a new run, which also logs its
    hyperparameters."""
    tracked = start_tracking(args, run_name, run_dir) if args.track else None  # first, so W&B mirrors the events
    # TensorBoard writes from a thread: its OSError (a full disk) comes back at the next write, where the run says why
    threading.excepthook = lambda a: None if issubclass(a.exc_type, OSError) else threading.__excepthook__(a)
    writer = SummaryWriter(run_dir, purge_step=purge_step)
    if purge_step is None:
        table = "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
        writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
    return writer, tracked


def close_logs(writer, tracked):
    if writer is not None:
        try:
            writer.close()
        except OSError:  # a full disk: the events written so far stay readable, and the run has said why it stopped
            pass
    if tracked is not None:
        tracked.finish()


def describe_device(device):
    if device.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(device)}"
    return f"CPU ({torch.get_num_threads()} threads; --cuda uses a GPU where there is one)"


ENVIRONMENT_PACKAGES = ("torch", "torchvision", "vizdoom", "gymnasium", "numpy", "scipy", "rliable")


def package_version(name):
    """The installed version of a distribution, or None where it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def record_environment(run_dir, device):
    """Append to run_dir/environment.json what this process trains with: package versions, the git commit (and whether
    tracked files were changed), the device. One entry per start or resume, so a run resumed under other versions says
    so."""

    def git(*cmd):
        here = os.path.dirname(os.path.abspath(__file__))
        try:
            done = subprocess.run(["git", "-C", here, *cmd], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):  # no git here
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "script": os.path.basename(__file__),
        "python": sys.version.split()[0],
        "packages": {name: package_version(name) for name in ENVIRONMENT_PACKAGES},
        "git": None if commit is None else {"commit": commit, "dirty": bool(git("status", "--porcelain", "-uno"))},
        "device": describe_device(device),
        "cuda": torch.version.cuda,
    }
    path = os.path.join(run_dir, "environment.json")
    try:
        entries = read_json(path, kind=list) if os.path.exists(path) else []
    except RunFileError as e:  # not a reason to stop the run; kept aside, and the new record says what it lost
        kept = path + ".damaged"
        try:
            os.replace(path, kept)
        except OSError:
            kept = None
        warn(
            f"{first_line(e)}: which code and packages made this run before now is unknown; "
            f"{f'kept as {kept}, and ' if kept else ''}the new record says so (stats.py warns)"
        )
        entries, entry["earlier_record_lost"] = [], True
    write_json(path, entries + [entry], indent=2)


def duration(seconds):
    """3d 4h, 2h 05m, 4m 10s: an ETA a reader takes in at a glance."""
    seconds = int(seconds)
    if seconds >= 86400:
        return f"{seconds // 86400}d {seconds % 86400 // 3600}h"
    if seconds >= 3600:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m {seconds % 60:02d}s"


def warn(message):
    print(f"warning: {message}", file=sys.stderr, flush=True)


def exit_error(message):
    """Bad input, or a file that cannot be used: one line on stderr and exit code 2, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# The command line: the flags checked at the door
# (flag, lowest, highest, whether the lowest is allowed) of the real-valued flags
NUMBERS = (
    ("learning_rate", 0.0, math.inf, False),
    ("weight_decay", 0.0, math.inf, True),
    ("camal_coef", 0.0, math.inf, True),
    ("shapes_cue_prob", 0.0, 1.0, True),
    ("prior_threshold", 0.0, 1.0, True),
)


def check_args(args):
    if args.track:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ValueError("--track needs wandb: pip install -r requirements-cluster.txt") from None
    if args.weights is not None and not args.pretrained:  # it would be ignored: the run starts from random weights
        raise ValueError(
            f"--weights {args.weights} is the start of a --pretrained run, and this one starts from random weights "
            "(shapes does unless --pretrained is given): add --pretrained"
        )
    if args.folds < 2:
        raise ValueError(f"--folds must be at least 2, got {args.folds}")
    if args.fold != "all" and not (args.fold.isdigit() and int(args.fold) < args.folds):
        raise ValueError(f"--fold must be 0 to {args.folds - 1} or 'all', got {args.fold!r}")
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("num_workers", "checkpoint_every", "collapse_patience", "faithfulness_per_class"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must not be negative, got {getattr(args, name)}")
    for name in ("seed", "split_seed"):
        if not 0 <= getattr(args, name) < 2**31:
            raise ValueError(
                f"--{name.replace('_', '-')} must lie in 0 .. 2**31 - 1 (numpy's and torch's seeds), got "
                f"{getattr(args, name)}"
            )
    for name, low, high, low_allowed in NUMBERS:  # nan fails every comparison, so it is refused here too
        v = getattr(args, name)
        if not (
            isinstance(v, (int, float)) and math.isfinite(v) and (v >= low if low_allowed else v > low) and v <= high
        ):
            bound = f"{'at least' if low_allowed else 'above'} {low:g}" + (
                f" and at most {high:g}" if high < math.inf else ""
            )
            raise ValueError(f"--{name.replace('_', '-')} must be a number {bound}, got {v}")
    if args.dataset == "shapes":
        if not 1 <= args.shapes_classes <= len(SHAPE_NAMES):
            raise ValueError(f"--shapes-classes must lie in 1 .. {len(SHAPE_NAMES)}, got {args.shapes_classes}")
        # a class dealt round-robin over the folds: fewer images than folds empty some
        if args.shapes_per_class < args.folds:
            raise ValueError(
                f"--shapes-per-class {args.shapes_per_class} is less than --folds {args.folds}: some held-out folds "
                "would lack a class or be empty; give at least one image per class and fold"
            )
    if args.image_size < 32:
        raise ValueError(f"--image-size must be at least 32, got {args.image_size}")
    if args.image_size != CROP and args.model in ("vit_b_16", "maxvit_t"):
        raise ValueError(f"--model {args.model} takes {CROP} x {CROP} images only, got --image-size {args.image_size}")
    if args.image_size != CROP and METHODS[args.method]["clip_masks"]:  # the CLIP encoder sees the training crop
        raise ValueError(
            f"--method prior takes {CROP} x {CROP} images only (CLIP's input), got --image-size {args.image_size}"
        )
    if not 0.0 <= args.tau < 1.0:
        raise ValueError(f"--tau must lie in [0, 1), got {args.tau}")
    if METHODS[args.method]["clip_masks"]:
        if (args.prior_weights is None) == (args.prior_pretrained is None):
            raise ValueError(
                "--method prior needs one of --prior-pretrained TAG (open_clip's pretrained weights of --prior-model, "
                "e.g. openai, "
                "downloaded), --prior-weights PATH (a local open_clip weights file), or --prior-weights random (an "
                "untrained encoder, tests)"
            )
        if args.prior_pretrained is not None:
            try:
                import open_clip
            except ImportError:
                raise ValueError("--method prior needs open_clip: pip install -r requirements-prior.txt") from None
            tags = open_clip.list_pretrained_tags_by_model(args.prior_model)
            if args.prior_pretrained not in tags:
                raise ValueError(
                    f"--prior-pretrained {args.prior_pretrained} is not a tag of {args.prior_model}; its tags: "
                    f"{', '.join(tags)}"
                )
        if args.prior_weights not in (None, "random") and not os.path.isfile(args.prior_weights):
            raise FileNotFoundError(f"--prior-weights {args.prior_weights}: no such file")
        if not 0.0 <= args.prior_threshold < 1.0:
            raise ValueError(f"--prior-threshold must lie in [0, 1), got {args.prior_threshold}")
    if args.weights is not None and not os.path.isfile(args.weights):
        raise FileNotFoundError(f"--weights {args.weights}: no such file")
    need = step_bytes(args.model, args.batch_size // int(os.environ.get("WORLD_SIZE", 1)), args.image_size)
    gpu = args.cuda and torch.cuda.is_available()
    room = (
        torch.cuda.get_device_properties(0).total_memory
        if gpu
        else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    )
    if need > 0.8 * room:  # refused now, with the figure, rather than by the OOM killer in the first step
        raise ValueError(
            f"a training step of {args.model} on --batch-size {args.batch_size} images of {args.image_size} x "
            f"{args.image_size} keeps about {need / 2**30:.1f} GiB of activations, more than 80 % of "
            f"{'the GPU' if gpu else 'this machine'}'s {room / 2**30:.1f} GiB: lower --batch-size or --image-size"
        )


def step_bytes(name, batch, side):
    """About a training step's memory: every layer's float32 output for one batch (the graph keeps them for the
    backward; CAMAL's double backward keeps more), from a forward on the meta device (shapes only, no memory)."""
    sizes = []
    with torch.device("meta"):
        model = build_model(name, 2)[0]
        for m in model.modules():
            if not list(m.children()):
                m.register_forward_hook(lambda m, i, out: sizes.append(out.numel() if torch.is_tensor(out) else 0))
        try:
            with torch.no_grad():
                model(torch.empty(1, 3, side, side))
        except RuntimeError:  # a size the model cannot take: its first step says so
            sizes.clear()
    return 4 * batch * (sum(sizes) + 4 * side * side)  # and the batch itself: image and mask


def setup(args):
    """Settle and check everything before any work: (args, checkpoint, records, classes). Bad input raises ValueError,
    FileNotFoundError or DataError with a message that says why."""
    checkpoint = None
    if args.resume is not None:
        args, checkpoint = read_resume(
            args,
            ("metrics.json", " (a --fold all run continues from the newest fold's folder)"),
            DL_CHECKPOINT_KEYS,
            keep=("resume", "cuda", "num_workers", "faithfulness_per_class"),
        )
    else:
        if args.epochs is None:
            args.epochs = 8 if args.dataset == "shapes" else 500
        if args.learning_rate is None:
            args.learning_rate = 1e-4 if args.model in ("vit_b_16", "swin_v2_t", "maxvit_t") else 1e-3
    check_args(args)
    # where the run writes: checked before any work
    for folder in ("runs",) + ((args.prior_cache,) if METHODS[args.method]["clip_masks"] else ()):
        if unwritable(folder):
            raise RunFileError(f"cannot write in {folder}: {unwritable(folder)}")
    if args.download and args.dataset != "shapes":
        if args.data_dir is None:
            raise ValueError("--download needs --data-dir, the folder to put the dataset in")
        download.download_dataset(args.dataset, args.data_dir, args.download_mirror)
    try:
        records, classes = dataset_records(args)
    except FileNotFoundError as e:  # the data is not there: say how to get it
        hint = (
            ""
            if args.download
            else f" ({download.BUSI_SOURCE})"
            if args.dataset == "busi"
            else " (--download fetches it)"
        )
        raise FileNotFoundError(f"{e}{hint}") from None
    check_files(records)
    if args.pretrained:
        download.imagenet_state_dict(
            args.model, args.weights, args.download_mirror
        )  # fetched and checked before any training, not after
    return args, checkpoint, records, classes


def parse_args(argv):
    """tyro's parse, where --pretrained's default depends on --dataset: shapes (toy data) trains from scratch unless
    --pretrained is given, so a fresh machine needs no weights; the same flags are parsed over that default."""
    args = tyro.cli(Args, args=argv)
    if args.dataset == "shapes" and args.resume is None:
        args = tyro.cli(Args, args=argv, default=Args(pretrained=False))
    return args


if __name__ == "__main__":
    try:
        main(*setup(parse_args(sys.argv[1:])))
    except (
        FileNotFoundError,
        DataError,
        ValueError,
    ) as e:  # bad input, a file missing or corrupt, --track without a key
        exit_error(str(e))
    except OSError as e:  # TensorBoard's writer on a full disk or a folder made read-only; the last checkpoint is whole
        exit_error(f"cannot write the run's files: {WRITE_FAILURES.get(e.errno) or first_line(e)}")
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once, no traceback
        print(
            "\nstopped at once, without a checkpoint; the last saved one (if any) is in the run folder", file=sys.stderr
        )
        sys.exit(128 + signal.SIGINT)
    finally:
        if Run.active is not None:
            Run.active.close()
        if dist.is_initialized():
            dist.destroy_process_group()
