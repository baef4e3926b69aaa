# The paper's statistical analysis (Appendix A) of a runs/ folder. DL runs of train_dl_camal.py: folds paired
# between CAMAL and each baseline, one-tailed Wilcoxon signed-rank tests, 95 % CIs, and eval_faithfulness.py's AUCs.
# DRL runs of ppo_camal_vizdoom.py: score matrices (runs x environments), rliable's stratified bootstrap CIs of the
# mean and its probability of improvement. Reads only run folders. Single-file in CleanRL's style.
import csv
import errno
import io
import json
import math
import os
import shutil
import sys
import warnings
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import List, Literal, Optional

import numpy as np
import scipy.stats
import tyro


@dataclass
class Args:
    paths: tyro.conf.Positional[List[str]]
    """folders searched (recursively) for run folders of train_dl_camal.py and ppo_camal_vizdoom.py"""
    out: Optional[str] = None
    """also write stats.json (every number), one CSV per table and the PNG figures to this folder"""
    reps: int = 50000
    """bootstrap resamples of rliable's SBCI and probability of improvement (the paper: 50,000)"""
    seed: int = 0
    """numpy's global generator is seeded with this before every rliable estimate, so the numbers repeat"""
    drl_score: Literal["eval", "training"] = "eval"
    """DRL runs are scored from eval.json (the trained policy's evaluation episodes; a run without one is left out) or,
    with training, from the mean of the last --last-n TensorBoard values of every run: never a mix of the two"""
    last_n: int = 10
    """with --drl-score training, a DRL run's score is the mean of its last this-many TensorBoard values"""
    include_unfinished: bool = False
    """with --drl-score training, also score runs that stopped short of their steps (from their curves up to their
    checkpoint, so a killed attempt's events past it never count), each named under Warnings; by default they are listed
    and left out"""
    significance: float = 0.05
    """Wilcoxon p below this is significant (the paper: 0.05)"""
    curve_points: int = 100
    """points on each environment's common step grid of the learning curves"""


BASELINES = ("vanilla", "prior", "suppress")
METHOD_NAMES = {"camal": "CAMAL", "vanilla": "Vanilla", "prior": "Prior", "suppress": "Supp. only"}
DATASET_NAMES = {"busi": "BUSI", "pets": "Oxford-IIIT-Pet", "flowers": "Oxford-Flower", "shapes": "Shapes"}
MODEL_NAMES = {
    "resnet18": "ResNet",
    "convnext_tiny": "ConvNeXt",
    "efficientnet_b0": "EfficientNet",
    "vit_b_16": "ViT",
    "swin_v2_t": "Swin",
    "maxvit_t": "MaxViT",
}
ENV_ORDER = ("Basic", "DefendLine", "DefendCenter", "TakeCover")
DL_METRICS = {"test_accuracy": "Test accuracy", "test_iou": "Test IoU"}
PAPER_TABLE = {
    ("test_iou", "prior"): "Table 1",
    ("test_accuracy", "vanilla"): "Table 2",
    ("test_accuracy", "prior"): "Table 3",
    ("test_iou", "vanilla"): "Table 5",
}
DRL_METRICS = {"return": ("charts/episodic_return", "Figure 6"), "iou": ("charts/attention_iou", "Figure 4")}
DL_KEYS = {"dataset", "model", "method", "fold", "folds", "seed", "split_seed", "test_accuracy", "test_iou"}
DRL_KEYS = {"env", "method", "seed", "mean_return", "mean_iou"}
# What defines an experiment: every setting a run records, except the ones below, which cannot change its result (where
# inputs are read from and outputs written, the device, tracking, what is logged, checkpoint cadence), and the run's
# place in the grid (CELL). Runs that differ in a setting are never paired, pooled or taken for duplicates.
NOT_SETTINGS = {
    "exp_name",
    "cuda",
    "track",
    "wandb_project_name",
    "wandb_entity",
    "resume",
    "checkpoint_every",
    "collapse_patience",
    "faithfulness_per_class",  # DL: how many held-out images eval_faithfulness.py gets, not how the model trains
    "num_workers",  # DL: DataLoader processes
    "data_dir",  # DL: the same data and ImageNet weights at another path are the same experiment
    "weights",
    "prior_cache",
    "capture_video",  # DRL: outputs
    "save_model",
    "image_every",
    "eval_episodes",
    "vector_env",  # DRL: the games step in worker processes or in the learner's; the same steps either way
    # DRL: the frame stack kept where the model runs or by the games; the same agent (tests/test_frame_stack.py)
    "frame_stack_on",
    "figure",
    "figure_frames",
    "figure_out",
}
# split_seed: which k-fold split, a replicate like the fold and the seed (runs of several split seeds pair per split)
CELL = {"dataset", "model", "method", "fold", "seed", "split_seed", "env"}
# Settings only the runs of these methods carry (vanilla has no camal_coef to match); they tell experiments of one
# method apart.
METHOD_SETTINGS = {
    "camal": ("camal_coef",),
    "suppress": ("camal_coef",),
    "prior": ("camal_coef", "prior_model", "prior_weights", "prior_pretrained", "prior_threshold"),
}
METHOD_ONLY = {k for keys in METHOD_SETTINGS.values() for k in keys}
# metrics.json written before it held every setting ("args"): its top-level ones
OLD_DL_SETTINGS = ("folds", "split_seed", "epochs", "image_size", "tau", "camal_coef")


def freeze(v):
    """A setting as a hashable value (a list becomes a tuple), so every recorded setting can key an experiment."""
    if isinstance(v, (list, tuple)):
        return tuple(freeze(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((str(k), freeze(x)) for k, x in v.items()))
    return v


def recorded_settings(saved, method):
    """The settings of a run's experiment: every one recorded but NOT_SETTINGS, its cell and other methods' own."""
    out = {k: freeze(v) for k, v in saved.items() if k not in NOT_SETTINGS and k not in CELL and k not in METHOD_ONLY}
    out.update({k: freeze(saved.get(k)) for k in METHOD_SETTINGS.get(method, ())})
    return out


def setting_names(runs):
    """Every setting the runs record, but the method-only ones: what tells their experiments apart."""
    return sorted({k for r in runs for k in r["settings"]} - METHOD_ONLY)


class StatsError(ValueError):
    """Input that cannot be analysed; the message says why."""


def order(value, known):
    """Sort key: the paper's order first, anything else alphabetically after it."""
    return (known.index(value), "") if value in known else (len(known), str(value))


def method_name(m):
    return METHOD_NAMES.get(m, m)


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------
# copied unchanged from eval_faithfulness.py (tests/test_shared_helpers.py checks)
def mean_ci(values):
    """Mean and the half-width of its 95 % confidence interval (1.96 standard errors)."""
    v = np.asarray(values, dtype=np.float64)
    se = v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float("nan")
    return float(v.mean()), float(1.96 * se)


def describe(values):
    """n, mean, standard deviation (ddof=1) and the 95 % CI (mean +- 1.96 SE) of a list of numbers."""
    if not len(values):
        return {"n": 0, "mean": float("nan"), "std": float("nan"), "ci95": [float("nan")] * 2, "values": []}
    mean, half = mean_ci(values)
    std = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
    return {
        "n": len(values),
        "mean": mean,
        "std": std,
        "ci95": [mean - half, mean + half],
        "values": [float(v) for v in values],
    }


def wilcoxon_greater(x, y, significance):
    """One-tailed Wilcoxon signed-rank test of H1: x > y over paired values (scipy, on the differences), and the paper's
    verdict. The differences are rounded to 1e-9 first: scores such as accuracies are ratios of counts, and 17/20 -
    16/20 and 15/20 - 14/20 differ in their last bits, which would rank a tie as two different values. Fewer than two
    pairs cannot be tested: the verdict says so, with no p."""
    d = np.round(np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64), 9)
    higher = float(np.mean(x)) > float(np.mean(y))
    n = int(np.count_nonzero(d))  # zero differences are dropped (zero_method="wilcox")
    if len(d) < 2:
        return {"r_plus": None, "T": None, "nonzero_pairs": n, "p": None, "verdict": "too few pairs to test"}
    with warnings.catch_warnings():  # all-zero differences: scipy warns and returns p = 1
        warnings.simplefilter("ignore", RuntimeWarning)
        res = scipy.stats.wilcoxon(d, alternative="greater")
    r_plus = float(res.statistic)
    p = float(res.pvalue)
    verdict = "significant" if higher and p < significance else "higher, not significant" if higher else "not higher"
    return {
        "r_plus": r_plus,
        "T": min(r_plus, n * (n + 1) / 2 - r_plus),
        "nonzero_pairs": n,
        "p": p,
        "verdict": verdict,
    }


def clean(obj):
    """JSON without NaN or infinity (neither is valid JSON): both become null (an overflow is named under Warnings)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, np.generic):
        return clean(obj.item())
    return obj


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------
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


NUMBER, TEXT, INTEGER = "a finite number of at most 1e15 in size", "a string", "a whole number below 2**31"
FRACTION = "a number in [0, 1]"  # IoU, accuracy, shares: a value outside was not written by a trainer


def finite_number(v, bound=1e15):
    """A JSON number (not a bool) that a mean over many runs cannot overflow; 10**400 is one Python reads."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return abs(float(v)) <= bound
    except OverflowError:
        return False


def check_types(path, obj, spec):
    """StatsError naming the file and the field when a value has the wrong type (a number where text is due, say)."""
    for key, (kind, nullable) in spec.items():
        v = obj.get(key)
        ok = (
            (v is None and nullable)
            or (kind == TEXT and isinstance(v, str))
            or (kind == NUMBER and finite_number(v))
            or (kind == FRACTION and finite_number(v) and 0 <= v <= 1)
            or (kind == INTEGER and isinstance(v, int) and not isinstance(v, bool) and abs(v) < 2**31)
        )
        if not ok:
            raise StatsError(f"{path}: {key} is {v!r}, expected {kind}" + (" or null" if nullable else ""))


DL_TYPES = {
    "dataset": (TEXT, False),
    "model": (TEXT, False),
    "method": (TEXT, False),
    "fold": (INTEGER, False),
    "folds": (INTEGER, False),
    "seed": (INTEGER, False),
    "split_seed": (INTEGER, False),
    "test_accuracy": (FRACTION, True),
    "test_iou": (FRACTION, True),
}
DRL_TYPES = {
    "env": (TEXT, False),
    "method": (TEXT, False),
    "seed": (INTEGER, False),
    "mean_return": (NUMBER, False),
    "mean_iou": (FRACTION, True),
}

BY_CAM_TYPES = {"mean_iou": (FRACTION, True), "cam_empty_fraction": (FRACTION, False)}


def check_by_cam(path, by_cam):
    """eval.json's by_cam (the policy's IoU under every --cam), checked; {} for an eval.json written before it
    existed."""
    if by_cam is None:
        return {}
    if not isinstance(by_cam, dict) or not all(isinstance(v, dict) for v in by_cam.values()):
        raise StatsError(f"{path}: by_cam is {by_cam!r}, expected an object of objects")
    for cam, v in by_cam.items():
        check_types(f"{path} (by_cam {cam})", v, BY_CAM_TYPES)
    return by_cam


def baselines_per_cam(runs):
    """Vanilla PPO trains without a CAM, and its eval.json measures the trained policy's attention under every --cam
    (by_cam): a vanilla run is the baseline of each CAMAL formulation of its task, scored under that formulation's CAM.
    Each run comes back once per --cam that the other methods' runs of its task use (its own when none does); a copy
    under another CAM than the run's own has no IoU curve (training measured only its own)."""

    def task(r):
        return {k: v for k, v in r["settings"].items() if k != "cam" and k not in METHOD_ONLY and v is not None}

    def same_task(a, b):  # a setting one run does not record (written before it existed) is no evidence of another task
        return a["env"] == b["env"] and all(task(b).get(k, v) == v for k, v in task(a).items())

    camal_runs = [r for r in runs if r["method"] != "vanilla"]
    out = []
    for r in runs:
        own, by_cam = r["settings"].get("cam"), r.get("by_cam") or {}
        cams = {o["settings"].get("cam") for o in camal_runs if same_task(r, o)} if r["method"] == "vanilla" else set()
        placed = [c for c in sorted(cams, key=str) if c == own or c in by_cam]
        for cam in placed or [own]:
            if cam == own:
                out.append(r)
                continue
            score = by_cam[cam]
            out.append(
                dict(
                    r,
                    settings=dict(r["settings"], cam=cam),
                    iou=score["mean_iou"],
                    cam_empty=score["cam_empty_fraction"],
                    iou_curve=False,
                    source=f"{r['source']}; IoU under --cam {cam} (eval.json's by_cam; the run's own is {own})",
                )
            )
    return out


def load_json(path):
    """read_json, failing as a StatsError: one kind of error for every input the analysis cannot use."""
    try:
        return read_json(path)
    except RunFileError as e:
        raise StatsError(str(e)) from None


# what changes a run's numbers (the analysis' own scipy and rliable are this process's: report() names them)
NUMBER_PACKAGES = ("torch", "torchvision", "vizdoom", "gymnasium", "numpy")


def run_environment(run_dir, warnings_):
    """{package: sorted versions} a run was trained with, from the environment.json its trainer wrote (one entry per
    start or resume), with "code": its commits, whether a checkout had uncommitted changes, and whether an earlier
    record was lost; None for a run that records none (made before the record existed)."""
    path = os.path.join(run_dir, "environment.json")
    if not os.path.isfile(path):
        return None
    try:
        entries = read_json(path, kind=list)
        versions = {
            p: sorted({str(e["packages"][p]) for e in entries if e["packages"].get(p)}) for p in NUMBER_PACKAGES
        }
        gits = [e.get("git") for e in entries]
        code = {
            "commits": sorted({g["commit"] for g in gits if g and isinstance(g.get("commit"), str)}),
            "dirty": any(g and g.get("dirty") is True for g in gits),
            "lost": any(e.get("earlier_record_lost") is True for e in entries),
        }
    except (RunFileError, KeyError, TypeError, AttributeError) as e:
        warnings_.append(
            {
                "run": run_dir,
                "reason": f"its environment.json cannot be used ({first_line(e) or type(e).__name__}): its versions "
                "are not compared",
            }
        )
        return None
    return {**{p: v for p, v in versions.items() if v}, "code": code}


def version_warnings(dl_runs, drl_runs, warnings_):
    """A warning per table whose runs were trained with different versions of a package that changes the numbers, or
    by different commits of the code, or by a checkout with uncommitted changes (whose code is on no record), or whose
    record of an earlier part was lost."""
    tables = {}
    for r in dl_runs:
        tables.setdefault(f"{r['dataset']}", []).append(r)
    for r in drl_runs:
        tables.setdefault(f"{r.get('task', r['env'])}", []).append(r)
    for name, runs in sorted(tables.items()):
        recorded = [r for r in runs if r.get("environment") is not None]
        for package in NUMBER_PACKAGES:
            counts = {}
            for r in recorded:
                for v in r["environment"].get(package, []):
                    counts[v] = counts.get(v, 0) + 1
            if len(counts) > 1:
                found = ", ".join(f"{v} ({n} runs)" for v, n in sorted(counts.items()))
                warnings_.append(
                    {
                        "run": name,
                        "reason": f"its runs were trained with different {package} versions: {found}; "
                        "a difference between methods may partly be one between versions (each run's environment.json)",
                    }
                )
        code = [r["environment"]["code"] for r in recorded if "code" in r["environment"]]
        commits = sorted({c for k in code for c in k["commits"]})
        if len(commits) > 1:
            spans, shown = sum(len(k["commits"]) > 1 for k in code), ", ".join(c[:8] for c in commits)
            across = f"; {spans} of them resumed under another commit than they started with" if spans else ""
            warnings_.append(
                {
                    "run": name,
                    "reason": f"its runs come from {len(commits)} commits of the code ({shown})"
                    f"{across}: a code change between them may change the numbers (the trainers' golden runs, "
                    "tests/test_golden.py, say whether one did)",
                }
            )
        for what, why in (
            ("dirty", "a checkout with uncommitted changes: the code that made them is on no record"),
            ("lost", "a damaged environment.json: the record of the code that made their earlier part is lost"),
        ):
            n = sum(k[what] for k in code)
            if n:
                warnings_.append({"run": name, "reason": f"{n} of its runs were trained from {why}"})


def package_version(name):
    """The installed version of a distribution, or None where it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def analysis_environment():
    """The versions this analysis computes with: scipy's Wilcoxon p-values and rliable's bootstrap depend on them."""
    return {"python": sys.version.split()[0], **{name: package_version(name) for name in ("scipy", "rliable", "numpy")}}


def read_tensorboard(run_dir):
    """TensorBoard's own loader over every event file of a run (it applies a resumed run's purge_step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    guidance = {"scalars": 0, "tensors": 0, "images": 1, "audio": 1, "histograms": 1, "compressedHistograms": 1}
    acc = EventAccumulator(run_dir, size_guidance=guidance)  # 0 keeps every scalar (the default samples 10,000)
    acc.Reload()
    return acc


def scalar_series(acc, tag):
    if tag not in acc.Tags()["scalars"]:
        return np.empty(0), np.empty(0)
    events = acc.Scalars(tag)
    return np.array([e.step for e in events], dtype=np.float64), np.array([e.value for e in events], dtype=np.float64)


def hyperparameters(acc):
    """The |param|value| table both training scripts write as text at the start of a run."""
    tag = "hyperparameters/text_summary"
    if tag not in acc.Tags()["tensors"]:
        return {}
    text = acc.Tensors(tag)[0].tensor_proto.string_val[0].decode()
    rows = [line.strip().strip("|").split("|", 1) for line in text.splitlines()[2:]]
    return {r[0]: r[1] for r in rows if len(r) == 2}


def find_runs(paths, drl_score, last_n, include_unfinished=False, warnings_=None):
    """Every run folder under the paths: DL runs (metrics.json), DRL runs (scored from eval.json or from TensorBoard, as
    drl_score says), the DRL runs left out (unfinished, or no eval.json), and the folders that cannot be used."""
    dl, drl, left_out, skipped = [], [], [], []
    for root in paths:
        if not os.path.isdir(root):
            raise StatsError(f"{root} " + ("is not a folder" if os.path.exists(root) else "does not exist"))

        def unreadable(e):
            skipped.append({"run": e.filename, "reason": f"cannot be read ({e.strerror}): any runs in it are not used"})

        for d, subdirs, files in os.walk(root, onerror=unreadable):
            subdirs.sort()
            events = sorted(f for f in files if f.startswith("events.out.tfevents."))
            if "metrics.json" in files:
                path = os.path.join(d, "metrics.json")
                m = load_json(path)
                if not isinstance(m, dict) or DL_KEYS - set(m):
                    raise StatsError(f"{path} is not a metrics.json of train_dl_camal.py (it needs {sorted(DL_KEYS)})")
                check_types(path, m, DL_TYPES)
                run = dict(m, dir=d, mtime=os.path.getmtime(path))
                saved = m["args"] if isinstance(m.get("args"), dict) else {k: m[k] for k in OLD_DL_SETTINGS if k in m}
                run["settings"] = recorded_settings(saved, m["method"])
                faith = os.path.join(d, "faithfulness.json")
                run["faithfulness"] = faith if os.path.isfile(faith) else None
                dl.append(run)
            elif "eval.json" in files and drl_score == "eval":
                path = os.path.join(d, "eval.json")
                e = load_json(path)
                if not isinstance(e, dict) or DRL_KEYS - set(e):
                    raise StatsError(
                        f"{path} is not an eval.json of ppo_camal_vizdoom.py (it needs {sorted(DRL_KEYS)})"
                    )
                check_types(path, e, DRL_TYPES)
                saved = load_json(os.path.join(d, "args.json")) if "args.json" in files else {}
                drl.append(
                    {
                        "dir": d,
                        "env": e["env"],
                        "method": e["method"],
                        "seed": e["seed"],
                        "mtime": os.path.getmtime(path),
                        "total_timesteps": saved.get("total_timesteps"),
                        "steps_done": e.get("total_timesteps"),
                        # eval.json records cam, tau, camal_coef and reward_scale (its total_timesteps is the steps
                        # done, not the plan)
                        "settings": recorded_settings(
                            {**{k: e[k] for k in ("cam", "tau", "camal_coef", "reward_scale") if k in e}, **saved},
                            e["method"],
                        ),
                        "return": e["mean_return"],
                        "iou": e["mean_iou"],
                        "cam_empty": e.get("cam_empty_fraction"),
                        "by_cam": check_by_cam(path, e.get("by_cam")),
                        "source": f"eval.json ({len(e.get('episodic_returns', []))} evaluation episodes)",
                    }
                )
            elif "eval.json" in files and not events:
                left_out.append(
                    {"run": d, "reason": "eval.json but no TensorBoard events: --drl-score training cannot score it"}
                )
            elif events:
                acc = read_tensorboard(d)
                hp = hyperparameters(acc)
                if {"env", "method", "seed"} <= set(hp):
                    run = tensorboard_run(d, acc, hp, last_n, max(os.path.getmtime(os.path.join(d, f)) for f in events))
                    if run["unfinished"] and include_unfinished and drl_score == "training":
                        warnings_.append(
                            {
                                "run": d,
                                "reason": f"unfinished, scored anyway (--include-unfinished): {run['unfinished']}",
                            }
                        )
                        drl.append(run)
                    elif run["unfinished"]:
                        left_out.append(
                            {
                                "run": d,
                                "reason": f"unfinished: {run['unfinished']}; not scored (finish it with python "
                                f"ppo_camal_vizdoom.py --resume {d})",
                            }
                        )
                    elif drl_score == "eval" and "eval.json" not in files:
                        left_out.append(
                            {
                                "run": d,
                                "reason": "finished without eval.json (--eval-episodes 0): not scored; "
                                "--drl-score training scores every run from its training curves",
                            }
                        )
                    else:
                        drl.append(run)
                elif "dataset" in hp:
                    skipped.append(
                        {"run": d, "reason": "train_dl_camal.py run without metrics.json (unfinished?): not used"}
                    )
                else:
                    skipped.append({"run": d, "reason": "TensorBoard events of neither training script: not used"})
    return dl, drl, left_out, skipped


def hp_value(text):
    """A value of the hyperparameters table, written with str(): numbers and booleans back to their types."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"True": True, "False": False, "None": None}.get(text, text)


def tensorboard_run(d, acc, hp, last_n, mtime):
    """A DRL run scored from its training curves: the mean of the last `last_n` values of each. `unfinished` says why
    the run has not reached its planned steps (None when it has)."""
    hp = {k: hp_value(v) for k, v in hp.items()}
    run = {
        "dir": d,
        "env": hp["env"],
        "method": hp["method"],
        "seed": int(hp["seed"]),
        "mtime": mtime,
        "acc": acc,  # kept for the curves
        "total_timesteps": hp.get("total_timesteps"),
        "settings": recorded_settings(hp, hp["method"]),
    }
    sps_steps = scalar_series(acc, "charts/SPS")[0]  # one value per iteration
    run["steps_done"] = int(sps_steps[-1]) if len(sps_steps) else 0
    run["unfinished"] = None
    batch, total = hp.get("batch_size"), hp.get("total_timesteps")
    if isinstance(batch, int) and isinstance(total, int) and batch > 0 and run["steps_done"] < total // batch * batch:
        run["unfinished"] = f"its curves reach step {run['steps_done']} of {total // batch * batch}"
        ckpt = os.path.join(d, "checkpoint.json")
        if os.path.isfile(ckpt):  # a resume starts there: what was logged after it is redone, not kept
            step = load_json(ckpt).get("global_step")
            run["unfinished"] += f", its checkpoint step {step} (what was logged after it will be redone)"
            if isinstance(step, int):
                run["checkpoint_step"] = step
    cut = run.get("checkpoint_step") if run["unfinished"] else None
    parts = []
    for metric, (tag, _) in DRL_METRICS.items():
        steps, values = scalar_series(acc, tag)
        steps, values = until(
            (steps, values), cut
        )  # an unfinished run: what it logged after its checkpoint is redone on --resume
        tail = values[-last_n:]
        run[metric] = float(tail.mean()) if len(tail) else None
        parts.append(
            f"last {len(tail)} of {len(values)} {tag}" + (f" (to step {int(steps[-1])})" if len(steps) else "")
        )
    tail = scalar_series(acc, "charts/cam_empty_fraction")[1][-last_n:]
    run["cam_empty"] = float(tail.mean()) if len(tail) else None
    run["source"] = "TensorBoard: mean of the " + ", ".join(parts)
    return run


def newest(runs, key, label, incomplete):
    """One run per key, the newest; older runs of the same key are listed as unused: duplicates, or runs of another
    experiment of this method (another camal_coef, say), which belong in a folder of their own."""
    chosen = {}
    for r in sorted(runs, key=lambda r: (r["mtime"], r["dir"])):
        k = key(r)
        if k in chosen:
            other = same_experiment(chosen[k], r)
            what = (
                f"another experiment ({other}) than the newer {r['dir']}, which is used; analyse them from separate "
                "folders"
                if other
                else f"duplicate {label(k)}; the newer {r['dir']} is used"
            )
            incomplete.append({"run": chosen[k]["dir"], "reason": what})
        chosen[k] = r
    return chosen


# ---------------------------------------------------------------------------------------------
# DL: folds paired between CAMAL and each baseline (Tables 1, 2, 3 and 5; Figure 5)
# ---------------------------------------------------------------------------------------------
def fold_label(k):
    folds, split_seed, fold, seed = k
    return f"fold {fold} of {folds} (split seed {split_seed}), seed {seed}"


def shared_settings(r, names):
    return tuple((k, r["settings"].get(k)) for k in names)


def variants(runs, where, names, key=lambda r: r["dir"]):
    """A label per run (by `key`) naming the settings in which its experiment differs from the others at the same place
    ("" where there is only one experiment): e.g. "epochs 20, shapes_per_class 120"."""
    sigs = {}
    for r in runs:
        sigs.setdefault(where(r), set()).add(shared_settings(r, names))
    labels = {}
    for r in runs:
        group = sigs[where(r)]
        # None: a run written before the setting was recorded; unknown is no evidence of another experiment
        differ = [k for k in names if len({dict(sig).get(k) for sig in group} - {None}) > 1]
        labels[key(r)] = ", ".join(f"{k} {r['settings'].get(k)}" for k in differ)
    return labels


def same_experiment(old, new):
    """Why two runs of one cell are two experiments (differing method settings), or None for a true duplicate."""
    diff = [
        f"{k} {old['settings'].get(k)} vs {new['settings'].get(k)}"
        for k in METHOD_SETTINGS.get(new["method"], ())
        if old["settings"].get(k) != new["settings"].get(k)
    ]
    return ", ".join(diff) or None


def dl_analysis(runs, args, incomplete, warnings_):
    label = variants(runs, lambda r: (r["dataset"], r["model"]), setting_names(runs))
    groups = {}
    for r in runs:
        groups.setdefault((r["dataset"], r["model"], label[r["dir"]]), {}).setdefault(r["method"], []).append(r)
    keys = sorted(groups, key=lambda g: (order(g[0], tuple(DATASET_NAMES)), order(g[1], tuple(MODEL_NAMES)), g[2]))
    summary, comparisons = [], []
    for ds, model, variant in keys:
        methods = {}
        where = f"{ds}/{model}" + (f" [{variant}]" if variant else "")
        for m in sorted(groups[ds, model, variant], key=lambda m: order(m, tuple(METHOD_NAMES))):
            methods[m] = newest(
                groups[ds, model, variant][m],
                lambda r: (r["folds"], r["split_seed"], r["fold"], r["seed"]),
                lambda k, m=m: f"{where}/{m} run for {fold_label(k)}",
                incomplete,
            )
            rs = list(methods[m].values())
            summary.append(
                {
                    "dataset": ds,
                    "model": model,
                    "variant": variant,
                    "method": m,
                    "runs": len(rs),
                    **{metric: describe([r[metric] for r in rs if r[metric] is not None]) for metric in DL_METRICS},
                }
            )
        if "camal" not in methods:
            incomplete.append({"run": where, "reason": f"{', '.join(methods)} runs but no camal run to compare with"})
            continue
        cam = methods["camal"]
        for base in BASELINES:
            if base not in methods:
                continue
            other = methods[base]
            for k in sorted(set(cam) - set(other)):
                incomplete.append(
                    {"run": cam[k]["dir"], "reason": f"no {base} run for {fold_label(k)}: left out of camal vs {base}"}
                )
            for k in sorted(set(other) - set(cam)):
                incomplete.append(
                    {"run": other[k]["dir"], "reason": f"no camal run for {fold_label(k)}: left out of camal vs {base}"}
                )
            paired = sorted(set(cam) & set(other))
            if not paired:
                continue
            comp = {
                "dataset": ds,
                "model": model,
                "variant": variant,
                "baseline": base,
                "pairs": [{"fold": k[2], "seed": k[3], "camal": cam[k]["dir"], base: other[k]["dir"]} for k in paired],
            }
            for metric in DL_METRICS:
                usable = [k for k in paired if cam[k][metric] is not None and other[k][metric] is not None]
                for k in sorted(set(paired) - set(usable)):
                    incomplete.append(
                        {"run": cam[k]["dir"], "reason": f"{metric} is null in one run of the pair for {fold_label(k)}"}
                    )
                if usable:
                    x, y = [cam[k][metric] for k in usable], [other[k][metric] for k in usable]
                    comp[metric] = {
                        "camal": describe(x),
                        base: describe(y),
                        "wilcoxon": wilcoxon_greater(x, y, args.significance),
                    }
            comp["faithfulness"] = faithfulness_pairs(cam, other, paired, base, incomplete)
            comparisons.append(comp)
    return summary, comparisons


def faithfulness_pairs(cam, other, paired, base, incomplete):
    """eval_faithfulness.py's per-sample AUCs and curves, pooled over the pairs where both runs have them."""
    have = [k for k in paired if cam[k]["faithfulness"] and other[k]["faithfulness"]]
    if not have:
        return None
    for k in paired:
        if k not in have:
            lacking = [r["dir"] for r in (cam[k], other[k]) if not r["faithfulness"]]
            incomplete.append(
                {
                    "run": ", ".join(lacking),
                    "reason": f"no faithfulness.json: {fold_label(k)} left out of the faithfulness of camal vs {base}",
                }
            )
    files = {}
    for k in have:
        for r in (cam[k], other[k]):
            files[r["faithfulness"]] = load_json(r["faithfulness"])
            check_faithfulness(r["faithfulness"], files[r["faithfulness"]])
        # a pair's two runs scored on the same held-out images, or their mean AUCs are not comparable
        drawn = {r["faithfulness"]: files[r["faithfulness"]].get("per_class", 1) for r in (cam[k], other[k])}
        if len(set(drawn.values())) > 1:
            raise StatsError(
                f"{fold_label(k)}: the camal and {base} runs' faithfulness samples were drawn differently ("
                + ", ".join(f"--faithfulness-per-class {n} in {path}" for path, n in drawn.items())
                + "): train both with the same --faithfulness-per-class"
            )
    pooled, grid, fills = {}, None, {}
    for name, runs in (("camal", cam), (base, other)):
        for k in have:
            f = files[runs[k]["faithfulness"]]
            fill = str(f.get("fill", "zero"))  # files from before --fill: zero
            fills.setdefault(fill, runs[k]["faithfulness"])
            same_fill(fills)
            grid = f["k"] if grid is None else grid  # both methods on one grid, so their curves plot together
            pool = pooled.setdefault(name, {"k": grid, "fill": fill})
            samples = f["samples"]
            keys = [(k, i) for i in range(len(samples))]
            pool_samples(pool, f["k"], [s["attention"] for s in samples], keys, [s.get("correct") for s in samples])
            # each run's mean AUCs, in the pairs' order for both methods: the unit of the paired Wilcoxon test
            means = [
                float(np.mean([s["attention"][a] for s in f["samples"]])) for a in ("removal_auc", "insertion_auc")
            ]
            pool.setdefault("runs", []).append(means)
    return pooled


def same_fill(fills):
    """StatsError when AUCs scored with different --fill ({fill: a file or a table scored so}) would be compared."""
    if len(fills) > 1:
        raise StatsError(
            "faithfulness.json files scored with different --fill ("
            + ", ".join(f"{fill} in {where}" for fill, where in fills.items())
            + "): score every run of a comparison the same way with eval_faithfulness.py"
        )


def check_faithfulness(path, f):
    """A faithfulness.json as eval_faithfulness.py writes it: k, and per sample two curves on k and two AUCs."""

    def numbers(v, n=None):
        return isinstance(v, list) and (n is None or len(v) == n) and all(finite_number(x) for x in v)

    if not isinstance(f, dict) or not numbers(f.get("k")) or len(f["k"]) < 2 or not isinstance(f.get("samples"), list):
        raise StatsError(
            f"{path} is not a faithfulness.json of eval_faithfulness.py (it needs k, a list of numbers, and samples)"
        )
    if not f["samples"]:
        raise StatsError(f"{path} holds no samples: run eval_faithfulness.py on its run again")
    for i, s in enumerate(f["samples"]):
        a = s.get("attention") if isinstance(s, dict) else None
        if (
            not isinstance(a, dict)
            or not all(numbers(a.get(c), len(f["k"])) for c in ("removal", "insertion"))
            or not numbers([a.get("removal_auc"), a.get("insertion_auc")])
        ):
            raise StatsError(
                f"{path}: sample {i} needs removal and insertion curves of {len(f['k'])} numbers and their AUCs"
            )


def pool_samples(pool, k, samples, keys, correct):
    """Add per-sample AUCs and curves to a pool; curves of runs evaluated with other --steps go onto the pool's grid.
    keys name the samples (the same in both methods' pools of a pair) and correct says whether the model classified
    each at k=0 (None in files from before eval_faithfulness.py recorded it), for plot_curves' view of the samples every
    method classifies correctly."""
    for s, key, ok in zip(samples, keys, correct):
        pool.setdefault("removal_auc", []).append(s["removal_auc"])
        pool.setdefault("insertion_auc", []).append(s["insertion_auc"])
        for curve in ("removal", "insertion"):
            pool.setdefault(curve, []).append(np.interp(pool["k"], k, s[curve]).tolist())
        pool.setdefault("keys", []).append(key)
        if isinstance(ok, bool):
            pool.setdefault("correct", {})[key] = ok


def p_text(w):
    """A Wilcoxon result's p for a table, or why there is none."""
    return f"{w['p']:.3g}" if w["p"] is not None else w["verdict"]


def faithfulness_summary(pooled, base, significance):
    """Mean, CI and the relative change of each AUC, the mean curves, and the one-tailed Wilcoxon test over the paired
    runs (folds and seeds) of each run's mean AUC: H1 CAMAL's removal AUC lower, its insertion AUC higher."""
    out = {}
    for j, auc in enumerate(("removal_auc", "insertion_auc")):
        c, b = describe(pooled["camal"][auc]), describe(pooled[base][auc])
        cam_runs, base_runs = ([r[j] for r in pooled[m]["runs"]] for m in ("camal", base))
        better, worse = (base_runs, cam_runs) if auc == "removal_auc" else (cam_runs, base_runs)
        out[auc] = {
            "camal": c,
            base: b,
            "relative_change_percent": 100 * (c["mean"] / b["mean"] - 1) if b["mean"] else float("nan"),
            "paired_runs": len(cam_runs),
            "wilcoxon": wilcoxon_greater(better, worse, significance),  # verdict "significant": CAMAL better
        }
    # the removal curve starts at the intact image's probability: a model wrong from the start has a low removal AUC for
    # free
    out["start_probability"] = {m: float(np.mean([c[0] for c in pooled[m]["removal"]])) for m in ("camal", base)}
    out["mean_curves"] = {
        m: {"k": pooled[m]["k"], **{c: np.mean(pooled[m][c], axis=0).tolist() for c in ("removal", "insertion")}}
        for m in ("camal", base)
    }
    return out


# ---------------------------------------------------------------------------------------------
# DRL: score matrices, rliable's SBCI and probability of improvement (Figures 4 and 6)
# ---------------------------------------------------------------------------------------------
def rliable_estimate(scores, func, args):
    """One rliable estimate; the global generator is seeded first, so each number repeats on its own."""
    from rliable import library as rly

    np.random.seed(args.seed)
    point, interval = rly.get_interval_estimates(scores, func, reps=args.reps)
    (name,) = point
    return float(np.ravel(point[name])[0]), [float(v) for v in np.ravel(interval[name])]


def aggregate_mean(scores):
    from rliable import metrics

    return np.array([metrics.aggregate_mean(scores)])


def probability_of_improvement(scores_x, scores_y):
    """rliable's metrics.probability_of_improvement (the paper's Eq. 6), vectorised.

    Per task the same Mann-Whitney U / (n_x n_y) (ties count 1/2), then the mean over tasks. rliable calls scipy's
    mannwhitneyu per task, about 1 ms a call: 50,000 resamples of 4 tasks took 4 minutes per estimate. This gives the
    same numbers (tests/test_stats.py checks it against rliable's on random and tied scores) about 100x faster.
    """
    x, y = scores_x[:, None, :], scores_y[None, :, :]
    u = (x > y).sum(axis=(0, 1)) + 0.5 * (x == y).sum(axis=(0, 1))
    return np.mean(list(u / (scores_x.shape[0] * scores_y.shape[0])))


def drl_analysis(runs, args, incomplete, warnings_):
    def key(r):  # a vanilla run can serve several CAMs (baselines_per_cam)
        return r["dir"], r["settings"].get("cam")

    label = variants(runs, lambda r: r["env"], setting_names(runs), key)
    for r in runs:  # an environment run with other settings (frame size, steps, CAM) is another task, never pooled
        r["task"] = r["env"] + (f" [{label[key(r)]}]" if label[key(r)] else "")
    chosen = newest(
        runs, lambda r: (r["task"], r["method"], r["seed"]), lambda k: f"{k[0]}/{k[1]} run with seed {k[2]}", incomplete
    )
    runs = sorted(
        chosen.values(),
        key=lambda r: (order(r["env"], ENV_ORDER), r["task"], order(r["method"], tuple(METHOD_NAMES)), r["seed"]),
    )
    methods = sorted({r["method"] for r in runs}, key=lambda m: order(m, tuple(METHOD_NAMES)))
    envs_of = {m: {r["task"] for r in runs if r["method"] == m} for m in methods}
    envs = [t for t in dict.fromkeys(r["task"] for r in runs) if all(t in envs_of[m] for m in methods)]
    for r in runs:
        if r["task"] not in envs:
            lacking = [m for m in methods if r["task"] not in envs_of[m]]
            incomplete.append(
                {
                    "run": r["dir"],
                    "reason": f"{r['task']} has no {', '.join(lacking)} run: left out of the DRL matrices",
                }
            )
    used = set()
    result = {"methods": methods, "envs": envs, "metrics": {}}
    for metric in DRL_METRICS:
        cells = {}
        for m in methods:
            for e in envs:
                cell = [r for r in runs if (r["method"], r["task"]) == (m, e)]
                for r in cell:
                    if r[metric] is None:
                        incomplete.append(
                            {
                                "run": r["dir"],
                                "reason": f"no {metric} value (no episode ended, or no object on screen): left out of "
                                f"the {metric} matrix",
                            }
                        )
                cells[m, e] = [r for r in cell if r[metric] is not None]
        k = min((len(c) for c in cells.values()), default=0)
        if k == 0 or not envs:
            continue
        for (m, e), cell in cells.items():
            for r in cell[k:]:  # rliable's stratified bootstrap needs the same number of runs in every cell
                incomplete.append(
                    {
                        "run": r["dir"],
                        "reason": f"{m}/{e} has more {metric} runs than the smallest cell ({k}): "
                        f"the {k} lowest seeds are used, seed {r['seed']} is left out",
                    }
                )
        used |= {(r["dir"], r["task"]) for c in cells.values() for r in c[:k]}  # a vanilla run can serve several tasks
        raw = {m: np.array([[cells[m, e][i][metric] for e in envs] for i in range(k)]) for m in methods}  # runs x envs
        res = {
            "k": k,
            "seeds": {m: {e: [r["seed"] for r in cells[m, e][:k]] for e in envs} for m in methods},
            "raw": {m: raw[m].tolist() for m in methods},
        }
        scores = raw
        # min-max per environment over the runs in the matrix (every method), so no env's scale dominates
        if metric == "return":
            every = [[cells[m, e][i]["return"] for m in methods for i in range(k)] for e in envs]
            lo, hi = np.array([min(v) for v in every]), np.array([max(v) for v in every])
            span = np.where(hi > lo, hi - lo, 1.0)
            scores = {m: np.where(hi > lo, (raw[m] - lo) / span, 0.0) for m in methods}
            res["normalisation"] = {e: [float(a), float(b)] for e, a, b in zip(envs, lo, hi)}
            res["normalised"] = {m: scores[m].tolist() for m in methods}
        res["per_env"] = {m: {e: describe(raw[m][:, j].tolist()) for j, e in enumerate(envs)} for m in methods}
        res["sbci_mean"] = {}
        for m in methods:
            point, ci = rliable_estimate({m: scores[m]}, aggregate_mean, args)
            res["sbci_mean"][m] = {"mean": point, "ci95": ci}
        res["poi"] = {}
        if "camal" in methods:
            for y in methods:
                if y == "camal":
                    continue
                point, ci = rliable_estimate(
                    {f"camal,{y}": (scores["camal"], scores[y])}, probability_of_improvement, args
                )
                # with one run per environment the bootstrap has nothing to resample: a zero-width CI is no evidence
                res["poi"][y] = {"p": point, "ci95": ci, "significant": bool(k > 1 and point > 0.5 and ci[0] > 0.5)}
        result["metrics"][metric] = res
    # only the runs in the matrices: the table of runs, the learning curves and the step grid come from them alone
    result["runs"] = [
        {
            k: r.get(k)
            for k in (
                "dir",
                "env",
                "task",
                "method",
                "seed",
                "total_timesteps",
                "steps_done",
                "return",
                "iou",
                "source",
            )
        }
        for r in runs
        if (r["dir"], r["task"]) in used
    ]
    for e in envs:
        steps = sorted(
            {
                r["steps_done"]
                for r in runs
                if r["task"] == e and (r["dir"], e) in used and r.get("steps_done") is not None
            }
        )
        if len(steps) > 1:
            warnings_.append({"run": e, "reason": f"runs of different lengths in this environment: steps done {steps}"})
    return result


def until(series, step):
    """(steps, values) up to a step (an unfinished run's checkpoint), or all of them."""
    steps, values = series
    return (steps, values) if step is None else (steps[steps <= step], values[steps <= step])


def binned(steps, values, edges):
    """One run's curve on a step grid: the mean of its values in each bin (edges[i-1], edges[i]] (the first bin also
    takes the steps before it); a bin without a value keeps the last one, NaN before the first."""
    idx = np.searchsorted(edges, steps, side="left")
    row, last = np.full(len(edges) - 1, np.nan), np.nan
    for i in range(1, len(edges)):
        sel = values[idx == i] if i > 1 else values[idx <= 1]
        last = sel.mean() if len(sel) else last
        row[i - 1] = last
    return row


def mean_band(rows):
    """Runs x points: per point the mean over the runs that have a value and the half-width of its 95 % band (1.96 SE; 0
    where one run has a value)."""
    n = np.sum(~np.isnan(rows), axis=0)
    with warnings.catch_warnings():  # points before a run's first value are NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(rows, axis=0)
        std = np.where(n > 1, np.nanstd(rows, axis=0, ddof=1), 0.0)
    return mean, 1.96 * std / np.sqrt(np.maximum(n, 1))


def learning_curves(runs, points):
    """Per environment and method: training curves on a common step grid, mean and 95 % band over runs.

    Each run's values are averaged within the grid's bins (a bin without a value keeps the last one); the grid ends at
    the shortest run's last step, so every point averages the same runs."""
    curves = {}
    print(f"learning curves: reading the TensorBoard events of {len(runs)} DRL runs", file=sys.stderr, flush=True)
    read = {}
    for r in runs:  # a vanilla run serving several --cam tasks is read once
        r["acc"] = r.get("acc") or read.get(r["dir"]) or read_tensorboard(r["dir"])
        read[r["dir"]] = r["acc"]
    for metric, (tag, _) in DRL_METRICS.items():
        for env in dict.fromkeys(r["task"] for r in runs):  # runs come in the matrices' order
            series = [
                (r, *until(scalar_series(r["acc"], tag), r.get("checkpoint_step") if r.get("unfinished") else None))
                for r in runs
                if r["task"] == env and (metric != "iou" or r.get("iou_curve", True))
            ]
            series = [s for s in series if len(s[1])]
            if not series:
                continue
            end = min(s[1][-1] for s in series)
            edges = np.linspace(0, end, points + 1)
            for m in sorted({s[0]["method"] for s in series}, key=lambda m: order(m, tuple(METHOD_NAMES))):
                rows = np.array([binned(steps, values, edges) for r, steps, values in series if r["method"] == m])
                mean, band = mean_band(rows)
                curves.setdefault(metric, {}).setdefault(env, {})[m] = {
                    "steps": edges[1:].tolist(),
                    "mean": mean.tolist(),
                    "band": band.tolist(),
                    "runs": len(rows),
                }
    return curves


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------
def pct(d, mark=""):
    """mean +- std in %, as the paper prints accuracy and IoU; mark: bold (significant) or underline (higher only)."""
    if d is None or not d["n"]:
        return "—"
    text = f"{100 * d['mean']:.1f} ± {100 * d['std']:.1f}" if d["n"] > 1 else f"{100 * d['mean']:.1f}"
    return {"significant": f"**{text}**", "higher, not significant": f"<u>{text}</u>"}.get(mark, text)


def ci_text(d, scale=100.0, digits=1):
    lo, hi = d["ci95"]
    return "—" if lo != lo else f"[{scale * lo:.{digits}f}, {scale * hi:.{digits}f}]"


def markdown(table):
    lines = [f"### {table['title']}", ""]
    lines.append("| " + " | ".join(table["header"]) + " |")
    lines.append("|" + "|".join("---" for _ in table["header"]) + "|")
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in table["rows"]]
    lines += [""] + [f"{n}" for n in table.get("notes", [])]
    return "\n".join(lines) + "\n"


def dataset_label(d, variant=""):
    return DATASET_NAMES.get(d, d) + (f" [{variant}]" if variant else "")


def dl_tables(summary, comparisons, significance):
    tables = []
    if summary:
        rows = [
            [
                dataset_label(s["dataset"], s["variant"]),
                MODEL_NAMES.get(s["model"], s["model"]),
                method_name(s["method"]),
                s["runs"],
                pct(s["test_accuracy"]),
                pct(s["test_iou"]),
            ]
            for s in summary
        ]
        csv_rows = [
            [
                s["dataset"],
                s["variant"],
                s["model"],
                s["method"],
                s["runs"],
                *[s[m][f] for m in ("test_accuracy", "test_iou") for f in ("mean", "std")],
            ]
            for s in summary
        ]
        tables.append(
            {
                "name": "dl_runs",
                "title": "DL runs: the runs used, per experiment and method (% mean ± std)",
                "header": ["Dataset", "Model", "Method", "Runs", "Test accuracy", "Test IoU"],
                "rows": rows,
                "notes": [
                    "[...]: the settings in which an experiment differs from another of the same dataset and model; "
                    "runs of different experiments are never paired. Runs not used are listed under Incomplete."
                ],
                "csv_header": [
                    "dataset",
                    "variant",
                    "model",
                    "method",
                    "runs",
                    "accuracy_mean",
                    "accuracy_std",
                    "iou_mean",
                    "iou_std",
                ],
                "csv_rows": csv_rows,
            }
        )
    for base in BASELINES:
        for metric in DL_METRICS:
            comps = [c for c in comparisons if c["baseline"] == base and metric in c]
            if not comps:
                continue
            datasets = sorted(
                {(c["dataset"], c["variant"]) for c in comps}, key=lambda d: (order(d[0], tuple(DATASET_NAMES)), d[1])
            )
            models = sorted({c["model"] for c in comps}, key=lambda m: order(m, tuple(MODEL_NAMES)))
            header = ["Model"] + [f"{dataset_label(*d)} {n}" for d in datasets for n in ("CAMAL", method_name(base))]
            rows = []
            for model in models:
                row = [MODEL_NAMES.get(model, model)]
                for d in datasets:
                    c = next((c for c in comps if (c["dataset"], c["variant"], c["model"]) == (*d, model)), None)
                    row += (
                        [pct(c[metric]["camal"], c[metric]["wilcoxon"]["verdict"]), pct(c[metric][base])]
                        if c
                        else ["—", "—"]
                    )
                rows.append(row)
            paper = PAPER_TABLE.get((metric, base))
            title = f"{DL_METRICS[metric]}: CAMAL vs {method_name(base)}" + (f" (the paper's {paper})" if paper else "")
            notes = [
                "% mean ± std over the paired folds. **Bold**: CAMAL's mean is higher and the one-tailed Wilcoxon "
                "signed-rank "
                f"test (H1: CAMAL > baseline) gives p < {significance:g}; <u>underlined</u>: higher, not significant."
            ]
            detail_rows, csv_rows = [], []
            for c in comps:
                a, b, w = c[metric]["camal"], c[metric][base], c[metric]["wilcoxon"]
                detail_rows.append(
                    [
                        dataset_label(c["dataset"], c["variant"]),
                        MODEL_NAMES.get(c["model"], c["model"]),
                        a["n"],
                        f"{pct(a)} {ci_text(a)}",
                        f"{pct(b)} {ci_text(b)}",
                        "—" if w["T"] is None else f"{w['T']:g}",
                        "—" if w["p"] is None else f"{w['p']:.4g}",
                        w["verdict"],
                    ]
                )
                csv_rows.append(
                    [
                        c["dataset"],
                        c["variant"],
                        c["model"],
                        a["n"],
                        a["mean"],
                        a["std"],
                        *a["ci95"],
                        b["mean"],
                        b["std"],
                        *b["ci95"],
                        w["r_plus"],
                        w["T"],
                        w["p"],
                        w["verdict"],
                    ]
                )
            # the paper's layout, then every number of its tests (the CSV holds them all)
            tables.append(
                {
                    "name": f"dl_{metric}_camal_vs_{base}",
                    "title": title,
                    "header": header,
                    "rows": rows,
                    "notes": notes,
                    "csv_header": [
                        "dataset",
                        "variant",
                        "model",
                        "pairs",
                        "camal_mean",
                        "camal_std",
                        "camal_ci_low",
                        "camal_ci_high",
                        f"{base}_mean",
                        f"{base}_std",
                        f"{base}_ci_low",
                        f"{base}_ci_high",
                        "r_plus",
                        "T",
                        "p",
                        "result",
                    ],
                    "csv_rows": csv_rows,
                }
            )
            tables.append(
                {
                    "name": None,
                    "title": f"{title}: tests",
                    "header": [
                        "Dataset",
                        "Model",
                        "Pairs",
                        "CAMAL % [95 % CI]",
                        f"{method_name(base)} % [95 % CI]",
                        "T",
                        "p (one-tailed)",
                        "Result",
                    ],
                    "rows": detail_rows,
                    "notes": [
                        "T = min(R+, R-) as in the paper's Eq. 5; p from scipy.stats.wilcoxon(camal, baseline, "
                        "alternative='greater'). CI: mean ± 1.96 standard errors."
                    ],
                }
            )
    return tables


def merge_pools(pools, where):
    same_fill({p["fill"]: w for p, w in zip(pools, where)})  # the pooled row of several comparisons too
    out = {"k": pools[0]["k"], "fill": pools[0]["fill"]}
    keys = ("removal_auc", "insertion_auc", "removal", "insertion")
    for p, w in zip(pools, where):
        samples = [dict(zip(keys, v)) for v in zip(*(p[key] for key in keys))]
        correct = [p.get("correct", {}).get(key) for key in p["keys"]]
        pool_samples(out, p["k"], samples, [(w, key) for key in p["keys"]], correct)
        out.setdefault("runs", []).extend(p["runs"])
    return out


def faithfulness_tables(comparisons, significance):
    """Per baseline: a table of AUCs per model-dataset pair and pooled over all of them (as the paper's Figure 5)."""
    tables, results, curves = [], {}, {}
    for base in BASELINES:
        comps = [c for c in comparisons if c["baseline"] == base and c["faithfulness"]]
        if not comps:
            continue
        entries = [(c["dataset"], c["variant"], c["model"], c["faithfulness"]) for c in comps]
        if len(comps) > 1:
            entries.append(
                (
                    "all",
                    "",
                    "all",
                    {
                        m: merge_pools(
                            [c["faithfulness"][m] for c in comps],
                            [f"the {c['dataset']} {c['model']} comparison" for c in comps],
                        )
                        for m in ("camal", base)
                    },
                )
            )
        curves[base] = entries[-1][3]
        rows, csv_rows, results[base] = [], [], []
        for ds, variant, model, pooled in entries:
            s = faithfulness_summary(pooled, base, significance)
            results[base].append({"dataset": ds, "variant": variant, "model": model, **s})
            r, i = s["removal_auc"], s["insertion_auc"]
            fmt = lambda d: f"{d['mean']:.4f} {ci_text(d, 1.0, 4)}"  # noqa: E731
            p0 = s["start_probability"]
            rows.append(
                [
                    dataset_label(ds, variant),
                    MODEL_NAMES.get(model, model),
                    f"{r['camal']['n']} / {r[base]['n']}",
                    f"{p0['camal']:.2f} / {p0[base]:.2f}",
                    fmt(r["camal"]),
                    fmt(r[base]),
                    f"{r['relative_change_percent']:+.1f} %",
                    p_text(r["wilcoxon"]),
                    fmt(i["camal"]),
                    fmt(i[base]),
                    f"{i['relative_change_percent']:+.1f} %",
                    p_text(i["wilcoxon"]),
                ]
            )
            csv_rows.append(
                [
                    ds,
                    variant,
                    model,
                    r["camal"]["n"],
                    r[base]["n"],
                    p0["camal"],
                    p0[base],
                    r["camal"]["mean"],
                    *r["camal"]["ci95"],
                    r[base]["mean"],
                    *r[base]["ci95"],
                    r["relative_change_percent"],
                    r["wilcoxon"]["p"],
                    i["camal"]["mean"],
                    *i["camal"]["ci95"],
                    i[base]["mean"],
                    *i[base]["ci95"],
                    i["relative_change_percent"],
                    i["wilcoxon"]["p"],
                    r["paired_runs"],
                ]
            )
        b = method_name(base)
        tables.append(
            {
                "name": f"dl_faithfulness_camal_vs_{base}",
                "title": f"Faithfulness AUCs: CAMAL vs {b} (eval_faithfulness.py)",
                "header": [
                    "Dataset",
                    "Model",
                    "Samples",
                    "p(true) at k=0",
                    "Removal CAMAL [95 % CI]",
                    f"Removal {b}",
                    "Change",
                    "p",
                    "Insertion CAMAL",
                    f"Insertion {b}",
                    "Change",
                    "p",
                ],
                "rows": rows,
                "notes": [
                    "Per-sample AUCs pooled over the paired folds that both have faithfulness.json. Removal: lower is "
                    "better; insertion: higher is better. Change: CAMAL's mean relative to the baseline's "
                    "(the paper, against Prior: -39 % removal, +35.3 % insertion). p: one-tailed Wilcoxon "
                    "signed-rank test over the paired runs (folds and seeds) of each run's mean AUC, H1: CAMAL's "
                    "removal lower, its insertion higher (scipy.stats.wilcoxon). p(true) at k=0: the mean "
                    "probability of "
                    "the true class on the intact images (CAMAL / baseline); removal starts there, so compare removal "
                    "AUCs only where these are alike: a model wrong from the start has a low removal AUC for free."
                ],
                "csv_header": [
                    "dataset",
                    "variant",
                    "model",
                    "camal_samples",
                    f"{base}_samples",
                    "start_probability_camal",
                    f"start_probability_{base}",
                    "removal_camal",
                    "removal_camal_ci_low",
                    "removal_camal_ci_high",
                    f"removal_{base}",
                    f"removal_{base}_ci_low",
                    f"removal_{base}_ci_high",
                    "removal_change_percent",
                    "removal_wilcoxon_p",
                    "insertion_camal",
                    "insertion_camal_ci_low",
                    "insertion_camal_ci_high",
                    f"insertion_{base}",
                    f"insertion_{base}_ci_low",
                    f"insertion_{base}_ci_high",
                    "insertion_change_percent",
                    "insertion_wilcoxon_p",
                    "paired_runs",
                ],
                "csv_rows": csv_rows,
            }
        )
    return tables, results, curves


def drl_tables(drl, args):
    tables = []
    rows = [
        [
            r["task"],
            method_name(r["method"]),
            r["seed"],
            "—" if r["return"] is None else f"{r['return']:.2f}",
            "—" if r["iou"] is None else f"{r['iou']:.3f}",
            r["source"],
        ]
        for r in drl["runs"]
    ]
    tables.append(
        {
            "name": "drl_runs",
            "title": "DRL runs: the score of every run used and where it comes from",
            "header": ["Env", "Method", "Seed", "Return", "IoU", "Source"],
            "rows": rows,
            "csv_header": ["env", "method", "seed", "return", "iou", "source", "run"],
            "csv_rows": [
                [r["task"], r["method"], r["seed"], r["return"], r["iou"], r["source"], r["dir"]] for r in drl["runs"]
            ],
        }
    )
    for metric, res in drl["metrics"].items():
        label = "return" if metric == "return" else "attention IoU"
        figure = DRL_METRICS[metric][1]
        per_env = [
            [e, method_name(m), d["n"], f"{d['mean']:.3f}" + (f" ± {d['std']:.3f}" if d["n"] > 1 else "")]
            for e in drl["envs"]
            for m in drl["methods"]
            for d in [res["per_env"][m][e]]
        ]
        notes = [
            f"{res['k']} run{'s' if res['k'] > 1 else ''} per method and environment (the lowest seeds where a cell "
            "has more)."
        ]
        if res["k"] == 1:
            notes.append(
                "With one run per environment the bootstrap has nothing to resample: the CIs have zero width and "
                "say nothing about uncertainty, and no probability of improvement is called significant."
            )
        if metric == "return":
            notes.append(
                "Returns are min-max normalised per environment over the runs in the matrix, of every method, before "
                "aggregation (min -> 0, max -> 1; an environment where all are equal -> 0): "
                + ", ".join(f"{e} [{lo:g}, {hi:g}]" for e, (lo, hi) in res["normalisation"].items())
                + "."
            )
        notes.append(
            f"SBCI: rliable get_interval_estimates with the mean aggregate, {args.reps} stratified bootstrap "
            f"resamples, numpy seeded with {args.seed}."
        )
        sbci = [
            [
                method_name(m),
                f"{res['k']} x {len(drl['envs'])}",
                f"{v['mean']:.3f}",
                f"[{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]",
            ]
            for m, v in res["sbci_mean"].items()
        ]
        tables.append(
            {
                "name": f"drl_{metric}_per_env",
                "title": f"DRL {label} per environment (raw, mean ± std)",
                "header": ["Env", "Method", "Runs", label[0].upper() + label[1:]],
                "rows": per_env,
                "csv_header": ["env", "method", "runs", "mean", "std"],
                "csv_rows": [
                    [e, m, res["per_env"][m][e]["n"], res["per_env"][m][e]["mean"], res["per_env"][m][e]["std"]]
                    for e in drl["envs"]
                    for m in drl["methods"]
                ],
            }
        )
        tables.append(
            {
                "name": f"drl_{metric}_sbci",
                "title": f"DRL {label}: SBCI of the mean (the paper's {figure}, left)",
                "header": [
                    "Method",
                    "Runs x envs",
                    "Mean" + (" (normalised)" if metric == "return" else ""),
                    "95 % CI",
                ],
                "rows": sbci,
                "notes": notes,
                "csv_header": ["method", "runs", "envs", "mean", "ci_low", "ci_high"],
                "csv_rows": [
                    [m, res["k"], len(drl["envs"]), v["mean"], *v["ci95"]] for m, v in res["sbci_mean"].items()
                ],
            }
        )
        if res["poi"]:
            tables.append(
                {
                    "name": f"drl_{metric}_poi",
                    "title": f"DRL {label}: probability of improvement (the paper's {figure}, right)",
                    "header": ["X", "Y", "P(X > Y)", "95 % CI", "Result"],
                    "rows": [
                        [
                            "CAMAL",
                            method_name(y),
                            f"{v['p']:.3f}",
                            f"[{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]",
                            "significant" if v["significant"] else "not significant",
                        ]
                        for y, v in res["poi"].items()
                    ],
                    "notes": [
                        "rliable probability_of_improvement (Mann-Whitney per environment, averaged; the paper's Eq. "
                        "6) with its stratified bootstrap CI. Significant when P > 0.5 and 0.5 is outside the CI."
                    ],
                    "csv_header": ["x", "y", "p", "ci_low", "ci_high", "significant"],
                    "csv_rows": [["camal", y, v["p"], *v["ci95"], v["significant"]] for y, v in res["poi"].items()],
                }
            )
    return tables


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------
def plot_drl(drl, curves, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rliable import plot_utils

    written = []
    metrics_ = [m for m in DRL_METRICS if m in drl["metrics"]]
    labels = {"return": "Return (min-max normalised)", "iou": "Attention IoU"}
    if metrics_:
        point = {
            method_name(m): np.array([drl["metrics"][x]["sbci_mean"][m]["mean"] for x in metrics_])
            for m in drl["methods"]
        }
        interval = {
            method_name(m): np.array([drl["metrics"][x]["sbci_mean"][m]["ci95"] for x in metrics_]).T
            for m in drl["methods"]
        }
        fig, _ = plot_utils.plot_interval_estimates(
            point,
            interval,
            metric_names=[labels[x] for x in metrics_],
            algorithms=list(point),
            xlabel="Mean (SBCI, 95 % CI)",
            row_height=0.6,
            subfigure_width=4.0,
            xlabel_y_coordinate=-0.35,
        )
        atomic_write(
            os.path.join(out, "drl_interval_estimates.png"),
            lambda f: fig.savefig(f, dpi=120, bbox_inches="tight", format="png"),
        )
        plt.close(fig)
        written.append("drl_interval_estimates.png")
    poi = [x for x in metrics_ if drl["metrics"][x]["poi"]]
    if poi:
        fig, axes = plt.subplots(1, len(poi), figsize=(5 * len(poi), 3), squeeze=False)
        for ax, x in zip(axes[0], poi):
            res = drl["metrics"][x]["poi"]
            plot_utils.plot_probability_of_improvement(
                {f"CAMAL,{method_name(y)}": v["p"] for y, v in res.items()},
                {f"CAMAL,{method_name(y)}": np.array(v["ci95"]) for y, v in res.items()},
                ax=ax,
                xlabel=f"P(X > Y), {labels[x]}",
            )
        fig.tight_layout()
        atomic_write(
            os.path.join(out, "drl_probability_of_improvement.png"),
            lambda f: fig.savefig(f, dpi=120, bbox_inches="tight", format="png"),
        )
        plt.close(fig)
        written.append("drl_probability_of_improvement.png")
    envs = sorted({e for c in curves.values() for e in c}, key=lambda e: order(e, ENV_ORDER))
    if envs:
        fig, axes = plt.subplots(len(envs), 2, figsize=(10, 3 * len(envs)), squeeze=False)
        for row, env in zip(axes, envs):
            for ax, metric in zip(row, DRL_METRICS):
                drawn = curves.get(metric, {}).get(env, {})
                for m, c in drawn.items():
                    mean, band = np.array(c["mean"]), np.array(c["band"])
                    few = np.count_nonzero(~np.isnan(mean)) < 2  # a single value: a marker, not an invisible line
                    ax.plot(
                        c["steps"],
                        mean,
                        marker="o" if few else None,
                        label=f"{method_name(m)} ({c['runs']} run{'s' if c['runs'] > 1 else ''})",
                    )
                    ax.fill_between(c["steps"], mean - band, mean + band, alpha=0.2)
                ax.set_title(f"{env}: {DRL_METRICS[metric][0]}")
                ax.set_xlabel("global step")
                if drawn:
                    ax.legend(fontsize=8)
                else:
                    ax.text(0.5, 0.5, "nothing logged", ha="center", va="center", transform=ax.transAxes)
        fig.tight_layout()
        atomic_write(os.path.join(out, "drl_learning_curves.png"), lambda f: fig.savefig(f, dpi=100, format="png"))
        plt.close(fig)
        written.append("drl_learning_curves.png")
    return written


def plot_faithfulness(curves, out):
    """Removal and insertion curves with 95 % bands, pooled over every model-dataset pair (the paper's Figure 5)."""
    written = []
    for base, pooled in curves.items():
        name = f"dl_faithfulness_camal_vs_{base}.png"
        plot_curves(
            os.path.join(out, name),
            np.asarray(pooled["camal"]["k"]),
            {method_name(m): pooled[m] for m in ("camal", base)},
        )
        written.append(name)
    return written


# copied unchanged from eval_faithfulness.py (tests/test_shared_helpers.py checks)
NORMALISE_FLOOR = 0.5  # the normalised AUCs use samples whose p(true) at k=0 is at least this (ratios below 2)


def correct_by_all(groups):
    """The keys of the samples that every method's model (not the random floors) classifies correctly at k=0."""
    methods = [n for n in groups if "/" not in n]
    return set.intersection(*[{k for k, c in groups[n]["correct"].items() if c} for n in methods]) if methods else set()


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


def check_args(args):
    if not args.paths:
        raise StatsError("give one or more folders to search for runs (e.g. runs/)")
    if not 1 <= args.reps <= 10**6:  # the bootstrap holds reps x runs x tasks numbers at once
        raise StatsError(f"--reps must lie in 1 .. 1,000,000 (rliable's default is 50,000), got {args.reps}")
    if args.last_n < 1:
        raise StatsError(f"--last-n must be at least 1, got {args.last_n}")
    if not 0 < args.significance < 1:
        raise StatsError(f"--significance must be between 0 and 1, got {args.significance}")
    if args.curve_points < 2:
        raise StatsError(f"--curve-points must be at least 2, got {args.curve_points}")
    if not 0 <= args.seed < 2**32:
        raise StatsError(f"--seed must lie in 0 .. 2**32 - 1 (numpy's seeds), got {args.seed}")
    if args.out is not None:
        if not args.out:
            raise StatsError("--out needs a folder")
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise StatsError(f"--out {args.out} exists and is not a folder")
        if unwritable(args.out):  # checked now, not after the tables; nothing is written yet
            raise StatsError(f"--out {args.out}: {unwritable(args.out)}")


def analyse(args):
    """Every number of the analysis, and the tables that show them."""
    check_args(args)
    warnings_ = []
    dl_runs, drl_runs, left_out, skipped = find_runs(
        args.paths, args.drl_score, args.last_n, args.include_unfinished, warnings_
    )
    if not dl_runs and not drl_runs:
        seen = f" ({len(skipped)} folders with TensorBoard events but no usable run)" if skipped else ""
        if left_out:
            seen += f"; {len(left_out)} PPO runs not scored, e.g. {left_out[0]['run']}: {left_out[0]['reason']}"
        raise StatsError(
            f"no runs of train_dl_camal.py or ppo_camal_vizdoom.py under {', '.join(args.paths)}{seen}: "
            "a run folder holds metrics.json (DL), eval.json or the TensorBoard events of a PPO run"
        )
    for r in dl_runs + drl_runs:
        r["environment"] = run_environment(r["dir"], warnings_)
    version_warnings(dl_runs, drl_runs, warnings_)
    incomplete = list(left_out)
    with np.errstate(over="ignore"):  # a mean that overflows is named under Warnings (overflowed), not by numpy
        summary, comparisons = dl_analysis(dl_runs, args, incomplete, warnings_) if dl_runs else ([], [])
        drl_runs = baselines_per_cam(drl_runs)
        drl = drl_analysis(drl_runs, args, incomplete, warnings_) if drl_runs else None
    empty_cam_warnings(dl_runs, drl_runs, warnings_)
    tables = dl_tables(summary, comparisons, args.significance)
    faith_tables, faithfulness, curves = faithfulness_tables(comparisons, args.significance)
    tables += faith_tables
    if drl:
        tables += drl_tables(drl, args)
    uncompared = nothing_compared(dl_runs, comparisons, drl)
    if overflowed([summary, comparisons, drl]):
        warnings_.append(
            {
                "run": "analysis",
                "reason": "some numbers overflowed to infinity (scores too large for a float): they print as inf and "
                "are null in stats.json",
            }
        )
    stats = {
        "args": asdict(args),
        "computed_with": analysis_environment(),
        "nothing_compared": uncompared,
        "dl": {
            "runs": len(dl_runs),
            "summary": summary,
            "comparisons": [{k: v for k, v in c.items() if k != "faithfulness"} for c in comparisons],
            "faithfulness": faithfulness,
        },
        "drl": drl,
        "incomplete": incomplete,
        "warnings": warnings_,
        "skipped": skipped,
    }
    return stats, tables, curves, drl_runs


def nothing_compared(dl_runs, comparisons, drl):
    """What was analysed but compared with nothing: runs of one method only, or no CAMAL run to compare."""
    notes = []
    if dl_runs and not comparisons:
        methods = sorted({r["method"] for r in dl_runs})
        notes.append(
            f"DL: the runs are of {', '.join(methods)} only: no pair of CAMAL and a baseline on the same fold, so no "
            "test was made"
        )
    if drl and not any(res.get("poi") for res in drl["metrics"].values()):
        notes.append(
            f"DRL: the runs are of {', '.join(drl['methods'])} only: no CAMAL run beside another method, so nothing "
            "was compared"
        )
    return notes


def overflowed(obj):
    """True where a number in a (nested) result is infinite: a mean that overflowed."""
    if isinstance(obj, (float, np.floating)):
        return bool(np.isinf(obj))
    if isinstance(obj, dict):
        return any(overflowed(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(overflowed(v) for v in obj)
    return False


def empty_cam_warnings(dl_runs, drl_runs, warnings_):
    """A method whose CAMs were mostly all zero has an IoU that measures Grad-CAM's ReLU, not where it looked."""
    cells = {}
    for r in dl_runs:
        cells.setdefault(f"{r['dataset']}/{r['model']}/{r['method']}", []).append(r.get("test_cam_empty_fraction"))
    for r in drl_runs:
        cells.setdefault(f"{r.get('task', r['env'])}/{r['method']}", []).append(r.get("cam_empty"))
    for name, values in sorted(cells.items()):
        values = [v for v in values if v is not None]  # runs written before the fraction was recorded have none
        if values and np.mean(values) > 0.5:
            warnings_.append(
                {
                    "run": name,
                    "reason": f"{np.mean(values):.0%} of its CAMs were empty (all zero) on average over "
                    f"{len(values)} runs: its IoU comes mostly from empty maps and says little about where it looked",
                }
            )


def report(stats, tables):
    parts = ["# CAMAL statistics", ""]
    if stats["nothing_compared"]:
        parts += ["### Nothing compared", ""] + [f"- {n}" for n in stats["nothing_compared"]] + [""]
    parts += [markdown(t) for t in tables]
    for title, items in (
        ("Incomplete: listed, left out of the tests above", stats["incomplete"]),
        ("Warnings: used, but check the settings", stats["warnings"]),
        ("Skipped folders", stats["skipped"]),
    ):
        if items:
            parts += [f"### {title}", ""] + [f"- {i['run']}: {i['reason']}" for i in items] + [""]
    env = stats["computed_with"]
    parts += [
        f"Computed with scipy {env['scipy']} (the Wilcoxon p-values), rliable {env['rliable']} and numpy "
        f"{env['numpy']}.",
        "",
    ]
    return "\n".join(parts)


def write_outputs(args, stats, tables, curves, drl_runs):
    make_folder(args.out)
    written = ["stats.json"]
    for t in tables:
        if "csv_rows" in t:
            text = io.StringIO()
            w = csv.writer(text)
            w.writerow(t["csv_header"])
            w.writerows(clean(t["csv_rows"]))
            atomic_write(os.path.join(args.out, f"{t['name']}.csv"), lambda f: f.write(text.getvalue().encode()))
            written.append(f"{t['name']}.csv")
    if stats["drl"]:
        used = {(x["dir"], x["task"]) for x in stats["drl"]["runs"]}
        runs = [r for r in drl_runs if (r["dir"], r.get("task")) in used]
        stats["drl"]["learning_curves"] = learning_curves(runs, args.curve_points)
        written += plot_drl(stats["drl"], stats["drl"]["learning_curves"], args.out)
    written += plot_faithfulness(curves, args.out)
    write_json(os.path.join(args.out, "stats.json"), clean(stats), indent=1, allow_nan=False)
    return written


if __name__ == "__main__":
    args = tyro.cli(Args)
    try:
        stats, tables, curves, drl_runs = analyse(args)
        print(report(stats, tables))
        if args.out:
            written = write_outputs(args, stats, tables, curves, drl_runs)
            print(f"written to {args.out}/: {', '.join(written)}")
    except (
        StatsError,
        RunFileError,
    ) as e:  # bad input, a run file that cannot be read, an output that cannot be written
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
