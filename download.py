"""Fetch what train_dl_camal.py and regularizer_study.py read: the datasets' official archives, checksum-verified and
unpacked into the layouts their readers read, and torchvision's ImageNet weights into torch.hub's cache.

    python download.py --dataset pets --data-dir DATA                # Oxford-IIIT-Pet (torchvision's archives)
    python download.py --dataset flowers --data-dir DATA             # Oxford-Flower-102 and its segmentations
    python download.py --weights resnet18 vit_b_16                   # ImageNet weights ($TORCH_HOME/hub/checkpoints)

A second call verifies and fetches nothing. BUSI has no stable link: the message says where to get it. --mirror fetches
from another server with the same paths. The trainers call these functions for --download and --pretrained, and
benchmark.py calls this script once per grid before any cell starts (a cluster's nodes may have no network). Bad
input or a failed download: a message and exit code 2.
"""

import argparse
import errno
import os
import pickle
import shutil
import socket
import sys
from contextlib import contextmanager

import torch
import torchvision

MODELS = ("resnet18", "convnext_tiny", "efficientnet_b0", "vit_b_16", "swin_v2_t", "maxvit_t")


class DownloadError(ValueError):
    """A download that failed or a dataset that cannot be fetched; the message says what to do instead."""


FLOWERS_SEGMENTATIONS = ("102segmentations.tgz", "51375996b6c4f367a4b9f4492d7ecef5")
# what each archive puts in the dataset's folder: a tree that has them all (unpacked by hand or by torchvision) is used
ENTRIES = {
    "images.tar.gz": "images",
    "annotations.tar.gz": "annotations",
    "102flowers.tgz": "jpg",
    "imagelabels.mat": "imagelabels.mat",
    "setid.mat": "setid.mat",
    "102segmentations.tgz": "segmim",
}
DOWNLOAD_TIMEOUT = 60  # seconds a server may send nothing before a download fails (urllib has no limit of its own)


def why_failed(e):
    """Why a download failed, in words: the socket timeout (urllib wraps one on connecting in a URLError), or the error
    itself."""
    if isinstance(e, TimeoutError) or isinstance(getattr(e, "reason", None), TimeoutError):
        return f"the server sent nothing for {DOWNLOAD_TIMEOUT} s"
    return first_line(e)


@contextmanager
def timeout_on_sockets(seconds):
    """Sockets made meanwhile (torchvision's and torch.hub's urlopen) fail after `seconds` without a byte."""
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(before)


LAYOUTS = {
    "pets": "DATA/oxford-iiit-pet/images/*.jpg and "
    "DATA/oxford-iiit-pet/annotations/{trainval.txt, test.txt, trimaps/*.png}",
    "flowers": "DATA/flowers-102/jpg/image_*.jpg, DATA/flowers-102/segmim/segmim_*.jpg, "
    "DATA/flowers-102/{imagelabels.mat, setid.mat}",
    "busi": "DATA/Dataset_BUSI_with_GT/{benign, malignant, normal}/*.png with their *_mask.png",
}


BUSI_SOURCE = (
    "BUSI has no stable direct link: get Dataset_BUSI_with_GT from its page "
    "(https://scholar.cu.edu.eg/?q=afahmy/pages/dataset, or a mirror such as Kaggle's "
    "'breast-ultrasound-images-dataset'), unzip it into --data-dir"
)


def dataset_files(dataset):
    """(the dataset's folder under --data-dir, [(url, md5, extract?)]): torchvision's own resources for OxfordIIITPet
    and Flowers102, so the layout is the one torchvision's classes make, plus Flowers' segmentation archive."""
    from torchvision.datasets import Flowers102, OxfordIIITPet

    if dataset == "pets":
        return "oxford-iiit-pet", [(url, md5, True) for url, md5 in OxfordIIITPet._RESOURCES]
    prefix = Flowers102._download_url_prefix
    files = [(prefix + name, md5, name.endswith(".tgz")) for name, md5 in Flowers102._file_dict.values()]
    return "flowers-102", files + [(prefix + FLOWERS_SEGMENTATIONS[0], FLOWERS_SEGMENTATIONS[1], True)]


def mirrored(url, mirror):
    """url on the --download-mirror server (its path kept), or url itself."""
    if not mirror:
        return url
    from urllib.parse import urlsplit, urlunsplit

    m, u = urlsplit(mirror), urlsplit(url)
    return urlunsplit((m.scheme, m.netloc, m.path.rstrip("/") + u.path, u.query, ""))


def fetch(url, folder, name, md5):
    """folder/name from url, checked against md5 with torchvision's own download (progress bar) and check; a whole,
    verified file is not fetched again. A download that fails or does not match its checksum leaves nothing under that
    name."""
    from torchvision.datasets.utils import check_integrity, download_url

    path = os.path.join(folder, name)
    if check_integrity(path, md5):
        print(f"download: {name} is there and matches its checksum", flush=True)
        return path
    part = path + ".part"
    if os.path.lexists(part):  # left by a download that was killed: torchvision would take it for the file
        os.remove(part)
    try:
        print(f"download: {url}", flush=True)
        with timeout_on_sockets(DOWNLOAD_TIMEOUT):
            download_url(url, folder, os.path.basename(part))
        if not check_integrity(part, md5):
            raise DownloadError(
                f"{url} does not match its checksum (md5 {md5}): cut short or corrupt, it was removed; try again"
            )
        os.replace(part, path)
    except DownloadError:
        raise
    except Exception as e:  # no network, a server that drops the connection, a full disk: nothing half-written stays
        raise DownloadError(f"cannot download {url} ({why_failed(e)})") from None
    finally:
        if os.path.lexists(part):
            os.remove(part)
    return path


def download_dataset(dataset, data_dir, mirror=None):
    """Fetch `dataset` into data_dir in the layout its reader reads: every archive checksum-verified, extracted into a
    folder beside the target and moved into place only when whole, then marked done; a second call verifies and fetches
    nothing. BUSI has no stable link: a DownloadError says where to get it. Concurrent calls (a grid's cells) take
    turns."""
    if dataset == "shapes":
        return
    if dataset == "busi":  # put there by hand: nothing to fetch once it is there (its reader checks every file)
        if os.path.isdir(os.path.join(data_dir, "Dataset_BUSI_with_GT")):
            return
        raise DownloadError(f"--download: {BUSI_SOURCE}, so that {LAYOUTS['busi']} exist (DATA is --data-dir)")
    import fcntl

    from torchvision.datasets.utils import check_integrity, extract_archive

    folder, files = dataset_files(dataset)
    root = os.path.join(data_dir, folder)
    cache = os.path.join(root, ".downloads")
    make_folder(cache)
    with open(os.path.join(cache, "lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another cell downloading the same files: wait for it, then find them done
        for url, md5, extract in files:
            name = os.path.basename(url)
            done = os.path.join(root, f".{name}.done")
            archive = os.path.join(cache, name)
            if os.path.isfile(done) and (not os.path.isfile(archive) or check_integrity(archive, md5)):
                verified = " and its archive matches its checksum" if os.path.isfile(archive) else ""
                print(f"download: {name} is in place{verified}", flush=True)
                continue
            entry = os.path.join(root, ENTRIES[name])
            if not os.path.isfile(done) and os.path.exists(entry) and (os.path.isfile(entry) or os.listdir(entry)):
                # unpacked by hand or by torchvision: used as it is (the reader checks every file), so a job script
                # that always passes --download runs offline
                print(f"download: {ENTRIES[name]} is already in {root}: {name} is not fetched", flush=True)
                continue
            left = os.path.join(root, name)  # torchvision's own download keeps its archives there
            try:
                if check_integrity(left, md5):
                    print(f"download: {name} is in {root} (torchvision's) and matches its checksum", flush=True)
                    archive = left
                else:
                    archive = fetch(mirrored(url, mirror), cache, name, md5)
            except DownloadError as e:
                by_hand = f"Without a network, put the files there by hand: {LAYOUTS[dataset]} (DATA is --data-dir)"
                raise DownloadError(f"{e}. {by_hand}") from None
            partial = os.path.join(root, f".{name}.partial")
            shutil.rmtree(partial, ignore_errors=True)
            if extract:
                extract_archive(archive, partial)
            else:
                make_folder(partial)
                shutil.copyfile(archive, os.path.join(partial, name))
            for entry in sorted(os.listdir(partial)):  # into place only when whole; a half-moved attempt is replaced
                target = os.path.join(root, entry)
                if os.path.isdir(target) and not os.path.islink(target):
                    shutil.rmtree(target)
                elif os.path.lexists(target):
                    os.remove(target)
                os.replace(os.path.join(partial, entry), target)
            os.rmdir(partial)
            atomic_write(done, lambda f: f.write(md5.encode()))
    print(f"download: {dataset} is in {root} ({LAYOUTS[dataset].replace('DATA', data_dir)})", flush=True)


WEIGHTS = {
    "resnet18": "ResNet18_Weights",
    "convnext_tiny": "ConvNeXt_Tiny_Weights",
    "efficientnet_b0": "EfficientNet_B0_Weights",
    "vit_b_16": "ViT_B_16_Weights",
    "swin_v2_t": "Swin_V2_T_Weights",
    "maxvit_t": "MaxVit_T_Weights",
}


def weights_url(name):
    """torchvision's URL of the ImageNet weights of `name` (its file name carries the start of its sha256, which
    torch.hub checks)."""
    return getattr(torchvision.models, WEIGHTS[name]).IMAGENET1K_V1.url


def imagenet_state_dict(name, weights_path, mirror=None):
    """ImageNet weights from --weights, or torchvision's own file in torch's hub cache ($TORCH_HOME/hub/checkpoints),
    downloaded there through torch.hub (its progress bar and its check of the file's hash) when it is missing; offline,
    a message naming the file, its URL and the cache path."""
    source = weights_url(name)
    filename = os.path.basename(source)
    path = weights_path or os.path.join(torch.hub.get_dir(), "checkpoints", filename)
    if weights_path is None and not os.path.isfile(path):
        url = mirrored(source, mirror)
        print(f"ImageNet weights for {name}: downloading {url} into {os.path.dirname(path)}", flush=True)
        try:
            folder = os.path.dirname(path)
            with timeout_on_sockets(DOWNLOAD_TIMEOUT):
                torch.hub.load_state_dict_from_url(
                    url, model_dir=folder, file_name=filename, check_hash=True, weights_only=True
                )
        except Exception as e:  # no network, a dropped connection, a hash that does not match: torch.hub leaves no file
            raise RunFileError(
                f"cannot download the ImageNet weights of {name} ({why_failed(e)}): put {filename} (from {source}) at "
                f"{path}, or pass --weights PATH, or train from scratch with --no-pretrained"
            ) from None
    state = read_torch(path)
    model = getattr(torchvision.models, name)(weights=None)
    try:
        model.load_state_dict(state)
    except Exception as e:  # another model's weights, or not a state dict at all
        why = state_mismatch(model.state_dict(), state) or first_line(e)
        raise RunFileError(f"{path} is not ImageNet weights of {name}: {why}") from None
    return state


def state_mismatch(expected, got):
    """How a state dict differs from a model's (torch's own message puts that on its later lines), or None."""
    if not isinstance(got, dict):
        return f"it holds a {type(got).__name__}, not a state dict"

    def shape(t):
        return " x ".join(str(n) for n in t.shape) if hasattr(t, "shape") else type(t).__name__

    missing = [k for k in expected if k not in got]
    extra = [k for k in got if k not in expected]
    other = [k for k in expected if k in got and shape(got[k]) != shape(expected[k])]
    parts = [f"{len(missing)} of {len(expected)} tensors missing (e.g. {missing[0]})"] if missing else []
    if extra:
        parts.append(f"{len(extra)} tensors the model does not have (e.g. {extra[0]})")
    if other:
        k = other[0]
        example = f"{k}: {shape(got[k])} in the file, {shape(expected[k])} wanted"
        parts.append(f"{len(other)} of another shape (e.g. {example})")
    return "; ".join(parts) or None


# Files: copied unchanged from ppo_camal_vizdoom.py; tests/test_shared_helpers.py keeps the copies identical.
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


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    p.add_argument("--dataset", choices=["pets", "flowers", "busi"], help="the dataset to fetch into --data-dir")
    p.add_argument("--data-dir", help="the folder that gets the dataset's own folder (oxford-iiit-pet/, flowers-102/)")
    p.add_argument("--weights", nargs="+", choices=MODELS, default=[], help="models whose ImageNet weights to fetch")
    p.add_argument("--mirror", help="fetch from this server instead of the files' own (the same paths)")
    args = p.parse_args(argv)
    if args.dataset is None and not args.weights:
        p.error("give --dataset (with --data-dir) or --weights, or both")
    if args.dataset is not None and args.data_dir is None:
        p.error("--dataset needs --data-dir, the folder to put it in")
    try:
        if args.dataset is not None:
            download_dataset(args.dataset, args.data_dir, args.mirror)
        for name in dict.fromkeys(args.weights):
            imagenet_state_dict(name, None, args.mirror)
            print(f"download: the ImageNet weights of {name} are in {torch.hub.get_dir()}/checkpoints", flush=True)
    except ValueError as e:  # DownloadError and RunFileError: said, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
