# Attention faithfulness (the paper's Section 4.2) of classifiers trained by train_dl_camal.py:
# remove (or insert) pixels in the order of the model's Grad-CAM and watch the ground-truth probability.
# Reads only run folders (model.pt, faithfulness_samples.pt, metrics.json). Single-file in CleanRL's style.
import errno
import json
import math
import os
import pickle
import shutil
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import tyro
from tqdm import tqdm

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet normalisation, as in train_dl_camal.py


@dataclass
class Args:
    runs: tyro.conf.Positional[List[str]]
    """run folders written by train_dl_camal.py (globs expanded by the shell)"""
    steps: int = 20
    """k goes from 0 to 100 % of the pixels in this many equal steps"""
    baseline: Optional[str] = None
    """`random`: also score a random pixel ranking per sample, the floor every method must beat"""
    fill: str = "zero"
    """what removed pixels become: zero (black, the paper's), mean (the mean colour) or blur (the image blurred)"""
    plot: Optional[str] = None
    """write removal and insertion curves per method, with 95 % bands, to this PNG"""
    figures: Optional[str] = None
    """write the paper's attention figures (Figures 3 and 10) to this folder: the same held-out samples with each
    method's CAM, and per method the pixel-wise mean and variance of the CAMs beside the masks'"""
    figure_samples: int = 6
    """rows of the side-by-side figure (samples spread over the classes)"""
    seed: int = 0
    """seed of the random ranking and of tie-breaking among equal attention values"""
    cuda: bool = True
    """use the GPU when there is one (the CPU otherwise)"""
    tau: float = 0.7
    """the threshold on H whose region the side-by-side figure outlines (train_dl_camal.py's --tau)"""


# ---------------------------------------------------------------------------------------------
# Grad-CAM and model helpers, copied unchanged (tests/test_shared_helpers.py checks)
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
# Removal and insertion
# ---------------------------------------------------------------------------------------------
def pixel_ranking(cam, rng):
    """Pixels (flat indices) from most to least attended; ties broken at random, not in raster order."""
    cam = np.asarray(cam, dtype=np.float64).ravel()
    return np.lexsort((rng.random(cam.size), -cam))


FILLS = ("zero", "mean", "blur")


def fill_image(image, fill):
    """What removed pixels become (uint8, like the image). zero: black, the paper's; the removed region stays a black
    silhouette, which a model that reads shapes can still read. mean: the image's mean colour, no black edge. blur: the
    image under a Gaussian blur of sigma 1/32 of its longer side (RISE's canvas), colours kept and edges gone."""
    if fill == "zero":
        return torch.zeros_like(image)
    if fill == "mean":
        return image.float().mean((1, 2), keepdim=True).round().to(image.dtype).expand_as(image)
    sigma = max(image.shape[1:]) / 32
    k = 2 * math.ceil(3 * sigma) + 1
    blurred = torchvision.transforms.functional.gaussian_blur(image.float()[None], [k, k], [sigma, sigma])[0]
    return blurred.round().clamp(0, 255).to(image.dtype)


def faithfulness_curves(predict, image, ranking, steps, fill="zero"):
    """Removal and insertion curves of one uint8 image (3 x H x W) for a pixel ranking.

    Removal replaces the top k % of pixels by fill_image's (black by default, in pixel space); insertion starts from
    that image and restores them. predict: uint8 batch -> the ground-truth class's probability per image. All k of one
    curve go through `predict` in one batch. Returns k (fractions), removal scores, insertion scores.
    """
    c, h, w = image.shape
    ks = np.linspace(0.0, 1.0, steps + 1)
    counts = np.round(ks * h * w).astype(int)
    # rank_of[p] = position of pixel p in the ranking; pixel p is in the top n when rank_of[p] < n
    rank_of = torch.empty(h * w, dtype=torch.long)
    rank_of[torch.from_numpy(ranking)] = torch.arange(h * w)
    top = (rank_of[None, :] < torch.from_numpy(counts)[:, None]).view(len(ks), 1, h, w).to(image.device)
    canvas = fill_image(image, fill)
    removal = torch.where(top, canvas[None], image[None])
    insertion = torch.where(top, image[None], canvas[None])
    batch = torch.cat([removal, insertion])
    # in chunks: the model's activations for hundreds of images at once would not fit (a 409 GB allocation once)
    scores = np.concatenate([np.asarray(predict(batch[i : i + 64])) for i in range(0, len(batch), 64)])
    return ks, scores[: len(ks)], scores[len(ks) :]


def auc(ks, scores):
    """Area under a curve over k in [0, 1], trapezoid rule."""
    scores, ks = np.asarray(scores, dtype=np.float64), np.asarray(ks, dtype=np.float64)
    return float(np.sum((scores[1:] + scores[:-1]) * np.diff(ks)) / 2)


def mean_ci(values):
    """Mean and the half-width of its 95 % confidence interval (1.96 standard errors)."""
    v = np.asarray(values, dtype=np.float64)
    se = v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float("nan")
    return float(v.mean()), float(1.96 * se)


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------
class RunError(ValueError):
    """A folder that is not a usable run of train_dl_camal.py."""


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


def write_json(path, obj, **kw):
    """JSON through atomic_write: a reader never sees half a file, a crash never leaves one."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, **kw).encode()))


METRICS_TYPES = {
    "dataset": str,
    "model": str,
    "method": str,
    "fold": int,
    "seed": int,
}  # what a run's scores are filed under


def load_run(run_dir):
    """Model (on the CPU), samples and metrics of a run; RunError if the folder is not a usable run (every file is read
    through read_json or read_torch, so an empty, cut or foreign file is named, never a traceback)."""
    if not os.path.isdir(run_dir):
        raise RunError(f"{run_dir} " + ("is not a folder" if os.path.exists(run_dir) else "does not exist"))
    for name in ("model.pt", "faithfulness_samples.pt", "metrics.json"):
        if not os.path.lexists(os.path.join(run_dir, name)):
            raise RunError(f"{run_dir} is not a run of train_dl_camal.py: no {name}")
    saved = read_torch(os.path.join(run_dir, "model.pt"))
    need = {"state_dict", "architecture", "num_classes", "classes", "preprocessing"}
    if not isinstance(saved, dict) or not need <= set(saved) or not isinstance(saved["preprocessing"], dict):
        raise RunError(
            f"{run_dir}/model.pt is not a train_dl_camal.py model file of this version (it needs {sorted(need)})"
        )
    pre = saved["preprocessing"]
    crop = pre.get("crop")  # train_dl_camal.py's --image-size: 224 unless the run chose another
    # the samples were stored after training's own resize and crop (--resize square or shorter-side), so they are used
    # as they are
    if pre.get("resize_mode", "shorter-side") not in ("square", "shorter-side"):  # runs before --resize: shorter-side
        raise RunError(
            f"{run_dir}/model.pt names an unknown resize {pre.get('resize_mode')!r} (square or shorter-side)"
        )
    if tuple(pre.get("mean", ())) != MEAN or tuple(pre.get("std", ())) != STD or not isinstance(crop, int) or crop < 32:
        raise RunError(
            f"{run_dir}/model.pt was trained with other preprocessing ({pre}); this version expects "
            f"mean {MEAN}, std {STD} and a crop of at least 32 pixels"
        )
    try:
        model = CamModel(saved["architecture"], saved["num_classes"])
        model.net.load_state_dict(saved["state_dict"])
    except (AttributeError, RuntimeError, TypeError) as e:
        raise RunError(
            f"{run_dir}/model.pt does not match {saved['architecture']} of this version: {first_line(e)}"
        ) from None
    samples = read_torch(os.path.join(run_dir, "faithfulness_samples.pt"))
    if not isinstance(samples, dict) or not {"images", "masks", "labels"} <= set(samples):
        raise RunError(
            f"{run_dir}/faithfulness_samples.pt is not a train_dl_camal.py samples file (it needs images, masks, "
            "labels)"
        )
    if samples["images"].dtype != torch.uint8 or samples["images"].shape[1:] != (3, crop, crop):
        raise RunError(
            f"{run_dir}/faithfulness_samples.pt: expected uint8 images of 3 x {crop} x {crop} (model.pt's crop)"
        )
    if len(samples["labels"]) and int(samples["labels"].max()) >= saved["num_classes"]:
        raise RunError(f"{run_dir}/faithfulness_samples.pt has labels beyond model.pt's {saved['num_classes']} classes")
    metrics = read_json(os.path.join(run_dir, "metrics.json"))
    wrong = [
        k
        for k, kind in METRICS_TYPES.items()
        if not isinstance(metrics.get(k), kind) or isinstance(metrics.get(k), bool)
    ]
    if wrong:
        raise RunError(
            f"{run_dir}/metrics.json is not a metrics.json of train_dl_camal.py: {', '.join(wrong)} missing or of the "
            "wrong type"
        )
    # model.pt must be this run's: a file copied in from another run would be scored under this run's method
    classes = list(metrics.get("per_class_accuracy") or saved["classes"])
    theirs = {
        "model": saved["architecture"],
        "classes": list(saved["classes"]),
        **{k: saved[k] for k in ("method", "dataset", "run_name") if k in saved},
    }
    ours = {
        "model": metrics["model"],
        "classes": classes,
        "method": metrics["method"],
        "dataset": metrics["dataset"],
        "run_name": metrics.get("run_name"),
    }
    differ = [f"{k} {theirs[k]!r} vs {ours[k]!r}" for k in theirs if ours.get(k) is not None and theirs[k] != ours[k]]
    if differ or saved["num_classes"] != len(saved["classes"]):
        raise RunError(
            f"{run_dir}/model.pt is not this run's model (model.pt against metrics.json: "
            f"{'; '.join(differ) or 'its class count'})"
        )
    # so must the samples (files of older versions name no run): another fold's held-out images were trained on here
    differ = [
        f"{k} {samples[k]!r} vs {metrics.get(k)!r}"
        for k in ("run_name", "fold", "seed")
        if k in samples and samples[k] != metrics.get(k)
    ]
    if differ:
        raise RunError(
            f"{run_dir}/faithfulness_samples.pt is not this run's held-out samples (against metrics.json: "
            f"{'; '.join(differ)})"
        )
    return model.eval(), samples, metrics


def evaluate_run(model, samples, args, device, tie_rng, random_rng):
    """Curves and AUCs for every sample of a run (and for a random ranking when asked), and the samples' CAMs.

    Two generators: tie_rng breaks ties among equal attention values, random_rng draws the random rankings, so asking
    for the random baseline never changes the methods' own numbers."""
    out, cams = [], []
    for image, label in zip(samples["images"], samples["labels"]):
        image, label = image.to(device), int(label)

        def predict(batch):
            with torch.no_grad():
                logits, _ = model(normalise(batch, next(model.parameters()).dtype))
            return torch.softmax(logits.float(), dim=1)[:, label].cpu().numpy()

        logits, cam = class_cam(
            model, image[None], torch.tensor([label], device=device), double_backward=False, autocast=nullcontext()
        )
        cams.append(cam[0].cpu())
        rankings = {"attention": pixel_ranking(cams[-1].numpy(), tie_rng)}
        if args.baseline == "random":
            rankings["random"] = random_rng.permutation(cam[0].numel())
        entry = {"label": label, "correct": bool(int(logits[0].argmax()) == label)}
        for kind, ranking in rankings.items():
            ks, removal, insertion = faithfulness_curves(predict, image, ranking, args.steps, args.fill)
            # the paper's AUCs, and the same over curves divided by the intact image's probability (removal starts
            # there: a model that is wrong from the start has a low removal AUC for free); only where that probability
            # is at least NORMALISE_FLOOR, so a ratio stays below 1 / NORMALISE_FLOOR instead of exploding for a
            # near-zero start
            start = float(removal[0])
            scaled = start >= NORMALISE_FLOOR
            entry[kind] = {
                "removal": removal.tolist(),
                "insertion": insertion.tolist(),
                "removal_auc": auc(ks, removal),
                "insertion_auc": auc(ks, insertion),
                "removal_auc_normalised": auc(ks, removal / start) if scaled else None,
                "insertion_auc_normalised": auc(ks, insertion / start) if scaled else None,
            }
        entry["start_probability"] = entry["attention"]["removal"][0]
        out.append(entry)
    return ks, out, torch.stack(cams)


def summarise(ks, entries, kind):
    removal = np.array([e[kind]["removal"] for e in entries])
    insertion = np.array([e[kind]["insertion"] for e in entries])
    r_mean, r_ci = mean_ci([e[kind]["removal_auc"] for e in entries])
    i_mean, i_ci = mean_ci([e[kind]["insertion_auc"] for e in entries])
    return {
        "mean_removal": removal.mean(0).tolist(),
        "mean_insertion": insertion.mean(0).tolist(),
        "removal_auc": {"mean": r_mean, "ci95": r_ci},
        "insertion_auc": {"mean": i_mean, "ci95": i_ci},
        "start_probability": float(removal[:, 0].mean()),
        "n": len(entries),
    }


def plot_curves(path, ks, groups):
    """Removal and insertion curves per group, mean and 95 % band, in the views (rows) of print_summary's tables:
    every sample; the samples every method classifies correctly at k=0 (where the groups say, by "keys" and "correct");
    each curve divided by its p(true) at k=0, where that is at least NORMALISE_FLOOR. A method keeps one colour in every
    plot; "method/random" (its random-ranking floor) is a dashed line in the method's colour, without a band, so a plot
    with floors stays readable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {
        "camal": "tab:blue",
        "vanilla": "tab:orange",
        "prior": "tab:green",
        "suppress": "tab:red",
        "supp. only": "tab:red",
    }
    # (title, keep sample i of group g, its scale, the view's top)
    views = [("every sample", lambda g, i: True, lambda g, i: 1.0, 1.0)]
    if all(len(g.get("correct", {})) == len(g["removal"]) for g in groups.values()):
        common = correct_by_all(groups)
        views.append(
            (
                f"the {len(common)} samples every method classifies correctly",
                lambda g, i: g["keys"][i] in common,
                lambda g, i: 1.0,
                1.0,
            )
        )
    views.append(
        (
            f"divided by p(true) at k=0 (where it is at least {NORMALISE_FLOOR})",
            lambda g, i: g["removal"][i][0] >= NORMALISE_FLOOR,
            lambda g, i: g["removal"][i][0],
            1 / NORMALISE_FLOOR,
        )
    )
    fig, axes = plt.subplots(len(views), 2, figsize=(10, 3.6 * len(views)), squeeze=False)
    for row, (view, keep, scale, top) in enumerate(views):
        for ax, curve in zip(axes[row], ("removal", "insertion")):
            for name, g in groups.items():
                method, _, floor = name.partition("/")
                colour = colours.get(method.lower(), "tab:gray")
                picked = [i for i in range(len(g[curve])) if keep(g, i)]
                if not picked:
                    continue
                c = np.array([np.asarray(g[curve][i]) / scale(g, i) for i in picked])
                mean = c.mean(0)
                label = f"{name} (n={len(c)})"
                if floor:
                    ax.plot(100 * ks, mean, color=colour, linestyle="--", linewidth=1, label=label)
                    continue
                band = 1.96 * c.std(0, ddof=1) / np.sqrt(len(c)) if len(c) > 1 else np.zeros_like(mean)
                ax.plot(100 * ks, mean, color=colour, label=label)
                ax.fill_between(
                    100 * ks, np.clip(mean - band, 0, top), np.clip(mean + band, 0, top), color=colour, alpha=0.2
                )
            ax.set_title(f"{curve} of the top k % attended pixels:\n{view}", fontsize=9)
            ax.set_ylim(0, top)
            ax.legend(fontsize=7)
        axes[row, 0].set_ylabel("p(true class)" + (" / p at k=0" if top != 1.0 else ""))
    for ax in axes[-1]:
        ax.set_xlabel("k (%)")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, dpi=110, format="png"))
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# The paper's attention figures (Figures 3 and 10)
# ---------------------------------------------------------------------------------------------
def attention_figures(out, runs, rows, tau):
    """Two PNGs from the evaluated runs: the same held-out samples with each method's CAM side by side, and per method
    the pixel-wise mean and variance of its CAMs over all its samples beside the masks' own. Returns the paths
    written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out, exist_ok=True)
    methods = list(dict.fromkeys(r["method"] for r in runs))
    # the same images: runs of different methods on the same fold and seed hold the same faithfulness samples
    by_images = {}
    for r in runs:
        key = r["samples"]["images"].numpy().tobytes()
        by_images.setdefault(key, {}).setdefault(r["method"], r)
    shared = [g for g in by_images.values() if len(g) == len(methods)] or list(by_images.values())
    # (group, sample index): row r takes group r mod groups and sample r mod samples, so folds and classes both vary
    n = min(len(next(iter(g.values()))["samples"]["labels"]) for g in shared)
    picks = [(shared[r % len(shared)], r % n) for r in range(min(rows, len(shared) * n))]
    cols = ["image and mask"] + methods
    fig, axes = plt.subplots(len(picks), len(cols), figsize=(2.2 * len(cols), 2.2 * len(picks)), squeeze=False)
    for row, (g, i) in enumerate(picks):
        first = next(iter(g.values()))["samples"]
        image = first["images"][i].permute(1, 2, 0).numpy()
        mask = first["masks"][i].numpy().astype(bool)
        label = first["classes"][int(first["labels"][i])]
        axes[row, 0].imshow(image)
        axes[row, 0].contour(mask, levels=[0.5], colors="lime", linewidths=1.2)
        axes[row, 0].set_ylabel(label)
        for col, m in enumerate(methods, start=1):
            ax = axes[row, col]
            if m not in g:
                ax.set_visible(False)
                continue
            cam = g[m]["cams"][i].numpy()
            ax.imshow(image)
            ax.imshow(cam, cmap="jet", alpha=0.5, vmin=0, vmax=1)
            ax.contour(mask, levels=[0.5], colors="lime", linewidths=0.8)
            inter, union = np.logical_and(cam > tau, mask).sum(), np.logical_or(cam > tau, mask).sum()
            ax.set_xlabel(f"IoU {inter / max(union, 1):.2f}" + (" (CAM empty)" if cam.max() <= 0 else ""), fontsize=8)
    for col, name in enumerate(cols):
        axes[0, col].set_title(name)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"held-out samples: mask outlined in green, CAM in jet (IoU of CAM > {tau} with the mask)", fontsize=9)
    fig.tight_layout()
    paths = [os.path.join(out, "attention_samples.png")]
    atomic_write(paths[0], lambda f: fig.savefig(f, dpi=100, format="png"))
    plt.close(fig)

    # pixel-wise mean and variance over every sample of each method (pooled over its runs), and over the masks
    stacks = {"masks": torch.cat([r["samples"]["masks"].float() for r in runs if r["method"] == methods[0]])}
    for m in methods:
        stacks[m] = torch.cat([r["cams"] for r in runs if r["method"] == m])
    fig, axes = plt.subplots(2, len(stacks), figsize=(2.4 * len(stacks), 4.6), squeeze=False)
    for col, (name, x) in enumerate(stacks.items()):
        for row, (stat, v) in enumerate((("mean", x.mean(0)), ("variance", x.var(0, unbiased=False)))):
            ax = axes[row, col]
            im = ax.imshow(v.numpy(), cmap="viridis")
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"{name} (n={len(x)})")
            if col == 0:
                ax.set_ylabel(stat)
    fig.suptitle("pixel-wise mean and variance over the held-out samples: masks and each method's CAM", fontsize=9)
    fig.tight_layout()
    paths.append(os.path.join(out, "attention_mean_variance.png"))
    atomic_write(paths[1], lambda f: fig.savefig(f, dpi=100, format="png"))
    plt.close(fig)
    return paths


def check_inputs(args):
    """[(run, model, samples, metrics)] for every run, all checked before any work (the outputs' folders too, so nothing
    fails after the scoring); bad input raises RunError."""
    if not args.runs:
        raise RunError("give one or more run folders of train_dl_camal.py (runs/...)")
    if not 1 <= args.steps <= 1000:  # finer than 0.1 % of the pixels only repeats the same images
        raise RunError(f"--steps must lie in 1 .. 1000, got {args.steps}")
    if args.figure_samples < 1:
        raise RunError(f"--figure-samples must be at least 1, got {args.figure_samples}")
    if args.baseline not in (None, "random"):
        raise RunError(f"--baseline must be random, got {args.baseline!r}")
    if args.fill not in FILLS:
        raise RunError(f"--fill must be one of {', '.join(FILLS)}, got {args.fill!r}")
    if not 0 <= args.seed < 2**31:
        raise RunError(f"--seed must lie in 0 .. 2**31 - 1, got {args.seed}")
    if not 0.0 <= args.tau < 1.0:
        raise RunError(f"--tau must lie in [0, 1), got {args.tau}")
    if args.plot is not None:
        folder = os.path.dirname(os.path.abspath(args.plot))
        if not args.plot or os.path.isdir(args.plot):
            raise RunError(f"--plot {args.plot!r}: give the PNG's path")
        if not os.path.isdir(folder) or unwritable(folder):
            raise RunError(
                f"--plot {args.plot}: "
                + (f"the folder {folder} does not exist" if not os.path.isdir(folder) else unwritable(folder))
            )
    if args.figures is not None and (not args.figures or unwritable(args.figures) or os.path.isfile(args.figures)):
        raise RunError(f"--figures {args.figures!r}: " + (unwritable(args.figures) or "give a folder, not a file"))
    loaded = [(run, *load_run(run)) for run in args.runs]
    for run in args.runs:  # each run gets its faithfulness.json
        if unwritable(run):
            raise RunError(f"{run}: {unwritable(run)}, and its faithfulness.json goes there")
    return loaded


NORMALISE_FLOOR = 0.5  # the normalised AUCs use samples whose p(true) at k=0 is at least this (ratios below 2)
POOLED = ("removal", "insertion", "removal_auc", "insertion_auc", "removal_auc_normalised", "insertion_auc_normalised")


def new_group():
    """A method's pooled per-sample figures over its runs (e.g. its folds); correct and aucs are keyed by sample."""
    return {**{c: [] for c in POOLED}, "start": [], "keys": [], "correct": {}, "aucs": {}}


def pool(group, entries, sample_keys, kind):
    """Add one run's samples (their `kind` curves: attention or random) to a method's group."""
    for e, key in zip(entries, sample_keys):
        for c in POOLED:
            group[c].append(e[kind][c])
        group["start"].append(e["start_probability"])
        group["keys"].append(key)
        group["correct"][key] = e["correct"]
        group["aucs"][key] = (e[kind]["removal_auc"], e[kind]["insertion_auc"])


def correct_by_all(groups):
    """The keys of the samples that every method's model (not the random floors) classifies correctly at k=0."""
    methods = [n for n in groups if "/" not in n]
    return set.intersection(*[{k for k, c in groups[n]["correct"].items() if c} for n in methods]) if methods else set()


def auc_cell(values):
    """'mean +- CI' over the samples, or a plain 'too few samples' where there are fewer than two (no CI from one)."""
    if len(values) < 2:
        return f"too few samples ({len(values)})"
    m, c = mean_ci(values)
    return f"{m:.4f} +- {c:.4f}"


def print_summary(groups):
    """The tables: each method's AUCs with 95 % CIs, as they are, normalised by p(true) at k=0, and over the samples
    every method classifies correctly (each with the number of samples it rests on); then the relative changes between
    methods, as the paper reports them."""
    print(
        f"\n{'method':<16}{'samples':>8}{'wrong at k=0':>13}{'p(true) at k=0':>16}{'removal AUC (lower is better)':>32}"
        f"{'insertion AUC (higher is better)':>34}"
    )
    for name, g in groups.items():
        wrong = sum(not c for c in g["correct"].values())
        row = f"{auc_cell(g['removal_auc']):>32}{auc_cell(g['insertion_auc']):>34}"
        print(f"{name:<16}{len(g['removal_auc']):>8}{wrong:>13}{np.mean(g['start']):>16.3f}{row}")
    print(
        "\nthe same, with each curve divided by the sample's probability at k=0, over the samples where that "
        "probability is at "
        f"least {NORMALISE_FLOOR} (the ratio then stays below {1 / NORMALISE_FLOOR:g}; others are left out)"
    )
    for name, g in groups.items():
        r = [v for v in g["removal_auc_normalised"] if v is not None]
        i = [v for v in g["insertion_auc_normalised"] if v is not None]
        print(f"{name:<16}{len(r):>8}{'':>29}{auc_cell(r):>32}{auc_cell(i):>34}")
    common = correct_by_all(groups)
    print(f"\nover the {len(common)} samples that every method's model classifies correctly at k=0")
    for name, g in groups.items():
        if common:
            r, i = ([g["aucs"][k][j] for k in sorted(common, key=str)] for j in (0, 1))
            print(f"{name:<16}{len(common):>8}{'':>29}{auc_cell(r):>32}{auc_cell(i):>34}")
    for name, g in groups.items():
        if "/" not in name and np.mean(g["start"]) < 0.5:
            print(
                f"warning: {name}'s models give the true class {np.mean(g['start']):.2f} on average before any pixel "
                "is removed: its "
                "removal AUC is low because the model is wrong from the start, not because its attention is faithful. "
                "Compare removal AUCs only between methods whose p(true) at k=0 is alike.",
                file=sys.stderr,
            )
    names = list(groups)
    if len(names) > 1:
        print(
            "\nrelative change of the mean AUC (first against second; the paper: CAMAL -39 % removal, +35.3 % "
            "insertion against Prior)"
        )
        means = {n: (np.mean(groups[n]["removal_auc"]), np.mean(groups[n]["insertion_auc"])) for n in names}
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                dr = 100 * (means[a][0] / means[b][0] - 1)
                di = 100 * (means[a][1] / means[b][1] - 1)
                print(f"  {a} vs {b}: removal {dr:+.1f} %, insertion {di:+.1f} %")


def score_runs(loaded, args, device, groups, figure_runs):
    """Score every run: its faithfulness.json, its samples pooled into its method's group (and the figures' runs)."""
    tie_rng, random_rng = np.random.default_rng([args.seed, 0]), np.random.default_rng([args.seed, 1])
    for run, model, samples, metrics in loaded:
        # one key per held-out sample: runs of different methods on the same fold and seed hold the same samples
        sample_keys = [
            (
                metrics["dataset"],
                metrics.get("split_seed"),
                metrics["fold"],
                metrics["seed"],
                samples.get("per_class", 1),
                i,
            )
            for i in range(len(samples["labels"]))
        ]
        ks, entries, cams = evaluate_run(model.to(device), samples, args, device, tie_rng, random_rng)
        if args.figures:
            figure_runs.append({"method": metrics["method"], "samples": samples, "cams": cams})
        model.to("cpu")  # one model on the device at a time
        result = {
            "run": os.path.basename(os.path.normpath(run)),
            "method": metrics["method"],
            "model": metrics["model"],
            "dataset": metrics["dataset"],
            "fold": metrics["fold"],
            "steps": args.steps,
            "fill": args.fill,
            "per_class": samples.get("per_class", 1),  # which held-out images: runs compared must hold the same
            "k": ks.tolist(),
            "samples": entries,
            "attention": summarise(ks, entries, "attention"),
        }
        if args.baseline == "random":
            result["random"] = summarise(ks, entries, "random")
        write_json(os.path.join(run, "faithfulness.json"), result, indent=2)
        # the random floor is per method: each ranks pixels at random for its own models
        kinds = [("attention", metrics["method"])] + (
            [("random", f"{metrics['method']}/random")] if args.baseline == "random" else []
        )
        for kind, name in kinds:
            pool(groups.setdefault(name, new_group()), entries, sample_keys, kind)
        a = result["attention"]
        tqdm.write(
            f"{run}: removal AUC {a['removal_auc']['mean']:.4f}, insertion AUC {a['insertion_auc']['mean']:.4f} "
            f"over {a['n']} samples (removed pixels: {args.fill}) -> faithfulness.json"
        )
    return ks


if __name__ == "__main__":
    args = tyro.cli(Args)
    try:
        loaded = check_inputs(args)
    except ValueError as e:  # RunError, and RunFileError from a file that cannot be read
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    groups = {}  # method -> pooled per-sample AUCs and curves over its runs (e.g. its folds)
    figure_runs = []
    # a bar over the runs on a terminal (a grid's analysis scores hundreds); each run's line is printed through it
    bar = tqdm(loaded, unit="run", leave=False, dynamic_ncols=True, disable=None)
    try:
        ks = score_runs(bar, args, device, groups, figure_runs)
        print_summary(groups)
        if args.plot:
            plot_curves(args.plot, ks, groups)
            print(f"curves written to {args.plot}")
        if args.figures:
            for path in attention_figures(args.figures, figure_runs, args.figure_samples, args.tau):
                print(f"figure written to {path}")
    except RunFileError as e:  # a disk that filled or a folder made read-only: every faithfulness.json written is whole
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
