# The paper's regulariser study (Appendix B, Table 4 and Figure 9): how CAMAL's beta - alpha and the suppress-only
# beta of recent work respond when attention drifts from the mask. Each mask M is perturbed into simulated attention
# maps H_1..H_n of rising severity (shift, erosion, dilation); a regulariser that measures misalignment should rise
# with the severity. Single-file in CleanRL's style; the dataset loaders and camal_terms are copied unchanged from
# train_dl_camal.py and ppo_camal_vizdoom.py (tests/test_shared_helpers.py checks).
import errno
import importlib.util
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import cv2
import numpy as np
import scipy.stats
import torch
import torchvision.transforms.v2.functional as TF
import tyro
from PIL import Image

_spec = importlib.util.spec_from_file_location(
    "download", os.path.join(os.path.dirname(os.path.abspath(__file__)), "download.py")
)
download = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(download)  # --download: the datasets' archives, fetched and verified

RESIZE, CROP = 256, 224  # train_dl_camal.py's geometry: resize to 256 x 256, centre crop 224
PERTURBATIONS = ("shift", "erode", "dilate")
REGULARIZERS = {"camal": "CAMAL", "suppress": "Supp. only"}
DATASET_NAMES = {"busi": "BUSI", "pets": "Oxford-IIIT-Pet", "flowers": "Oxford-Flower", "shapes": "Shapes"}


@dataclass
class Args:
    dataset: Literal["shapes", "pets", "flowers", "busi"] = "shapes"
    """shapes (built in, no download), pets (Oxford-IIIT-Pet), flowers (Oxford-Flower-102) or busi"""
    data_dir: Optional[str] = None
    """the folder that holds the dataset's own folder (oxford-iiit-pet/, flowers-102/, Dataset_BUSI_with_GT/)"""
    download: bool = False
    """fetch --dataset into --data-dir first, checksum-verified (download.py)"""
    download_mirror: Optional[str] = None
    """fetch the dataset from this server instead of its own (the same paths)"""
    levels: int = 10
    """severity steps H_1..H_n per perturbation (3 to 200; a correlation needs at least 3)"""
    shift_max: float = 1.0
    """the largest shift, in multiples of the mask's extent along the shift direction (1: just no overlap)"""
    dilate_max: float = 1.0
    """the largest dilation radius, in multiples of the mask's equivalent radius sqrt(area / pi)"""
    max_images: Optional[int] = None
    """use a seeded random subset of this many images (all by default)"""
    seed: int = 0
    """seed of the shift directions and of the image subset"""
    significance: float = 0.05
    """Wilcoxon p below this is significant (the paper: 0.05)"""
    out: Optional[str] = None
    """also write study.json (every number) and figure9.png to this folder"""
    shapes_classes: int = 4
    """shapes: number of classes (one shape each, at most 6)"""
    shapes_per_class: int = 40
    """shapes: images per class"""
    split_seed: int = 0
    """shapes: the seed the images are drawn with (train_dl_camal.py's --split-seed)"""
    shapes_cue: Literal["background", "corner"] = "background"
    """shapes: train_dl_camal.py's --shapes-cue, which sets the objects' size (larger with the background cue)"""
    resize: Literal["square", "shorter-side"] = "square"
    """train_dl_camal.py's --resize: masks in the geometry that training used"""


# ---------------------------------------------------------------------------------------------
# camal_terms, copied unchanged from ppo_camal_vizdoom.py (tests/test_shared_helpers.py checks)
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# Datasets, copied unchanged from train_dl_camal.py (tests/test_shared_helpers.py checks); only the masks are used
# ---------------------------------------------------------------------------------------------
class DataError(RuntimeError):
    """A dataset file that is there but unusable (corrupt, wrong size): the message names it."""


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


def resize_crop(image, resize, crop, nearest=False, how="square"):
    """Appendix C's geometry for a C x H x W tensor: resized to resize x resize (how="square": both sides, whatever the
    aspect ratio), or its shorter side to resize (how="shorter-side", torchvision's convention), then centre-cropped to
    crop x crop. nearest: for masks."""
    mode = TF.InterpolationMode.NEAREST if nearest else TF.InterpolationMode.BILINEAR
    size = [resize, resize] if how == "square" else resize
    return TF.center_crop(TF.resize(image, size, interpolation=mode, antialias=not nearest), crop)


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


def write_json(path, obj, **kw):
    """JSON through atomic_write: a reader never sees half a file, a crash never leaves one."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, **kw).encode()))


def crop_mask(mask, how):
    """A dataset mask in train_dl_camal.py's geometry: 256 x 256 (or the shorter side to 256; nearest), centre crop
    224."""
    m = torch.from_numpy(np.ascontiguousarray(mask))[None].to(torch.uint8)
    return resize_crop(m, RESIZE, CROP, nearest=True, how=how)[0].numpy().astype(bool)


def load_mask(args, record):
    path, mask_paths, label = record
    if args.dataset == "shapes":
        return crop_mask(
            render_shape(path, label, args.split_seed, None, args.shapes_cue, args.shapes_classes)[1], args.resize
        )
    return crop_mask(read_mask(args.dataset, mask_paths), args.resize)


# ---------------------------------------------------------------------------------------------
# Simulated attention: the mask perturbed with rising severity
# ---------------------------------------------------------------------------------------------
def perturb(mask, levels, shift_max, dilate_max, angle):
    """{perturbation: levels x h x w float maps H_1..H_n}; severity i/n for i = 1..n, from a mild to a severe change.

    shift: M translated by i/n * shift_max * (M's extent along the direction `angle`), zero-filled: attention that
        is misaligned (pixels pushed out of the frame are lost, as they would be for a real map).
    erode: M eroded by a Euclidean disk of radius i/(n+1) * R_in (R_in: the largest inscribed radius, so H_n is never
        empty): attention that covers too little of M.
    dilate: M dilated by a disk of radius i/n * dilate_max * sqrt(|M| / pi): attention that spills over M.
    Erosion and dilation by a disk of radius r keep the pixels more than r from the background, or at most r from M:
    opencv's exact Euclidean distance transform gives every level from one pass, pixel for pixel what cv2.erode and
    cv2.dilate give with that disk as kernel (tests check), at a fraction of their cost for large radii.
    """
    m = mask.astype(np.uint8)
    h, w = m.shape
    sev = np.arange(1, levels + 1, dtype=np.float64) / levels
    inside = cv2.distanceTransform(m, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)  # distance to the nearest background pixel
    outside = cv2.distanceTransform(1 - m, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)  # distance to the nearest mask pixel
    # squared distances between pixel centres are whole numbers: compared as such, a pixel exactly r away is decided
    # the same way as by a disk kernel {x^2 + y^2 <= r^2}, whatever the float rounding of the distance
    in2, out2 = np.rint(inside.astype(np.float64) ** 2), np.rint(outside.astype(np.float64) ** 2)
    r_in = float(inside.max())
    erode = in2[None] > ((np.arange(1, levels + 1) / (levels + 1) * r_in) ** 2)[:, None, None]
    dilate = out2[None] <= ((sev * dilate_max * math.sqrt(m.sum() / math.pi)) ** 2)[:, None, None]
    ys, xs = np.nonzero(m)
    direction = np.array([math.cos(angle), math.sin(angle)])
    proj = xs * direction[0] + ys * direction[1]
    extent = proj.max() - proj.min() + 1
    shift = []
    for s in sev:
        dx, dy = s * shift_max * extent * direction
        shift.append(
            cv2.warpAffine(m, np.float32([[1, 0, dx], [0, 1, dy]]), (w, h), flags=cv2.INTER_NEAREST, borderValue=0)
        )
    # float64: under dilation alpha is exactly 1, and beta - alpha must move exactly as beta does
    return {
        "shift": np.stack(shift).astype(np.float64),
        "erode": erode.astype(np.float64),
        "dilate": dilate.astype(np.float64),
    }


def responses(mask, maps):
    """R(M, H) of every map: CAMAL's beta - alpha and the suppress-only beta, from the training helper camal_terms."""
    cam = torch.from_numpy(maps)
    alpha, beta, valid = camal_terms(cam, torch.from_numpy(mask)[None].expand_as(cam))
    assert bool(valid.all())  # the caller leaves out empty and full masks
    return {"camal": (beta - alpha).numpy(), "suppress": beta.numpy()}


def correlations(response):
    """Spearman and Pearson correlation of severity (1..n) with the response; None where the response is constant
    (the regulariser does not respond, e.g. suppress-only under erosion: there is no correlation to speak of)."""
    if np.all(response == response[0]):
        return {"spearman": None, "pearson": None}
    sev = np.arange(1, len(response) + 1)
    return {
        "spearman": float(scipy.stats.spearmanr(sev, response).statistic),
        "pearson": float(scipy.stats.pearsonr(sev, response).statistic),
    }


# ---------------------------------------------------------------------------------------------
# Per dataset: mean +- std over images, and the one-tailed Wilcoxon test of CAMAL > suppress-only per cell
# ---------------------------------------------------------------------------------------------
def summarise(per_image, significance):
    """Table 4's cells: per perturbation and correlation, each regulariser's mean +- std over the images where it
    responds, how many images it does not respond on, and the Wilcoxon test over all images (no response counts as a
    correlation of 0: the severity says nothing about the regulariser's value)."""
    table = {}
    for kind in PERTURBATIONS:
        for corr in ("spearman", "pearson"):
            cell = {}
            values = {}
            for reg in REGULARIZERS:
                v = [img[kind][reg][corr] for img in per_image]
                responding = [x for x in v if x is not None]
                # rounded: correlations equal up to floating-point error are ties, not evidence for either side
                values[reg] = np.round([0.0 if x is None else x for x in v], 9)
                cell[reg] = {
                    "mean": float(np.mean(responding)) if responding else None,
                    "std": float(np.std(responding, ddof=1)) if len(responding) > 1 else None,
                    "responding": len(responding),
                    "flat": len(v) - len(responding),
                }
            d = values["camal"] - values["suppress"]
            if np.any(d != 0):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    p = float(scipy.stats.wilcoxon(values["camal"], values["suppress"], alternative="greater").pvalue)
            else:
                p = 1.0  # identical correlations on every image (dilation: alpha stays 1, so both move with beta)
            higher = float(values["camal"].mean()) > float(values["suppress"].mean())
            cell["wilcoxon_p"] = p
            cell["verdict"] = (
                "significant" if higher and p < significance else "higher, not significant" if higher else "not higher"
            )
            table[kind, corr] = cell
    return table


def cell_text(c, bold=False):
    if c["responding"] == 0:
        return "—"  # no response at all: no correlation to report
    text = f"{c['mean']:.2f} ± {c['std']:.2f}" if c["std"] is not None else f"{c['mean']:.2f}"
    if c["flat"]:
        text += f" ({c['flat']} flat)"
    return f"**{text}**" if bold else text


def table_markdown(dataset, table, n_images, significance):
    lines = [
        f"### Regulariser response to perturbed attention: {DATASET_NAMES.get(dataset, dataset)}, {n_images} masks "
        "(the paper's Table 4)",
        "",
        "| Perturbation | Spearman CAMAL | Spearman Supp. only | Pearson CAMAL | Pearson Supp. only |",
        "|---|---|---|---|---|",
    ]
    for kind in PERTURBATIONS:
        row = [kind.capitalize()]
        for corr in ("spearman", "pearson"):
            c = table[kind, corr]
            row += [cell_text(c["camal"], c["verdict"] == "significant"), cell_text(c["suppress"])]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        f"Correlation of severity with the response, mean ± std over the masks where the regulariser responds. "
        "—: no response on any mask (a constant value); (k flat): no response on k masks. **Bold**: CAMAL's mean is "
        "higher "
        f"and the one-tailed Wilcoxon signed-rank test over masks (H1: CAMAL > suppress-only; no response counts as 0) "
        f"gives p < {significance:g}.",
        "",
        "| Perturbation | Correlation | p (one-tailed) | Result |",
        "|---|---|---|---|",
    ]
    for kind in PERTURBATIONS:
        for corr in ("spearman", "pearson"):
            c = table[kind, corr]
            lines.append(f"| {kind} | {corr} | {c['wilcoxon_p']:.3g} | {c['verdict']} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Figure 9: mask, perturbed map, overlap colours and the two responses against severity
# ---------------------------------------------------------------------------------------------
OVERLAP = {"M ∩ H": (1.0, 0.6, 0.1), "M \\ H (missed)": (0.2, 0.45, 0.9), "H \\ M (spurious)": (0.6, 0.3, 0.75)}


def overlap_image(mask, h):
    img = np.ones(mask.shape + (3,))
    h = h > 0.5
    for (name, colour), region in zip(OVERLAP.items(), (mask & h, mask & ~h, h & ~mask)):
        img[region] = colour
    return img


def regions(mask, h, reg):
    """Where a regulariser pushes attention, from its gradient: encouraged (green) where dR/dH < 0, i.e. more
    attention there lowers the loss; suppressed (red) where dR/dH > 0 and there is attention to take away (H > 0)."""
    cam = torch.from_numpy(h[None].astype(np.float64)).requires_grad_(True)
    alpha, beta, _ = camal_terms(cam, torch.from_numpy(mask)[None])
    (beta - alpha if reg == "camal" else beta).sum().backward()
    g = cam.grad[0].numpy()
    img = np.ones(mask.shape + (3,))
    img[g < 0] = (0.25, 0.7, 0.25)
    img[(g > 0) & (h > 0)] = (0.85, 0.2, 0.2)
    return img


def plot_figure9(path, mask, maps, resp, mean_resp, levels):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    show = levels // 2  # a middle severity
    fig, axes = plt.subplots(len(PERTURBATIONS), 6, figsize=(19, 3.2 * len(PERTURBATIONS)))
    for row, kind in zip(axes, PERTURBATIONS):
        h = maps[kind][show - 1]
        row[0].imshow(mask, cmap="gray")
        row[0].set_title(f"{kind}: mask M")
        row[1].imshow(h, cmap="gray")
        row[1].set_title(f"H at severity {show}/{levels}")
        row[2].imshow(overlap_image(mask, h))
        row[2].set_title("overlap")
        for ax, (reg, name) in zip(row[3:5], REGULARIZERS.items()):
            ax.imshow(regions(mask, h, reg))
            ax.contour(mask, levels=[0.5], colors="gray", linewidths=0.6)
            ax.set_title(f"{name}: pushes H")
        for ax in row[:5]:
            ax.axis("off")
        sev = np.arange(1, levels + 1)
        for reg, name in REGULARIZERS.items():
            (line,) = row[5].plot(sev, resp[kind][reg], marker="o", label=f"{name} (this mask)")
            row[5].plot(
                sev, mean_resp[kind][reg], linestyle="--", color=line.get_color(), label=f"{name} (mean over masks)"
            )
        row[5].set_xlabel("severity")
        row[5].set_ylabel("R(M, H)")
    # legends beside the panels, never over them
    axes[0][5].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    axes[0][2].legend(
        handles=[Patch(color=c, label=n) for n, c in OVERLAP.items()],
        fontsize=7,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.02),
        ncol=1,
    )
    axes[0][4].legend(
        handles=[
            Patch(color=(0.25, 0.7, 0.25), label="encouraged (dR/dH < 0)"),
            Patch(color=(0.85, 0.2, 0.2), label="suppressed (dR/dH > 0, H > 0)"),
        ],
        fontsize=7,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.02),
    )
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, dpi=110, bbox_inches="tight", format="png"))
    plt.close(fig)


def check_args(args):
    if not 3 <= args.levels <= 200:
        raise ValueError(
            "--levels must lie in [3, 200] (a correlation needs three points; each level holds 3 maps per mask), got "
            f"{args.levels}"
        )
    for flag, value in (("--shift-max", args.shift_max), ("--dilate-max", args.dilate_max)):
        if not (math.isfinite(value) and 0 < value <= 100):  # nan would pass a comparison and empty every map
            raise ValueError(f"{flag} must be a number in (0, 100] (multiples of the mask's size), got {value}")
    if args.max_images is not None and args.max_images < 1:
        raise ValueError(f"--max-images must be at least 1, got {args.max_images}")
    if not 0 < args.significance < 1:
        raise ValueError(f"--significance must be between 0 and 1, got {args.significance}")
    if args.out is not None and (not args.out or unwritable(args.out)):  # checked now, not after the study
        raise ValueError(f"--out {args.out!r}: {unwritable(args.out) if args.out else 'give a folder'}")


def study(args, records):
    """Per-image correlations (and responses), the masks left out, and one example for the figure."""
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(records))
    if args.max_images is not None:
        order = order[: args.max_images]
    per_image, left_out, example = [], [], None
    sums = {k: {r: np.zeros(args.levels) for r in REGULARIZERS} for k in PERTURBATIONS}
    start = last = time.time()
    for n, i in enumerate(sorted(order)):  # files in their own order; the subset is what is random
        mask = load_mask(args, records[i])
        if not mask.any() or mask.all():  # e.g. BUSI's normal images: no region to align with
            left_out.append(str(records[i][0]))
            continue
        maps = perturb(mask, args.levels, args.shift_max, args.dilate_max, rng.uniform(0, 2 * math.pi))
        resp = {kind: responses(mask, maps[kind]) for kind in PERTURBATIONS}
        entry = {"image": str(records[i][0]), "label": int(records[i][2])}
        for kind in PERTURBATIONS:
            entry[kind] = {reg: correlations(resp[kind][reg]) for reg in REGULARIZERS}
            for reg in REGULARIZERS:
                sums[kind][reg] += resp[kind][reg]
        per_image.append(entry)
        if example is None:
            example = (mask, maps, resp)
        if time.time() - last > 10:
            last = time.time()
            print(f"  {n + 1}/{len(order)} masks, {(n + 1) / (last - start):.0f} per second", flush=True)
    mean_resp = {k: {r: (sums[k][r] / max(len(per_image), 1)).tolist() for r in REGULARIZERS} for k in PERTURBATIONS}
    return per_image, left_out, example, mean_resp


if __name__ == "__main__":
    args = tyro.cli(Args)
    try:
        check_args(args)
        if args.download and args.dataset != "shapes":
            if args.data_dir is None:
                raise ValueError("--download needs --data-dir, the folder to put the dataset in")
            download.download_dataset(args.dataset, args.data_dir, args.download_mirror)
        records, classes = dataset_records(args)
        if not records:
            raise ValueError(f"no images found for --dataset {args.dataset} in {args.data_dir}")
        print(f"{args.dataset}: {len(records)} images, {args.levels} severity levels per perturbation", flush=True)
        per_image, left_out, example, mean_resp = study(args, records)
        if not per_image:
            raise ValueError(f"every mask of {args.dataset} is empty or covers the whole image: nothing to perturb")
    except (ValueError, FileNotFoundError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

    table = summarise(per_image, args.significance)
    print()
    print(table_markdown(args.dataset, table, len(per_image), args.significance))
    if left_out:
        print(f"{len(left_out)} masks left out: empty or covering the whole image (first: {left_out[0]})")
    try:  # a disk that fills or a folder made read-only: a clear message, and no half-written file
        if args.out:
            make_folder(args.out)
            result = {
                "args": asdict(args),
                "masks": len(per_image),
                "left_out": left_out,
                "table": {f"{k}/{c}": v for (k, c), v in table.items()},
                "mean_response": mean_resp,
                "per_image": per_image,
            }
            write_json(os.path.join(args.out, "study.json"), result, indent=1)
            mask, maps, resp = example
            plot_figure9(os.path.join(args.out, "figure9.png"), mask, maps, resp, mean_resp, args.levels)
            print(f"written to {args.out}/: study.json, figure9.png")
    except RunFileError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
